"""``leveret publish JOB JSON``."""

from __future__ import annotations

import json

import click

from leveret.producers.publisher import Publisher

from .common import command_setup, fail, load_settings, run_async


@click.command(
    epilog="""\b
Examples:
  leveret publish send_email '{"to": "a@b.c", "subject": "hi"}'
  leveret publish send_email '{"to": "a@b.c", "subject": "hi"}' --priority 7 --delay 30
Prints the job id once the broker confirmed the job; exits non-zero when no
queue is bound for JOB or the broker refuses it."""
)
@click.argument("job")
@click.argument("payload", metavar="JSON")
@click.option("--priority", type=click.IntRange(0, 9), help="0-9, higher runs first.")
@click.option("--delay", type=click.FloatRange(0), help="Seconds to wait before it may run.")
@click.option("--id", "job_id", help="Job id (default: a new UUID).")
@command_setup
def publish(
    job: str, payload: str, priority: int | None, delay: float | None, job_id: str | None
) -> None:
    """Publish one job JOB with payload JSON and print its id."""
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as exc:
        fail(f"JSON is not valid JSON ({exc.msg} at character {exc.pos}); quote it in single "
             f"quotes, e.g. '{{\"to\": \"a@b.c\"}}'")  # fmt: skip
    if not isinstance(body, dict):
        fail(f"JSON must be an object ({{...}}), not {type(body).__name__}")
    settings = load_settings()

    async def run() -> str:
        async with Publisher(settings=settings) as pub:
            return await pub.publish(job, body, priority=priority, delay=delay, job_id=job_id)

    click.echo(run_async(run()))
