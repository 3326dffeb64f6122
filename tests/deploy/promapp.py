"""The worker app the deployment tests run: one job that succeeds, one that fails once and
then succeeds (retried), one that always fails (retried, then dead-lettered). The queue name
comes from DEPLOYTEST_QUEUE so every test run uses its own."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from leveret.consumer import JobContext, Worker

QUEUE = os.environ.get("DEPLOYTEST_QUEUE", "deploytest")

worker = Worker()


class P(BaseModel):
    n: int


@worker.job("ok_job", queue=QUEUE, max_attempts=2, backoff=1.0)
async def ok_job(p: P) -> None:
    # Long enough to show up in the in-progress gauge and spread over duration buckets.
    await asyncio.sleep(0.02 * (p.n % 5))


@worker.job("flaky_job", queue=QUEUE, max_attempts=2, backoff=1.0)
async def flaky_job(p: P, ctx: JobContext) -> None:
    if ctx.attempt == 1:
        raise ConnectionError(f"dependency timed out for {p.n} (first attempt only)")


@worker.job("doomed_job", queue=QUEUE, max_attempts=2, backoff=1.0)
async def doomed_job(p: P) -> None:
    raise ValueError(f"payload {p.n} can never succeed")
