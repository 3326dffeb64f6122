"""``leveret status [APP] [--watch]``: how much work waits, runs, retries and died, per queue.

Figures come from the management API when it answers (ready, unacked, consumers and message
rates, as the broker's statistics have them, a few seconds old at most) and from passive
declares otherwise (ready and consumers are exact and current, unacked and rates unknown). Which
one was used is said on stderr, every time.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiormq
import click
from rich.table import Table

from leveret.producers.connection import connect
from leveret.topology.model import DELAY_BITS, dlq_name, retry_queue_name

from ..management import Management, ManagementError
from ..settings import WorkerSettings
from .common import command_setup, fail, load_app, load_settings, run_async
from .tables import plain_table, print_table

SOURCE_API = "management API"
SOURCE_PASSIVE = "passive declares"


@dataclass
class QueueStatus:
    queue: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    retrying: int | None
    dead: int | None
    publish_rate: float | None
    deliver_rate: float | None


def _rate(queue: dict[str, Any] | None, key: str) -> float | None:
    stats = (queue or {}).get("message_stats") or {}
    details = stats.get(f"{key}_details")
    return float(details["rate"]) if details and "rate" in details else None


def _looks_like_work_queues(names: set[str]) -> list[str]:
    """Leveret work queues are the ones with a ``Q.dlq`` beside them."""
    return sorted(
        n for n in names if dlq_name(n) in names and not n.endswith(".dlq") and ".retry." not in n
    )


def from_management(api: Management, queues: list[str] | None) -> list[QueueStatus]:
    by_name = {q["name"]: q for q in api.queues()}
    wanted = queues if queues is not None else _looks_like_work_queues(set(by_name))
    out = []
    for name in wanted:
        q = by_name.get(name)
        prefix = f"{name}.retry."
        retry = [v for k, v in by_name.items() if k.startswith(prefix)]
        dead = by_name.get(dlq_name(name))
        out.append(
            QueueStatus(
                queue=name,
                ready=q.get("messages_ready") if q else None,
                unacked=q.get("messages_unacknowledged") if q else None,
                consumers=q.get("consumers") if q else None,
                retrying=sum(r.get("messages", 0) or 0 for r in retry) if retry else None,
                dead=dead.get("messages") if dead else None,
                publish_rate=_rate(q, "publish"),
                deliver_rate=_rate(q, "deliver_get"),
            )
        )
    return out


async def from_passive(settings: WorkerSettings, queues: list[str]) -> list[QueueStatus]:
    """Exact ready counts and consumers by ``queue.declare(passive=True)``; one channel per miss."""
    connection = await connect(settings, robust=False)
    try:
        channel = await (await connection.channel()).get_underlay_channel()

        async def probe(name: str) -> tuple[int, int] | None:
            nonlocal channel
            try:
                ok = await channel.queue_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                # The broker closed that channel; continue on a new one.
                channel = await (await connection.channel()).get_underlay_channel()
                return None
            return ok.message_count or 0, ok.consumer_count or 0

        out = []
        for name in queues:
            work = await probe(name)
            retry = [await probe(retry_queue_name(name, n)) for n in range(DELAY_BITS)]
            dead = await probe(dlq_name(name))
            present = [r[0] for r in retry if r is not None]
            out.append(
                QueueStatus(
                    queue=name,
                    ready=work[0] if work else None,
                    unacked=None,
                    consumers=work[1] if work else None,
                    retrying=sum(present) if present else None,
                    dead=dead[0] if dead else None,
                    publish_rate=None,
                    deliver_rate=None,
                )
            )
        return out
    finally:
        await connection.close()


def collect(
    settings: WorkerSettings, queues: list[str] | None
) -> tuple[list[QueueStatus], str, str]:
    """The figures, their source, and a note for stderr saying which and why."""
    api = Management.from_settings(settings)
    try:
        return (
            from_management(api, queues),
            SOURCE_API,
            f"source: management API at {api.target.display}, vhost {api.target.vhost!r} "
            f"(the broker's statistics, up to ~5 s old)",
        )
    except ManagementError as exc:
        if queues is None:
            fail(
                f"{exc}. Without the management API the queues cannot be listed: name the APP "
                f"(leveret status myapp.tasks:worker) to read them by passive declares"
            )
        note = (
            f"source: passive declares (the management API did not answer: {exc}); "
            f"unacked and rates are unknown (-)"
        )
    return run_async(from_passive(settings, queues)), SOURCE_PASSIVE, note


def _fmt(value: int | float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


COLUMNS = [
    ("QUEUE", "queue"),
    ("READY", "ready"),
    ("UNACKED", "unacked"),
    ("CONSUMERS", "consumers"),
    ("RETRYING", "retrying"),
    ("DEAD", "dead"),
    ("PUBLISH/S", "publish_rate"),
    ("DELIVER/S", "deliver_rate"),
]


def render_table(rows: list[QueueStatus]) -> Table:
    """One line per queue: the name first, the figures right-aligned."""
    table = plain_table()
    table.add_column(COLUMNS[0][0], overflow="fold")
    for header, _ in COLUMNS[1:]:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row.queue, *(_fmt(getattr(row, key)) for _, key in COLUMNS[1:]))
    return table


@click.command(
    epilog="""\b
Examples:
  leveret status                      every queue with a Q.dlq beside it
  leveret status myapp.tasks:worker   the queues of one app
  leveret status --watch --interval 2
READY waits for a worker, UNACKED is being worked on, RETRYING waits out a
backoff in Q.retry.*, DEAD sits in Q.dlq (see `leveret dlq list Q`).""",
)
@click.argument("app", required=False)
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option("--interval", type=click.FloatRange(0.5), default=5.0, show_default=True,
              help="Seconds between refreshes with --watch.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue and line.")
@command_setup
def status(app: str | None, watch: bool, interval: float, as_json: bool) -> None:
    """Per work queue: ready, unacked, consumers, retrying, dead, and rates."""
    settings = load_settings()
    queues = None
    if app is not None:
        app_worker = load_app(app)
        settings = app_worker.settings  # the app's own settings, as `worker` and `topology` use
        queues = [q.name for q in app_worker.topology.queues]
    clear = watch and sys.stdout.isatty() and not as_json
    try:
        _loop(settings, queues, watch, interval, as_json, clear)
    except KeyboardInterrupt:
        return


def _loop(
    settings: WorkerSettings,
    queues: list[str] | None,
    watch: bool,
    interval: float,
    as_json: bool,
    clear: bool,
) -> None:
    while True:
        rows, _source, note = collect(settings, queues)
        if clear:
            click.echo("\033[2J\033[H", nl=False)
        click.echo(note, err=True)
        if as_json:
            for row in rows:
                click.echo(json.dumps(asdict(row)))
        elif rows:
            print_table(render_table(rows))
        else:
            click.echo("no Leveret work queues (queues with a Q.dlq) in this vhost", err=True)
        if not watch:
            return
        time.sleep(interval)
