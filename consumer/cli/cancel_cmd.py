"""``leveret cancel ID``: cancel a job (``Publisher.cancel``), then print its state.

Needs ``LEVERET_STATUS_URL`` (the cancel is a mark in the status store that every worker
honours, plus a broadcast to the running ones on the broker). An unknown id, a job that has
already ended, or no status store is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import click

from leveret.consumer.cli.common import command_setup, fail, load_settings, run_async
from leveret.producers import Publisher
from leveret.producers.stores import LifecycleSettings


@click.command(
    epilog="""\b
Example:
  LEVERET_STATUS_URL=redis://localhost:6379/0 leveret cancel 5f0c…
A queued, delayed or retrying job never runs again; a running job registered
with cancellable=True is cancelled now, any other finishes its current run."""
)
@click.argument("job_id")
@command_setup
def cancel(job_id: str) -> None:
    """Cancel job JOB_ID and print its state (cancellation requested)."""
    status_url = LifecycleSettings().status_url
    if status_url is None:
        fail("no status store: set LEVERET_STATUS_URL (e.g. redis://localhost:6379/0)")
    url, settings = status_url.get_secret_value(), load_settings()

    async def run() -> str:
        async with Publisher(settings=settings, status_url=url) as pub:
            before = await pub.cancel(job_id)
            after = await pub.status(job_id)
        state = after.state if after is not None else before.state
        return f"{job_id}: cancel requested (state: {state})"

    click.echo(run_async(run()))
