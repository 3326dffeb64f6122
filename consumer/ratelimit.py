"""Rate limits for jobs: ``rate_limit="N/s"`` per worker process, ``global_rate_limit`` across all.

The contract: a limit ``N/s`` (or ``/m``, ``/h``) allows at most N starts in *any* window of that
length, with no burst above N. A token bucket or a leaky bucket does not give that: it starts full
(N at once) and refills at N per window, so a window that begins with the burst and ends just
before the bucket is full again holds almost 2N starts. Checked with aiolimiter 1.3
(``AsyncLimiter(20, 1.0)``, five tasks for 3 s): 84 starts, and 39 of them inside one 1 s window.
So both limiters here keep a *sliding-window log*: the times of the last N starts. A start is
admitted when fewer than N starts happened in the last window, i.e. when the N-th most recent start
is at least one window old; otherwise the wait is exactly until it is. No library needed.

- ``LocalLimiter``: per process. ``await acquire()`` waits in FIFO order (an ``asyncio.Lock``
  queues the waiters; the lock's owner sleeps until the oldest start leaves the window); a
  cancelled waiter takes no slot, since a slot is taken only at the synchronous moment of
  admission. ``try_acquire()`` never waits: it takes a slot and returns 0, or returns how long
  until one frees (and takes nothing), so the worker can give a job back through the delay chain
  instead of holding a prefetch slot through a long wait.
- ``RedisLimiter``: across processes, when ``LEVERET_STATUS_URL`` names a Redis. One Lua script
  does trim + count + admit atomically on a ZSET of start times per limit key, using the Redis
  server's clock (``TIME``) so workers' clock skew does not matter.
- A broker-only global limiter (a ring of N tokens cycling through a TTL queue) is *not*
  implemented: keeping exactly N tokens in circulation needs a count that includes tokens a
  worker holds unacked, which passive declares do not report; see the issue 14 report.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from leveret.consumer.errors import ConfigError

log = structlog.get_logger("leveret.ratelimit")

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"\s*(\d+)\s*/\s*([smh])\s*")


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` starts in any window of ``window`` seconds."""

    limit: int
    window: float
    text: str

    def __str__(self) -> str:
        return self.text


def parse_rate(text: str, what: str = "rate limit") -> Rate:
    """``"100/s"``, ``"1000/m"``, ``"5/h"`` → ``Rate``; ``ConfigError`` for anything else."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(
            f"{what} {text!r} is not N/s, N/m or N/h (N a whole number of starts per second, "
            f"minute or hour)"
        )
    limit = int(match.group(1))
    if limit < 1:
        raise ConfigError(f"{what} {text!r} must allow at least one start")
    return Rate(limit, _UNITS[match.group(2)], f"{limit}/{match.group(2)}")


class LocalLimiter:
    """Sliding-window log limiter for one process; see the module docstring."""

    def __init__(self, rate: Rate | str, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = parse_rate(rate) if isinstance(rate, str) else rate
        self._starts: deque[float] = deque(maxlen=self.rate.limit)
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._clock = clock
        self.last_start: float | None = None  # clock time of the last admitted start

    def _admit(self) -> float:
        """Take a slot (return 0) or return the seconds until the oldest start leaves."""
        now = self._clock()
        starts = self._starts
        if len(starts) < self.rate.limit or starts[0] + self.rate.window <= now:
            starts.append(now)  # when full, maxlen drops the oldest
            self.last_start = now
            return 0.0
        free_at = starts[0] + self.rate.window
        return free_at - now

    def try_acquire(self) -> float:
        """Start now (0) or the seconds to wait; never waits, never jumps ahead of waiters."""
        if self._waiting:
            now = self._clock()
            starts = self._starts
            # the slot the next not-yet-queued start could get: after those already waiting
            k = min(self._waiting, len(starts) - 1)
            return max(starts[k] + self.rate.window - now, 1e-3)
        return self._admit()

    async def acquire(self) -> None:
        """Wait for a slot, first come first served; cancelling takes no slot."""
        if not self._waiting and self._admit() == 0.0:
            return
        self._waiting += 1
        try:
            async with self._lock:
                # the wait is known exactly: the oldest start's age, not an event to await
                while (wait := self._admit()) > 0.0:  # noqa: ASYNC110
                    await asyncio.sleep(wait)
        finally:
            self._waiting -= 1


# KEYS[1]: the ZSET of start times (µs, Redis server clock) of one limit.
# ARGV: limit, window (µs), a unique member for this start.
# Returns {0, now} when admitted, else {µs to wait until the oldest start leaves, now}.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  return {0, now}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {math.max(tonumber(oldest[2]) + window - now, 1), now}
"""


class RedisLimiter:
    """Sliding-window log shared by every process through one Redis ZSET per limit.

    ``key`` names the limit (the job); ``prefix`` separates apps and tests. Within a process,
    waiters go through a local FIFO lock so one process does not hammer Redis with every waiting
    job; across processes, whoever asks first after a slot frees gets it.
    """

    def __init__(
        self,
        redis: Any,  # redis.asyncio.Redis
        key: str,
        rate: Rate | str,
        prefix: str = "leveret:ratelimit:",
    ) -> None:
        self.rate = parse_rate(rate) if isinstance(rate, str) else rate
        self.key = f"{prefix}{key}"
        self._redis = redis
        self._script = redis.register_script(_LUA)
        self._lock = asyncio.Lock()
        self._window_us = int(self.rate.window * 1_000_000)
        self.last_start: float | None = None  # Redis server time (epoch s) of the last start

    async def try_acquire(self) -> float:
        """Start now (0) or the seconds to wait; takes a slot only when returning 0.

        Cancelled while the script runs: if it admitted the start, the slot is given back
        (removed from the ZSET) so the limit does not lose capacity.
        """
        member = uuid.uuid4().hex
        call = asyncio.ensure_future(
            self._script(keys=[self.key], args=[self.rate.limit, self._window_us, member])
        )
        try:
            wait_us, now_us = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(self._give_back(member))
            raise
        if int(wait_us) == 0:
            self.last_start = int(now_us) / 1_000_000
            return 0.0
        return int(wait_us) / 1_000_000

    def _give_back(self, member: str) -> Any:
        def done(call: asyncio.Future[Any]) -> None:
            if call.cancelled() or call.exception() is not None or int(call.result()[0]) != 0:
                return
            task = asyncio.ensure_future(self._redis.zrem(self.key, member))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

        return done

    async def acquire(self) -> None:
        """Wait for a slot: FIFO within this process, retrying when the oldest start expires."""
        async with self._lock:
            # the server says how long until the oldest start leaves the window
            while (wait := await self.try_acquire()) > 0.0:  # noqa: ASYNC110
                await asyncio.sleep(max(wait, 1e-3))
