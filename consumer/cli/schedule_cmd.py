"""``leveret schedule list [APP]``: recurring jobs and when each fires next; ``leveret schedule
add|remove``: runtime schedules (``producers.schedules``).

The app's schedules are read from the app alone (no broker): the next fire time is a pure
function of the schedule and the clock (``Schedule.next_after``), the same one every replica
computes. Runtime schedules are read from the status store's Redis (``LEVERET_STATUS_URL``),
for the exchange ``LEVERET_EXCHANGE``; the app's scheduler leader fires both.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from leveret.consumer.cli.common import command_setup, fail, load_app, load_settings, run_async
from leveret.consumer.cli.tables import plain_table, print_table
from leveret.consumer.features.schedules.spec import Schedule, format_tick, from_runtime
from leveret.producers import ScheduleStore, build_schedule


@click.group()
def schedule() -> None:
    """Recurring jobs: the app's own (worker.schedule) and runtime ones (add/remove)."""


def _row(s: Schedule, now: datetime, source: str = "app") -> dict[str, str]:
    return {
        "name": s.name,
        "job": s.job,
        "expression": s.expression,
        "tz": s.tz,
        "next_fire_utc": format_tick(s.next_after(now)),
        "missed": s.missed,
        "source": source,
    }


def _store() -> ScheduleStore:
    """The runtime schedules of ``LEVERET_EXCHANGE`` on ``LEVERET_STATUS_URL``."""
    settings = load_settings()
    if settings.status_url is None:
        fail("runtime schedules are kept in Redis: set LEVERET_STATUS_URL")
    return ScheduleStore.from_url(settings.status_url.get_secret_value(), settings.exchange)


async def _runtime_rows(now: datetime) -> list[dict[str, str]]:
    store = _store()
    try:
        stored = await store.list()
    finally:
        await store.close()
    return [_row(from_runtime(r), now, "runtime") for r in stored]


@schedule.command(
    "list",
    epilog="""\b
Examples:
  leveret schedule list myapp.tasks:worker
  leveret schedule list myapp.tasks:worker --json | jq -r .next_fire_utc
  LEVERET_STATUS_URL=redis://… leveret schedule list    # runtime schedules only
A tick's job id is NAME@<tick time in UTC>, e.g. cleanup@2027-01-01T08:00:00Z.
With LEVERET_STATUS_URL the runtime schedules are listed too (SOURCE runtime).
An app with a bad expression, an unknown time zone or an unregistered job is
refused with one line, as `leveret worker` would refuse it.""",
)
@click.argument("app", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@command_setup
def list_(app: str | None, as_json: bool) -> None:
    """List APP's schedules and the runtime ones: name, job, expression, time zone, next fire
    time (UTC), source."""
    now = datetime.now(UTC)
    rows = [_row(s, now) for s in load_app(app).schedules] if app else []
    if app is None or load_settings().status_url is not None:
        rows += run_async(_runtime_rows(now))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        table = plain_table()
        titles = ("NAME", "JOB", "EXPRESSION", "TZ", "NEXT FIRE (UTC)", "MISSED", "SOURCE")
        for title in titles:
            table.add_column(title, overflow="fold")
        for row in rows:
            table.add_row(*row.values())
        print_table(table)
    click.echo(f"{len(rows)} schedule(s)" + (f" in {app}" if app else ""), err=True)


@schedule.command(
    "add",
    epilog="""\b
Examples:
  leveret schedule add nightly report --cron "0 2 * * *" --tz Europe/Paris --payload '{"days": 1}'
  leveret schedule add ping healthcheck --every 30
Kept in LEVERET_STATUS_URL's Redis for LEVERET_EXCHANGE; fired by the app's
scheduler leader once per tick from within about a second. Adding an existing
NAME replaces it (and it starts afresh).""",
)
@click.argument("name")
@click.argument("job")
@click.option("--cron", default=None, help="A 5-field (or 6, seconds first) cron expression.")
@click.option("--every", type=float, default=None, help="Seconds between ticks.")
@click.option("--tz", default="UTC", show_default=True, help="IANA time zone of --cron.")
@click.option("--payload", default="{}", show_default=True, help="The job's payload, JSON.")
@click.option(
    "--missed", type=click.Choice(["once", "skip"]), default="once", show_default=True,
    help="Ticks missed while no worker ran: fire the latest once, or skip them.",
)  # fmt: skip
@command_setup
def add(
    name: str, job: str, cron: str | None, every: float | None, tz: str, payload: str, missed: str
) -> None:
    """Add (or replace) the runtime schedule NAME firing JOB."""
    try:
        body = json.loads(payload)
    except ValueError as exc:
        fail(f"--payload is not JSON: {exc}")
    if not isinstance(body, dict):
        fail("--payload must be a JSON object")
    try:
        built = build_schedule(
            name, job, cron=cron, every=every, tz=tz, payload=body, missed=missed
        )
    except ValueError as exc:  # InvalidValueError: what is wrong, in one line
        fail(str(exc))

    async def put() -> bool:
        store = _store()
        try:
            return await store.add(built)
        finally:
            await store.close()

    created = run_async(put())
    next_fire = format_tick(from_runtime(built).next_after(datetime.now(UTC)))
    click.echo(f"{'added' if created else 'replaced'} {name}: {job} {built.expression} ({tz}), "
               f"next fire {next_fire}")  # fmt: skip


@schedule.command("remove")
@click.argument("name")
@command_setup
def remove(name: str) -> None:
    """Remove the runtime schedule NAME (it stops firing within about a second)."""

    async def drop() -> bool:
        store = _store()
        try:
            return await store.remove(name)
        finally:
            await store.close()

    if not run_async(drop()):
        fail(f"no runtime schedule named {name!r}")
    click.echo(f"removed {name}")
