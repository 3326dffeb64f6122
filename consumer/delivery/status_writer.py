"""``StatusWriter``: the worker records each job's status itself, where its outcome is decided.

Settle hands the writer a job's outcome once the outcome's copies are confirmed and before the
ack (``Settler._finish``): so a status never claims an outcome the queues do not hold, and an
acked job's outcome is never missing. The writes of every job settling in one loop turn go to
the store together, in one round trip (``StatusStore.write_many``: the ordering rule, the result,
``ended_at``, freeing the job's ``dedup_key``, all in one atomic script); each job waits for that
write only.

``started`` and ``progress`` are best effort: they ride the same batches but nobody waits for
them, and a failure drops them (the outcome that follows is what counts).

The store unreachable: the outcome writes are retried with backoff (tenacity) for as long as it
takes, so their jobs stay unacked (nothing lost; the broker's prefetch stops new deliveries once
every slot waits). After ``LEVERET_STATUS_TIMEOUT`` seconds of that the worker reports not
ready, and one line is logged per outage, not per job. When the store answers, everything held
goes out and the acks follow. A write the store refuses for good (a foreign value under the
key) is logged and the job is acked: its outcome is durable in the broker, and waiting cannot
make the write succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable, Sequence

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from leveret.producers.stores import StatusStore, StatusStoreUnavailable, StatusWrite

log = structlog.get_logger("leveret.worker")

_Batch = list[tuple[StatusWrite, "asyncio.Future[None] | None"]]


class StatusWriter:
    """Batches one worker process's status writes per loop turn; outlives its sessions."""

    def __init__(
        self,
        store: StatusStore,
        *,
        timeout_s: float = 10.0,
        on_stalled: Callable[[bool], None] | None = None,
    ) -> None:
        self.store = store
        self._timeout_s = timeout_s
        self._on_stalled = on_stalled or (lambda _: None)
        self._pending: _Batch = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self._down_since: float | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self.stalled = False

    async def record(self, writes: Sequence[StatusWrite]) -> None:
        """Write with the others of this loop turn; return once stored (or refused for good)."""
        loop = asyncio.get_running_loop()
        if len(writes) == 1:  # the common case: one outcome, one future, no gather
            waiter = loop.create_future()
            self._pending.append((writes[0], waiter))
            self._schedule(loop)
            await waiter
            return
        waiters = []
        for w in writes:
            waiter = loop.create_future()
            waiters.append(waiter)
            self._pending.append((w, waiter))
        self._schedule(loop)
        await asyncio.gather(*waiters)

    def record_soon(self, write: StatusWrite) -> None:
        """Best effort (``started``, ``progress``): into the next batch, nobody waits."""
        self._pending.append((write, None))
        self._schedule(asyncio.get_running_loop())

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if len(batch) > 1:
            batch = _without_overtaken(batch)
        # A context of its own: the log lines of a batch carry no one job's fields.
        task = asyncio.get_running_loop().create_task(
            self._send(batch), context=contextvars.Context()
        )
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: _Batch) -> None:
        best_effort_only = all(waiter is None for _, waiter in batch)
        try:
            outcomes = await self._write(batch, once=best_effort_only)
        except StatusStoreUnavailable:
            return  # best effort only, store down: dropped (the outcome write will follow)
        except Exception as exc:  # a bug, or a permanent refusal of the whole call
            outcomes = [_described(exc)] * len(batch)
        for (write, waiter), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, str) and waiter is not None:
                _log_refused(write, outcome)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def _write(self, batch: _Batch, *, once: bool) -> list[bool | str]:
        writes = [w for w, _ in batch]
        try:  # the common case, without building a retry loop
            return await self.store.write_many(writes)
        except StatusStoreUnavailable as exc:
            if once:
                raise
            self._down(exc)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StatusStoreUnavailable),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                outcomes = await self.store.write_many(writes)
        self._up()
        return outcomes

    def _down(self, error: BaseException) -> None:
        """A failed outcome write: the first of an outage is logged, and the timer started."""
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        with contextlib.suppress(Exception):
            log.warning(
                "status_store_unavailable",
                error=str(error),
                action="jobs run on; their acks wait until their status is written",
            )
        self._stall_timer = asyncio.get_running_loop().call_later(
            self._timeout_s, self._set_stalled, True
        )

    def _up(self) -> None:
        if self._down_since is None:
            return
        down_for = time.monotonic() - self._down_since
        self._down_since = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        with contextlib.suppress(Exception):
            log.info("status_store_back", down_s=round(down_for, 3))
        self._set_stalled(False)

    def _set_stalled(self, stalled: bool) -> None:
        if stalled != self.stalled:
            self.stalled = stalled
            if stalled:
                with contextlib.suppress(Exception):
                    log.error(
                        "status_store_stalled",
                        timeout_s=self._timeout_s,
                        action="not ready (/readyz 503) until the status store answers",
                    )
            self._on_stalled(stalled)

    async def close(self, grace_s: float = 2.0) -> None:
        """At the worker's exit: writes in flight get ``grace_s`` to finish, then stop (their
        jobs were not acked, so the broker redelivers them and they are written then)."""
        if not self._sending:
            return
        _, pending = await asyncio.wait(set(self._sending), timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _without_overtaken(batch: _Batch) -> _Batch:
    """A best-effort ``started`` or ``progress`` whose job's outcome is in the same batch says
    nothing the outcome does not: a job that ended within one loop turn costs one write."""
    ended = {w.job_id for w, waiter in batch if waiter is not None}
    if not ended:
        return batch
    return [(w, waiter) for w, waiter in batch if waiter is not None or w.job_id not in ended]


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _log_refused(write: StatusWrite, error: str) -> None:
    with contextlib.suppress(Exception):
        log.error(
            "status_not_written",
            job_id=write.job_id,
            state=write.kind,
            error=error,
            action="the job is settled in the broker; its status stays as it was",
        )


__all__ = ["StatusWriter"]
