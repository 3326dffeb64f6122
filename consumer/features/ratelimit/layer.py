"""``RateLimited``: the chain layer that admits a run under its job's rate limits, or gives the
job back for later (``Postponed``) before anything ran.

The limiters themselves (per process, on Redis, on the broker) are in ``ratelimit``; this is
only the policy of when to wait holding the delivery and when to postpone through the delay
chain.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any, Protocol

from leveret.consumer.delivery.outcomes import Postponed
from leveret.consumer.features.ratelimit.limiters import LimiterUnavailable, LocalLimiter, Rate

if TYPE_CHECKING:
    from leveret.consumer.context import JobContext
    from leveret.consumer.delivery.middleware import CallNext


class _Limiter(Protocol):
    rate: Rate

    async def acquire(self) -> None: ...


class GlobalLimiter(_Limiter, Protocol):
    async def try_acquire(self) -> float: ...


class RateLimited:
    """Admits a run under the job's per-process and global limits, or postpones it.

    A short wait (at most ``max_hold_s``) is waited out holding the delivery, since a round trip
    through the delay chain costs more than it saves; a longer one, or one more waiter than
    ``max_waiting`` (half the prefetch share), gives the job back, so a limited job never holds
    every prefetch slot and other jobs on the queue keep running. Postponed jobs are spread one
    start interval apart (``_spread``) so a backlog comes back at the rate it can start, not all
    at once to be given back again.

    The global limiter's store failing (``LimiterUnavailable``: Redis down or hanging, the
    broker limiter's connection lost) is not the run's outcome: the job is postponed like one
    over its limit, same attempt, nothing ran; ``StoreOutage`` logs the outage once.
    """

    __slots__ = (
        "_blocked_until",
        "_global",
        "_local",
        "_max_hold",
        "_max_waiting",
        "_next",
        "_waiting",
    )

    def __init__(
        self,
        local: LocalLimiter | None,
        global_: GlobalLimiter | None,
        max_waiting: int,
        max_hold_s: float = 1.0,
    ) -> None:
        self._local = local
        self._global = global_
        self._max_waiting = max(1, max_waiting)
        self._max_hold = max_hold_s
        self._waiting = 0
        self._next = 0.0  # monotonic time the next postponed job is asked to come back at
        # Until when the global limiter last said it is full: deliveries arriving before then
        # are postponed without asking it again (a broker-side check is four round trips,
        # serialised per process; asking for every delivery of a backlog would starve the
        # queue's other jobs of the worker's attention).
        self._blocked_until = 0.0

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        local = self._local
        if local is not None:
            wait = local.try_acquire()
            if wait:
                await self._wait_or_postpone(local, wait)
        limiter = self._global
        if limiter is not None:
            try:
                await self._admit_global(limiter)
            except LimiterUnavailable as exc:
                raise Postponed(exc.retry_in, f"rate limit {limiter.rate} unavailable") from None
        return await call_next(ctx)

    async def _admit_global(self, limiter: GlobalLimiter) -> None:
        blocked = self._blocked_until - time.monotonic()
        if blocked > 0 and (blocked > self._max_hold or self._waiting >= self._max_waiting):
            raise Postponed(
                self._spread(blocked, limiter.rate), f"rate limit {limiter.rate} reached"
            )
        wait = await limiter.try_acquire()
        if wait:
            self._blocked_until = time.monotonic() + wait
            await self._wait_or_postpone(limiter, wait)

    async def _wait_or_postpone(self, limiter: _Limiter, wait: float) -> None:
        if wait > self._max_hold or self._waiting >= self._max_waiting:
            raise Postponed(self._spread(wait, limiter.rate), f"rate limit {limiter.rate} reached")
        self._waiting += 1
        try:
            await limiter.acquire()
        finally:
            self._waiting -= 1

    def _spread(self, wait: float, rate: Rate) -> float:
        """When to ask a postponed job back: one start interval after the previous one, so a
        backlog returns at the rate it can start. Within a horizon of two windows: beyond it, a
        random moment inside it (a job postponed again must not push every later one out, or a
        backlog circling through the delay chain drifts ever later and the limit is under-used;
        and a fixed horizon would bring the overflow back in one burst)."""
        now = time.monotonic()
        soonest = now + wait
        horizon = soonest + 2 * rate.window
        at = max(self._next, soonest)
        if at > horizon:
            return random.uniform(wait, horizon - now)
        self._next = at + rate.window / rate.limit
        return at - now
