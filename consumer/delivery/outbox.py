"""``Outbox``: the copies settle publishes, sent in batches, each caller waiting for its own.

Every copy asked for in one loop turn (the outcomes of the jobs that finished together, their
events and follow-ups) goes out in one ``producers.batch.publish_batch``: one socket write whose
confirms are tracked by delivery tag. Each job still waits for its own confirms only, and a
copy that is not confirmed fails only the jobs it belongs to (``SettleFailed``). With
``LEVERET_EVENTS=outcomes`` every job publishes before its ack, and a write (a syscall) per event
was most of what that cost. Best-effort copies (``started``, ``progress``) ride the same batches
but nobody waits for them; a failure is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import NamedTuple

import aiormq
import structlog
from pamqp.commands import Basic

from leveret.producers import InvalidMessageError, PublishError, PublishTimeout
from leveret.producers.broker import BatchPublishError, publish_batch

log = structlog.get_logger("leveret.worker")


class SettleFailed(Exception):
    """The outcome copy was not confirmed; the original must stay unacked."""


class CopyInvalid(SettleFailed):
    """A copy AMQP cannot carry (``InvalidMessageError``): sending it again cannot help, so
    the job is dead-lettered ``invalid`` with a copy stripped to what can be carried."""


class Copy(NamedTuple):
    """One message to confirm before the ack; events are not ``mandatory`` (nobody may be bound
    to the events exchange), jobs and their copies are (a job no queue takes is an error)."""

    body: bytes
    exchange: str
    routing_key: str
    properties: Basic.Properties
    mandatory: bool = True

    # What ``publish_batch`` reads of an item besides the fields above.
    @property
    def job(self) -> str:
        return self.properties.message_type or self.routing_key

    @property
    def job_id(self) -> str:
        """The message id: unique per copy in flight (an event's is ``<id>.<state>.<n>``)."""
        return str(self.properties.message_id)


class Outbox:
    """Batches copies per loop turn on one confirming channel (a session's publish channel)."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, timeout_s: float | None) -> None:
        self.channel = channel
        # A confirm that never comes (memory alarm, quorum queue without a majority) must end
        # as a failed settle, not hold the job's prefetch slot forever.
        self._timeout_s = timeout_s
        # Copies asked for in this loop turn, sent together by ``_flush``.
        self._pending: list[tuple[tuple[Copy, ...], asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def confirm(self, copies: tuple[Copy, ...]) -> None:
        """Publish every copy with the others of this loop turn and wait for all of these
        copies' confirms; raise ``SettleFailed`` if any was not confirmed."""
        waiter = asyncio.get_running_loop().create_future()
        self._enqueue(copies, waiter)
        await waiter

    def _enqueue(self, copies: tuple[Copy, ...], waiter: asyncio.Future[None]) -> None:
        self._pending.append((copies, waiter))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[tuple[Copy, ...], asyncio.Future[None]]]) -> None:
        items = [copy for copies, _ in batch for copy in copies]
        failed: dict[str, PublishError] = {}
        everything: BaseException | None = None
        try:
            await publish_batch(self.channel, items, timeout=self._timeout_s)
        except BatchPublishError as exc:
            failed = exc.errors
        except Exception as exc:  # the channel is gone, or a bug: nothing is known confirmed
            everything = exc
        for copies, waiter in batch:
            if waiter.done():
                continue  # its job was cancelled meanwhile
            error: BaseException | None = everything
            if error is None and failed:
                error = next((failed[c.job_id] for c in copies if c.job_id in failed), None)
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(_settle_failed(error))

    def send_best_effort(self, copy: Copy, job_id: str) -> None:
        """Into the next batch like any copy, but nobody waits: a failure is only logged."""
        waiter = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(functools.partial(_log_lost_event, copy, job_id))
        self._enqueue((copy,), waiter)


def _log_lost_event(copy: Copy, job_id: str, waiter: asyncio.Future[None]) -> None:
    if waiter.cancelled() or waiter.exception() is None:
        return
    with contextlib.suppress(Exception):
        log.warning(
            "event_not_published",
            job_id=job_id,
            routing_key=copy.routing_key,
            error=str(waiter.exception()),
            action="best effort: the job goes on; its outcome event is still confirmed",
        )


def _settle_failed(error: BaseException) -> SettleFailed:
    if isinstance(error, InvalidMessageError):
        return CopyInvalid(str(error))
    if isinstance(error, PublishTimeout):
        return SettleFailed(
            f"outcome copy not confirmed within {error.timeout_s:g} s "
            f"(LEVERET_PUBLISH_TIMEOUT; is the broker blocking publishers?)"
        )
    return SettleFailed(f"{type(error).__name__}: {error}")
