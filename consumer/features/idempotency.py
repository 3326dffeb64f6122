"""Once-only side effects: ``ctx.done_before(key)``/``ctx.mark_done(key)`` and
``@worker.job(..., idempotency_key="{order_id}")``.

A job can run more than once (a crash after its side effect and before its ack, a retry after
a later step failed, the same job published twice): Leveret delivers at least once. A *done
mark* is how a side effect survives that: a key in Redis (``LEVERET_STATUS_URL``), kept for
``LEVERET_IDEMPOTENCY_TTL`` seconds (default 7 days).

* ``if await ctx.done_before(key): return`` / ``await ctx.mark_done(key)`` inside a handler:
  the handler decides what is done and when (mark right after the side effect).
  Keys are the application's, shared by every job (``<prefix>key:<key>``).
* ``idempotency_key="{order_id}"`` on the job: a run whose key already succeeded is not run;
  it succeeds at once with the first run's result (as JSON: a model comes back as a dict). The
  mark (``<prefix>job:<job>:<key>``) is written with the result when the handler returns,
  before the job is acked, so a crash between the two reruns nothing.

Limits: a mark is written after the side effect, so a crash between the two repeats it (make
that window small); two copies running *at the same time* both see no mark (add ``lock=`` with
the same key to serialise them); a mark that cannot be written once the handler returned is
logged (``job_done_mark_failed``) and the job still succeeds, since failing it would cause the
very rerun the mark is there to prevent. Redis unreachable when a run checks its key: the run
is postponed (nothing ran, no attempt burnt). Without Redis ``ctx.done_before`` raises
``ConfigError`` and a worker with ``idempotency_key=`` jobs refuses to start.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
from pydantic_core import to_json

from leveret.consumer.delivery.outcomes import Postponed
from leveret.consumer.errors import ConfigError
from leveret.producers.stores import StatusStoreError

if TYPE_CHECKING:
    from leveret.consumer.context import JobContext
    from leveret.consumer.delivery.middleware import CallNext

log = structlog.get_logger("leveret.worker")

DEFAULT_DONE_PREFIX: Final = "leveret:done:"
UNAVAILABLE_RETRY_S: Final = 2.0


class DoneMarks(Protocol):
    async def lookup(self, key: str) -> tuple[bool, Any]:
        """``(True, result)`` if ``key`` is marked done, else ``(False, None)``."""

    async def mark(self, key: str, result: Any = None) -> None: ...


def no_marks() -> ConfigError:
    return ConfigError(
        "ctx.done_before/ctx.mark_done need Redis: set LEVERET_STATUS_URL (done marks are kept "
        "there; docs/coordination.md)"
    )


class RedisDoneMarks:
    """Done marks on the status store's Redis: ``<prefix><key>`` holds the result as JSON.
    Calls go out batched with the locks' (``locks.RedisBatch``)."""

    def __init__(
        self,
        client: Any,
        *,
        ttl_s: int,
        prefix: str = DEFAULT_DONE_PREFIX,
        where: str = "",
        batch: Any = None,
    ) -> None:
        from leveret.consumer.features.locks import RedisBatch

        self.client = client
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._batch = batch if batch is not None else RedisBatch(client, where or "done marks")

    async def lookup(self, key: str) -> tuple[bool, Any]:
        raw = await self._batch.call("get", self.prefix + key)
        if raw is None:
            return False, None
        return True, json.loads(raw)

    async def mark(self, key: str, result: Any = None) -> None:
        value = to_json(result, fallback=str)
        await self._batch.call("set", self.prefix + key, value, self.ttl_s)  # EX ttl


class MemoryDoneMarks:
    """Done marks in one process (``TestBroker``)."""

    def __init__(self, ttl_s: float = 7 * 86400) -> None:
        self.ttl_s = ttl_s
        self.marks: dict[str, tuple[bytes, float]] = {}

    async def lookup(self, key: str) -> tuple[bool, Any]:
        found = self.marks.get(key)
        if found is None or found[1] <= time.monotonic():
            return False, None
        return True, json.loads(found[0])

    async def mark(self, key: str, result: Any = None) -> None:
        self.marks[key] = (to_json(result, fallback=str), time.monotonic() + self.ttl_s)


def user_key(key: object) -> str:
    """A ``ctx.done_before``/``mark_done`` key as stored."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a done-mark key must be a non-empty str, got {key!r}")
    return "key:" + key


class Idempotent:
    """The chain layer of an ``idempotency_key=`` job (just inside the lock, if any)."""

    __slots__ = ("_key", "_marks", "_prefix")

    def __init__(self, job: str, key: Callable[[Any], str], marks: DoneMarks) -> None:
        self._key = key
        self._marks = marks
        self._prefix = f"job:{job}:"

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        key = self._prefix + self._key(ctx.payload)
        try:
            done, result = await self._marks.lookup(key)
        except StatusStoreError as exc:
            raise Postponed(UNAVAILABLE_RETRY_S, f"done marks unavailable ({exc})") from None
        if done:
            log.info("job_done_before", idempotency_key=key)
            return result
        result = await call_next(ctx)
        if ctx.follow_ups and ctx.lifecycle is not None:
            # Marked once its follow-ups are confirmed, before the ack (settle): marked now, a
            # crash before they went out would skip the rerun and lose them.
            if ctx.before_ack is None:
                ctx.before_ack = []
            ctx.before_ack.append(functools.partial(self._mark, key, result))
        else:
            await self._mark(key, result)
        return result

    async def _mark(self, key: str, result: Any) -> None:
        try:
            await self._marks.mark(key, result)
        except Exception as exc:
            log.error(
                "job_done_mark_failed",
                idempotency_key=key,
                error=f"{type(exc).__name__}: {exc}",
                action="the job succeeds; a rerun of it would run again",
            )
