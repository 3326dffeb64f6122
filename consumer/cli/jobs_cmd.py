"""``leveret jobs`` and ``leveret stats``: the job history (``LEVERET_HISTORY_URL``) as tables.

Read straight from PostgreSQL through ``HistoryStore`` (the API's ``GET /jobs`` and
``GET /stats`` give the same). Without a history store: one line, exit 1.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from leveret.consumer.cli.common import command_setup, fail, run_async
from leveret.consumer.cli.history_cmd import guarded, history_store
from leveret.consumer.cli.tables import plain_table, print_table

if TYPE_CHECKING:
    from rich.table import Table

    from leveret.consumer.history.store import HistoryStore, JobRow, JobStats

STATES = ("started", "retrying", "succeeded", "dead", "cancelled")


def _since(value: str | None) -> Any:
    from leveret.consumer.history.store import InvalidQuery, parse_moment

    if value is None:
        return None
    try:
        return parse_moment(value)
    except InvalidQuery as exc:
        fail(str(exc))


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def jobs_table(rows: list[JobRow]) -> Table:
    table = plain_table()
    table.add_column("ID", no_wrap=True)
    for header in ("JOB", "QUEUE", "STATE"):
        table.add_column(header)
    table.add_column("ATTEMPTS", justify="right")
    table.add_column("CREATED (UTC)", no_wrap=True)
    table.add_column("DURATION", justify="right")
    table.add_column("ERROR", overflow="fold")
    for r in rows:
        error = (r.error or "")[:120]
        table.add_row(
            r.id,
            r.job,
            r.queue,
            r.state,
            str(r.attempts),
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _seconds(r.duration_s),
            error,
        )
    return table


def stats_table(stats: list[JobStats]) -> Table:
    table = plain_table()
    table.add_column("JOB")
    for header in (
        "TOTAL",
        "SUCCEEDED",
        "RETRYING",
        "DEAD",
        "CANCELLED",
        "RUNNING",
        "P50",
        "P95",
        "P99",
        "FAILURE",
    ):
        table.add_column(header, justify="right", no_wrap=True)
    for s in stats:
        c = s.counts
        rate = "-" if s.failure_rate is None else f"{s.failure_rate * 100:.1f}%"
        table.add_row(
            s.job,
            str(s.total),
            str(c["succeeded"]),
            str(c["retrying"]),
            str(c["dead"]),
            str(c["cancelled"]),
            str(c["started"]),
            _seconds(s.p50),
            _seconds(s.p95),
            _seconds(s.p99),
            rate,
        )
    return table


@click.command(
    epilog="""\b
Examples:
  leveret jobs                          the 50 newest jobs
  leveret jobs --state dead --since 1h  what died in the last hour
  leveret jobs --job send_email --json  one JSON object per line
Times: 90s, 30m, 1h, 2d, 1w (that long ago) or ISO 8601 with an offset.
Needs LEVERET_HISTORY_URL (the job history, `leveret history APP`).""",
)
@click.option("--state", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--job", "job_name", help="Only jobs of this name.")
@click.option("--queue", help="Only jobs of this queue.")
@click.option("--since", help="Created at or after (1h, or an ISO time).")
@click.option("--until", help="Created before (1h, or an ISO time).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="The next page: the cursor a previous listing printed.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job and line.")
@command_setup
def jobs(
    state: str | None,
    job_name: str | None,
    queue: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List jobs from the history, newest first."""
    store = history_store()
    since_at, until_at = _since(since), _since(until)

    async def read(s: HistoryStore) -> tuple[list[JobRow], str | None]:
        return await s.list_jobs(
            state=state,
            job=job_name,
            queue=queue,
            since=since_at,
            until=until_at,
            limit=limit,
            cursor=cursor,
        )

    rows, next_cursor = run_async(guarded(store, read))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row.to_json(), ensure_ascii=False))
    elif rows:
        print_table(jobs_table(rows))
    else:
        click.echo("no jobs in the history match", err=True)
    if next_cursor is not None:
        click.echo(f"more: --cursor {next_cursor}", err=True)


@click.command(
    epilog="""\b
Examples:
  leveret stats              the last 24 hours
  leveret stats --since 7d --json
Counts are jobs (one row each) by their last state; P50/P95/P99 are
handler durations of ended jobs; FAILURE is dead / ended.""",
)
@click.option("--since", default="24h", show_default=True, help="Jobs created since (1h, ISO).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job name and line.")
@command_setup
def stats(since: str, as_json: bool) -> None:
    """Per job name: counts per outcome, duration percentiles, failure rate."""
    store = history_store()
    since_at = _since(since)
    figures: list[JobStats] = run_async(guarded(store, lambda s: s.stats(since_at)))
    if as_json:
        for entry in figures:
            click.echo(json.dumps(entry.to_json()))
    elif figures:
        print_table(stats_table(figures))
    else:
        click.echo(f"no jobs in the history since {since}", err=True)
