"""``leveret dlq list|replay|purge Q``: what failed, why, and running it again."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable

import click

from ..dlq import DeadJob, DeadLetters, Filter, parse_duration
from .common import command_setup, fail, load_settings, run_async

_ERROR_WIDTH = 60


def _progress(verb: str) -> Callable[[int, int], None] | None:
    """A one-line counter on stderr, only for a person watching a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        click.echo(f"\r{verb} {done}/{total}…", err=True, nl=False)
        if end:
            click.echo("\r\033[K", err=True, nl=False)

    return show


def _cell(value: object, width: int | None = None) -> str:
    text = "-" if value is None else str(value)
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def _table_line(dead: DeadJob, widths: list[int]) -> str:
    cells = [
        _cell(dead.id),
        _cell(dead.job),
        _cell(dead.attempts),
        _cell(dead.reason),
        _cell(dead.died_at),
        _cell(dead.error, _ERROR_WIDTH),
    ]
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()


@click.group()
def dlq() -> None:
    """Inspect, replay and purge a work queue's dead jobs (Q.dlq)."""


@dlq.command(
    "list",
    epilog="""\b
Examples:
  leveret dlq list email
  leveret dlq list email --limit 20
  leveret dlq list email --json | jq -r 'select(.reason=="exhausted") | .id'
Read-only: messages are read with manual acks, never acked, and requeued in
place; the DLQ keeps its order, bodies and headers. The broker marks them
redelivered, which a replay ignores.""",
)
@click.argument("queue")
@click.option("--limit", type=click.IntRange(1), help="Show at most N jobs (the oldest first).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--job", help="Only jobs of this name.")
@click.option("--reason", help="Only this x-reason (exhausted, rejected, invalid, unknown_job).")
@command_setup
def list_(
    queue: str, limit: int | None, as_json: bool, job: str | None, reason: str | None
) -> None:
    """List the dead jobs of work queue QUEUE: id, job, attempts, reason, when, error."""
    settings = load_settings()
    widths = [36, 20, 8, 11, 29]

    async def run() -> int:
        shown = 0
        async with DeadLetters(settings, queue) as dead_letters:
            if not as_json:
                header = ["ID", "JOB", "ATTEMPTS", "REASON", "DIED AT", "ERROR"]
                click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
            rows = dead_letters.list(limit, Filter(job=job, reason=reason), _progress("listing"))
            async with contextlib.aclosing(rows) as jobs:
                async for dead in jobs:
                    line = json.dumps(dead.row()) if as_json else _table_line(dead, widths)
                    click.echo(line)
                    shown += 1
        return shown

    shown = run_async(run())
    click.echo(f"{shown} dead job(s) in {queue}.dlq listed", err=True)


@dlq.command(
    epilog="""\b
Examples:
  leveret dlq replay email --id 1b4e28ba-2fa1-11d2-883f-0016d3cca427
  leveret dlq replay email --job send_email --reason exhausted
  leveret dlq replay email --limit 100 --dry-run
Each job is published to QUEUE with confirms and its attempt count reset, and
only then removed from the DLQ: an interruption leaves every job in one queue
or the other (at worst in both). Prints how many moved; filters combine.""",
)
@click.argument("queue")
@click.option("--id", "ids", multiple=True, help="Only this job id (repeatable).")
@click.option("--job", help="Only jobs of this name.")
@click.option("--reason", help="Only this x-reason (exhausted, rejected, invalid, unknown_job).")
@click.option("--limit", type=click.IntRange(1), help="Move at most N jobs (the oldest first).")
@click.option("--dry-run", is_flag=True, help="Count what would move; move nothing.")
@command_setup
def replay(
    queue: str,
    ids: tuple[str, ...],
    job: str | None,
    reason: str | None,
    limit: int | None,
    dry_run: bool,
) -> None:
    """Move dead jobs of QUEUE back to QUEUE and print how many moved."""
    settings = load_settings()
    where = Filter(ids=frozenset(ids), job=job, reason=reason)

    async def run() -> int:
        async with DeadLetters(settings, queue) as dead_letters:
            return await dead_letters.replay(
                where, limit, dry_run=dry_run, on_progress=_progress("scanned")
            )

    moved = run_async(run())
    click.echo(moved)
    verb = "would move" if dry_run else "moved"
    click.echo(f"{verb} {moved} job(s) from {queue}.dlq to {queue} ({where.describe()})", err=True)


@dlq.command(
    epilog="""\b
Examples:
  leveret dlq purge email --id 1b4e28ba-2fa1-11d2-883f-0016d3cca427
  leveret dlq purge email --older-than 7d --yes
On a terminal it shows how many jobs match and asks first, unless --yes. In a
script, a pipe or cron it deletes what matches without asking, as the command
line says. Prints how many were deleted.""",
)
@click.argument("queue")
@click.option("--id", "ids", multiple=True, help="Only this job id (repeatable).")
@click.option(
    "--older-than",
    metavar="DURATION",
    help="Only jobs that died longer ago than this: 90s, 30m, 2h, 7d.",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@command_setup
def purge(queue: str, ids: tuple[str, ...], older_than: str | None, yes: bool) -> None:
    """Delete dead jobs from QUEUE.dlq and print how many."""
    try:
        older_than_s = parse_duration(older_than) if older_than is not None else None
    except ValueError as exc:
        fail(str(exc))
    where = Filter(ids=frozenset(ids), older_than_s=older_than_s)
    # Ask only where someone can answer; a script already said what to delete.
    ask = not yes and sys.stdin.isatty()
    settings = load_settings()

    async def run() -> int:
        async with DeadLetters(settings, queue) as dead_letters:
            if ask:
                matching = (
                    await dead_letters.depth() if where.empty else await dead_letters.count(where)
                )
                if matching == 0:
                    return 0
                question = (
                    f"Delete {matching} job(s) from {queue}.dlq ({where.describe()})? "
                    f"This cannot be undone."
                )
                if not click.confirm(question, err=True):
                    fail("nothing deleted", code=1)
            return await dead_letters.purge(where)

    deleted = run_async(run())
    click.echo(deleted)
    click.echo(f"deleted {deleted} job(s) from {queue}.dlq ({where.describe()})", err=True)
