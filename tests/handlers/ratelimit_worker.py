"""One worker process of the rate-limit test: logs each handler start (job, attempt, time)."""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import time
from typing import Any

from pydantic import BaseModel

from leveret.consumer import JobContext, Worker
from leveret.consumer.features.ratelimit.limiters import GlobalLimiters, LocalLimiter
from leveret.consumer.runtime import startup as startup_module

# When the global limiter admitted this delivery's start (its own clock, under the broker-side
# mutex), beside when the handler started: the limit is a guarantee about admissions.
ADMITTED: contextvars.ContextVar[float] = contextvars.ContextVar("admitted", default=0.0)
_make = GlobalLimiters._make
LOCAL_ADMITTED: contextvars.ContextVar[float] = contextvars.ContextVar("local", default=0.0)


class _RecordingLocal(LocalLimiter):
    """Records each admission (this process's monotonic clock) for the handler to log."""

    def _admit(self) -> float:
        wait = super()._admit()
        if wait == 0.0:
            LOCAL_ADMITTED.set(self.last_start or 0.0)
        return wait


startup_module.LocalLimiter = _RecordingLocal  # type: ignore[misc]


class _Recording:
    def __init__(self, inner: Any) -> None:
        self.inner, self.rate = inner, inner.rate

    async def try_acquire(self) -> float:
        wait = float(await self.inner.try_acquire())
        if wait == 0.0:
            ADMITTED.set(self.inner.last_start)
        return wait

    async def acquire(self) -> None:
        while (wait := await self.try_acquire()) > 0.0:  # noqa: ASYNC110
            await asyncio.sleep(wait)


async def _recording_make(self: GlobalLimiters, job: str, rate: Any) -> Any:
    return _Recording(await _make(self, job, rate))


GlobalLimiters._make = _recording_make  # type: ignore[method-assign]

if os.environ.get("RL_TRACE_POSTPONE"):  # diagnostics: one line per postponement
    from leveret.consumer.delivery.settle import Settler

    _postpone = Settler.postpone

    async def _traced(self: Settler, d: Any, delay_s: float) -> None:
        OUT.write(f"#postponed {d.name} {time.time():.6f} {delay_s:.3f}\n")
        await _postpone(self, d, delay_s)

    Settler.postpone = _traced  # type: ignore[method-assign]

QUEUE = os.environ["RL_QUEUE"]
OUT = open(sys.argv[1], "a", buffering=1)  # noqa: SIM115 - one line per start, flushed

worker = Worker()


class P(BaseModel):
    n: int


@worker.job(f"{QUEUE}-local", queue=QUEUE, rate_limit=os.environ["RL_LOCAL"])
async def local(p: P, ctx: JobContext) -> None:
    OUT.write(f"local {p.n} {ctx.attempt} {time.time():.6f} {LOCAL_ADMITTED.get():.6f}\n")


@worker.job(f"{QUEUE}-global", queue=f"{QUEUE}-g", global_rate_limit=os.environ["RL_GLOBAL"])
async def global_(p: P, ctx: JobContext) -> None:
    OUT.write(f"global {p.n} {ctx.attempt} {time.time():.6f} {ADMITTED.get():.6f}\n")


@worker.job(f"{QUEUE}-free", queue=QUEUE)
async def free(p: P, ctx: JobContext) -> None:
    OUT.write(f"free {p.n} {ctx.attempt} {time.time():.6f}\n")


if __name__ == "__main__":
    asyncio.run(worker.run(handle_signals=True))
