"""The app the lifecycle crash tests run with ``leveret worker``; copied into tmp_path.

``slow`` sleeps on its first run only (a marker file remembers), so a test can SIGKILL the
worker mid-job. ``parent`` enqueues a ``child``; with ``LC_CRASH_BEFORE_ACK`` set, the process
kills itself right after its first outcome was confirmed and before the ack is sent: the crash
between a handler's success and its ack that chaining must survive.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from leveret.consumer import JobContext, Worker
from leveret.consumer.delivery.acker import Acker

worker = Worker()
QUEUE = os.environ["LC_QUEUE"]
MARKS = os.environ["LC_MARKS"]
_LOG = os.open(os.environ["LC_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def first_time(name: str) -> bool:
    try:
        os.close(os.open(os.path.join(MARKS, name), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


if os.environ.get("LC_CRASH_BEFORE_ACK"):
    _ack = Acker.ack

    def crashing_ack(self: Acker, tag: int) -> None:
        if first_time("crash-before-ack"):
            os._exit(9)  # the outcome's publishes are confirmed; the ack never leaves
        _ack(self, tag)

    Acker.ack = crashing_ack  # type: ignore[method-assign]


@worker.job(f"{QUEUE}-slow", queue=QUEUE, max_attempts=3, backoff=0)
async def slow(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    os.write(_LOG, f"start slow {ctx.job_id} {ctx.attempt}\n".encode())
    if first_time(ctx.job_id):
        await asyncio.sleep(payload.get("sleep", 30))
    return {"attempt": ctx.attempt}


@worker.job(f"{QUEUE}-parent", queue=QUEUE, max_attempts=3, backoff=0)
async def parent(payload: dict[str, Any], ctx: JobContext) -> None:
    child = await ctx.enqueue(f"{QUEUE}-child", {"parent": ctx.job_id})
    os.write(_LOG, f"enqueue parent {ctx.job_id} {child}\n".encode())


@worker.job(f"{QUEUE}-child", queue=QUEUE)
async def child(payload: dict[str, Any], ctx: JobContext) -> None:
    os.write(_LOG, f"run child {ctx.job_id} {payload['parent']}\n".encode())
