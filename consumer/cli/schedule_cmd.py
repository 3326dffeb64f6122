"""``leveret schedule list APP``: an app's recurring jobs and when each fires next.

Read from the app alone (no broker): the next fire time is a pure function of the schedule and
the clock (``Schedule.next_after``), the same one every replica computes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from leveret.consumer.cli.common import command_setup, load_app
from leveret.consumer.cli.tables import plain_table, print_table
from leveret.consumer.features.schedules.spec import Schedule, format_tick


@click.group()
def schedule() -> None:
    """Inspect the recurring jobs an app declares with worker.schedule(...)."""


def _row(s: Schedule, now: datetime) -> dict[str, str]:
    return {
        "name": s.name,
        "job": s.job,
        "expression": s.expression,
        "tz": s.tz,
        "next_fire_utc": format_tick(s.next_after(now)),
        "missed": s.missed,
    }


@schedule.command(
    "list",
    epilog="""\b
Examples:
  leveret schedule list myapp.tasks:worker
  leveret schedule list myapp.tasks:worker --json | jq -r .next_fire_utc
A tick's job id is NAME@<tick time in UTC>, e.g. cleanup@2027-01-01T08:00:00Z.
An app with a bad expression, an unknown time zone or an unregistered job is
refused with one line, as `leveret worker` would refuse it.""",
)
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@command_setup
def list_(app: str, as_json: bool) -> None:
    """List APP's schedules: name, job, expression, time zone, next fire time (UTC)."""
    app_worker = load_app(app)
    now = datetime.now(UTC)
    rows = [_row(s, now) for s in app_worker.schedules]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        table = plain_table()
        for title in ("NAME", "JOB", "EXPRESSION", "TZ", "NEXT FIRE (UTC)", "MISSED"):
            table.add_column(title, overflow="fold")
        for row in rows:
            table.add_row(*row.values())
        print_table(table)
    click.echo(f"{len(rows)} schedule(s) in {app}", err=True)
