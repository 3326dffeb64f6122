"""``leveret dlq list|replay|purge Q``: what failed, why, and running it again.

Commands that "print how many" print the number alone on stdout (scripts read it); the sentence
saying what it means goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from leveret.consumer.cli.common import command_setup, fail, load_settings, run_async
from leveret.consumer.cli.tables import plain_table, print_table

# The DLQ tools (and rich, which draws their tables) load when a dlq command runs, not when the
# CLI starts: `leveret worker` imports this module too (tests/package/test_lean_imports.py).
if TYPE_CHECKING:
    from rich.table import Table

    from leveret.consumer.ops.dlq import DeadJob, Filter


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


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def dead_jobs_table() -> Table:
    """ID, job, attempts, reason, when, and the error: long cells fold, none is dropped.

    No ``min_width`` on the error column: rich (15.0) wraps a cell to its ``min_width`` and
    then crops it to the narrower width a small terminal leaves, losing letters; folding to
    the width it gets keeps every character.
    """
    table = plain_table()
    table.add_column("ID", overflow="fold")
    table.add_column("JOB", overflow="fold")
    table.add_column("ATTEMPTS", justify="right", no_wrap=True)
    table.add_column("REASON", overflow="fold")
    table.add_column("DIED AT", overflow="fold")
    table.add_column("ERROR", overflow="fold")
    return table


def add_dead_job(table: Table, dead: DeadJob) -> None:
    error = dead.error.replace("\r", " ").replace("\n", " ") if dead.error else None
    table.add_row(
        _cell(dead.id),
        _cell(dead.job),
        _cell(dead.attempts),
        _cell(dead.reason),
        _cell(dead.died_at),
        _cell(error),
    )


def _filters(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The selection ``replay`` and ``purge`` share; every given criterion must hold."""
    options = [
        click.option("--id", "ids", multiple=True, help="Only this job id (repeatable)."),
        click.option("--job", help="Only jobs of this name."),
        click.option(
            "--reason", help="Only this x-reason (exhausted, rejected, invalid, unknown_job)."
        ),
        click.option(
            "--older-than",
            metavar="DURATION",
            help="Only jobs that died longer ago than this: 90s, 30m, 2h, 7d.",
        ),
        click.option("--limit", type=click.IntRange(1), help="At most N jobs (the oldest first)."),
        click.option("--dry-run", is_flag=True, help="Count what would be done; change nothing."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _where(
    ids: tuple[str, ...], job: str | None, reason: str | None, older_than: str | None
) -> Filter:
    from leveret.consumer.ops.dlq import Filter, InvalidDurationError, parse_duration

    try:
        older_than_s = parse_duration(older_than) if older_than is not None else None
    except InvalidDurationError as exc:
        fail(str(exc))
    return Filter(ids=frozenset(ids), job=job, reason=reason, older_than_s=older_than_s)


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
    from leveret.consumer.ops.dlq import DeadLetters, Filter

    settings = load_settings()

    async def run() -> tuple[int, Table]:
        table = dead_jobs_table()
        shown = 0
        async with DeadLetters(settings, queue) as dead_letters:
            rows = dead_letters.list(limit, Filter(job=job, reason=reason), _progress("listing"))
            async with contextlib.aclosing(rows) as jobs:
                async for dead in jobs:
                    if as_json:
                        click.echo(json.dumps(dead.row()))
                    else:
                        add_dead_job(table, dead)
                    shown += 1
        return shown, table

    shown, table = run_async(run())
    if not as_json:
        print_table(table)
    click.echo(f"{shown} dead job(s) in {queue}.dlq listed", err=True)


def _what(where: Filter, limit: int | None) -> str:
    return where.describe() + (f", at most {limit}" if limit is not None else "")


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
@_filters
@command_setup
def replay(
    queue: str,
    ids: tuple[str, ...],
    job: str | None,
    reason: str | None,
    older_than: str | None,
    limit: int | None,
    dry_run: bool,
) -> None:
    """Move dead jobs of QUEUE back to QUEUE and print how many moved."""
    from leveret.consumer.ops.dlq import DeadLetters

    where = _where(ids, job, reason, older_than)
    settings = load_settings()

    async def run() -> int:
        async with DeadLetters(settings, queue) as dead_letters:
            return await dead_letters.replay(
                where, limit, dry_run=dry_run, on_progress=_progress("scanned")
            )

    moved = run_async(run())
    click.echo(moved)
    verb = "would move" if dry_run else "moved"
    click.echo(
        f"{verb} {moved} job(s) from {queue}.dlq to {queue} ({_what(where, limit)})", err=True
    )


@dlq.command(
    epilog="""\b
Examples:
  leveret dlq purge email --id 1b4e28ba-2fa1-11d2-883f-0016d3cca427
  leveret dlq purge email --older-than 7d --reason exhausted
  leveret dlq purge email --job send_email --dry-run
  leveret dlq purge email --yes             everything, in a script
On a terminal it shows how many jobs match and asks first, unless --yes. In a
script, a pipe or cron a filtered purge deletes what matches without asking;
deleting everything (no --id and no filter) needs --yes there. Prints how
many were deleted (with --dry-run: would be).""",
)
@click.argument("queue")
@_filters
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@command_setup
def purge(
    queue: str,
    ids: tuple[str, ...],
    job: str | None,
    reason: str | None,
    older_than: str | None,
    limit: int | None,
    dry_run: bool,
    yes: bool,
) -> None:
    """Delete dead jobs from QUEUE.dlq and print how many."""
    from leveret.consumer.ops.dlq import DeadLetters

    where = _where(ids, job, reason, older_than)
    # Ask only where someone can answer. Elsewhere a filter says what to delete; deleting the
    # whole DLQ from a script must be said explicitly, so a stray command in cron cannot.
    terminal = sys.stdin.isatty()
    if where.empty and not yes and not dry_run and not terminal:
        fail(
            f"this would delete every job in {queue}.dlq: add --yes to do so without a "
            f"terminal, or select jobs with --id, --job, --reason or --older-than "
            f"(--dry-run counts them)",
            code=2,
        )
    ask = not yes and not dry_run and terminal
    settings = load_settings()

    async def run() -> int:
        async with DeadLetters(settings, queue) as dead_letters:
            if ask:
                matching = await dead_letters.purge(where, limit=limit, dry_run=True)
                if matching == 0:
                    return 0
                question = (
                    f"Delete {matching} job(s) from {queue}.dlq ({_what(where, limit)})? "
                    f"This cannot be undone."
                )
                if not click.confirm(question, err=True):
                    fail("nothing deleted", code=1)
            return await dead_letters.purge(where, limit=limit, dry_run=dry_run)

    deleted = run_async(run())
    click.echo(deleted)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {deleted} job(s) from {queue}.dlq ({_what(where, limit)})", err=True)
