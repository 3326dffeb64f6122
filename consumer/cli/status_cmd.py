"""``leveret status [APP] [--watch]``: how much work waits, runs, retries and died, per queue.

The figures come from ``leveret.consumer.ops.overview``; this module draws them. Where they came
from (management API or passive declares) is said on stderr, every time.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from leveret.consumer.cli.common import command_setup, load_app, load_settings, run_async
from leveret.consumer.cli.tables import plain_table, print_table

# Loaded when `status` runs, not when the CLI starts (`leveret worker` imports this module too).
if TYPE_CHECKING:
    from rich.table import Table

    from leveret.consumer.ops.overview import QueueStatus
    from leveret.consumer.settings import WorkerSettings


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
READY waits for a worker, UNACKED is being worked on, DEAD sits in Q.dlq (see
`leveret dlq list Q`). Retries and delayed jobs wait out their delay in the
exchange's shared delay chain: its total is RETRYING on the line
`<exchange>.delay.*`. A work queue's own RETRYING counts only what still waits
in its queues of the old per-queue chains (Q.retry.*; `-` once they are gone).""",
)
@click.argument("app", required=False)
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option(
    "--interval",
    type=click.FloatRange(0.5),
    default=5.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
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
    from leveret.consumer.ops.overview import collect

    while True:
        rows, _source, note = run_async(collect(settings, queues))
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
