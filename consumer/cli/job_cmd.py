"""``leveret job show ID``: one job's status, as JSON, from the status store.

Reads ``LEVERET_STATUS_URL`` (Redis) like the publisher's ``status()``; the object printed is
the contract's status object. An unknown id, or no status store configured, is one line on
stderr and a non-zero exit: a script can tell "no such job" from a job in any state.
"""

from __future__ import annotations

import json

import click

from leveret.consumer.cli.common import command_setup, fail, run_async
from leveret.producers.stores import JobStatus, LifecycleSettings, RedisStatusStore


@click.group()
def job() -> None:
    """Look up jobs by id (needs LEVERET_STATUS_URL)."""


async def _read(url: str, job_id: str) -> JobStatus | None:
    store = RedisStatusStore.from_url(url)
    try:
        return await store.get(job_id)
    finally:
        await store.close()


@job.command("show")
@click.argument("job_id")
@command_setup
def show(job_id: str) -> None:
    """Print the status of job JOB_ID as JSON: state, attempt, result, error, progress.

    \b
    Example:
      LEVERET_STATUS_URL=redis://localhost:6379/0 leveret job show 5f0c…
    """
    settings = LifecycleSettings()
    if settings.status_url is None:
        fail("no status store: set LEVERET_STATUS_URL (e.g. redis://localhost:6379/0)")
    status = run_async(_read(settings.status_url.get_secret_value(), job_id))
    if status is None:
        fail(f"no status for job {job_id} (unknown id, expired, or never published)")
    click.echo(json.dumps(status.model_dump(mode="json"), indent=2, ensure_ascii=False))
