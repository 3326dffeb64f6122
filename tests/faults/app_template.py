"""The app the subprocess fault tests run with ``leveret worker``; copied into tmp_path.

Each handler run appends one line to ``$FAULT_LOG`` with ``O_APPEND`` (atomic for short lines,
even across processes), so the test can count runs by job id after any crash.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from leveret.consumer import JobContext, Worker

worker = Worker()
QUEUE = os.environ["FAULT_QUEUE"]
MARKS = os.environ.get("FAULT_MARKS", "")
_LOG = os.open(os.environ["FAULT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_PID = os.getpid()


class Step(BaseModel):
    sleep: float = 0.0  # seconds, on the first run only (a marker file remembers)
    crash: bool = False  # kill the whole worker process from inside the handler
    pause: float = 0.0  # seconds, on every run


@worker.job(f"{QUEUE}-job", queue=QUEUE, max_attempts=3, backoff=0)
async def job(step: Step, ctx: JobContext) -> None:
    os.write(_LOG, f"start {_PID} {ctx.job_id} {ctx.attempt}\n".encode())
    if step.crash:
        os._exit(17)
    if step.pause:
        await asyncio.sleep(step.pause)
    if step.sleep:
        try:  # O_EXCL: only the first run of this id sleeps
            os.close(os.open(os.path.join(MARKS, ctx.job_id), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            await asyncio.sleep(step.sleep)
    os.write(_LOG, f"done {_PID} {ctx.job_id} {ctx.attempt}\n".encode())
