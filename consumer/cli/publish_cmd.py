"""``leveret publish JOB JSON``."""

from __future__ import annotations

import json
from datetime import datetime

import click

from leveret.consumer.cli.common import command_setup, fail, load_settings, run_async
from leveret.producers import Publisher, delay_seconds
from leveret.topology.errors import InvalidDelayError


@click.command(
    epilog="""\b
Examples:
  leveret publish send_email '{"to": "a@b.c", "subject": "hi"}'
  leveret publish send_email '{"to": "a@b.c", "subject": "hi"}' --priority 7 --delay 30
  leveret publish report '{}' --eta 2027-01-01T09:00:00+01:00
  leveret publish charge '{"invoice": 42}' --dedup-key invoice-42
Prints the job id once the broker confirmed the job; exits non-zero when no
queue is bound for JOB or the broker refuses it."""
)
@click.argument("job")
@click.argument("payload", metavar="JSON")
@click.option("--priority", type=click.IntRange(0, 9), help="0-9, higher runs first.")
@click.option("--delay", type=click.FloatRange(0), help="Seconds to wait before it may run.")
@click.option(
    "--eta",
    metavar="ISO",
    help="Time it may run, ISO 8601 with a UTC offset or Z (e.g. 2027-01-01T09:00:00+01:00); "
    "a past time runs now.",
)
@click.option("--id", "job_id", help="Job id (default: a new UUID).")
@click.option(
    "--dedup-key",
    metavar="KEY",
    help="While a job published with KEY is queued, retrying or running, print its id and "
    "enqueue nothing (needs LEVERET_STATUS_URL).",
)
@command_setup
def publish(
    job: str,
    payload: str,
    priority: int | None,
    delay: float | None,
    eta: str | None,
    job_id: str | None,
    dedup_key: str | None,
) -> None:
    """Publish one job JOB with payload JSON and print its id."""
    if delay is not None and eta is not None:
        fail("give --delay or --eta, not both")
    when = _eta(eta) if eta is not None else None
    try:  # refused before connecting: a bad time never costs a broker round trip
        delay_seconds(delay, when)
    except InvalidDelayError as exc:
        fail(str(exc).replace("eta=", "--eta "))
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as exc:
        fail(
            f"JSON is not valid JSON ({exc.msg} at character {exc.pos}); quote it in single "
            f'quotes, e.g. \'{{"to": "a@b.c"}}\''
        )
    if not isinstance(body, dict):
        fail(f"JSON must be an object ({{...}}), not {type(body).__name__}")
    settings = load_settings()

    async def run() -> str:
        async with Publisher(settings=settings) as pub:
            return await pub.publish(
                job,
                body,
                priority=priority,
                delay=delay,
                eta=when,
                job_id=job_id,
                dedup_key=dedup_key,
            )

    click.echo(run_async(run()))


def _eta(text: str) -> datetime:
    """``--eta`` as an aware datetime; a naive one is refused like a naive ``eta=``."""
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        fail(f"--eta {text!r} is not an ISO 8601 time: use e.g. 2027-01-01T09:00:00+01:00")
    if when.tzinfo is None:
        fail(
            f"--eta {text} has no UTC offset, so its instant is unknown: add one, "
            f"e.g. {when.isoformat()}+01:00 or {when.isoformat()}Z"
        )
    return when
