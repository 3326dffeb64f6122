"""Cancellation: the request (``request_cancel``) and what a worker keeps to honour it
(``consumer.features.cancel_watch.CancelWatch``, in the worker).

A cancellation has two parts, for two kinds of reader:

* a **mark** ``leveret:cancel:<id>`` in Redis (``CancelMarks``), kept ``LEVERET_STATUS_TTL``
  seconds: the durable record, so that a worker started after the cancel still knows (it loads
  every mark at start) and a job waiting in a retry chain for days is still refused when it
  comes back;
* a **broadcast** of the id on the durable fanout exchange ``<exchange>.cancel``, which every
  running worker hears at once through an exclusive, auto-delete queue of its own: a running
  ``cancellable=True`` job is cancelled within a round trip, not at the next poll.

The mark is written before the broadcast and is the one that counts: a broadcast nobody hears
(no worker running, a worker reconnecting) loses nothing, because a worker reloads the marks at
start and after every reconnect. The broadcast is published with confirms but without
``mandatory``: no bound queue just means no worker is running right now.

The worker keeps the cancelled ids in one in-memory dict (``CancelWatch``), so the check on
the hot path is one ``in`` on it, and nothing at all is asked of Redis or the broker per job
(``tests/api/test_cancel.py`` measures the check: tens of nanoseconds, empty or with 10 000
ids). The dict is bounded (``max_ids``, oldest dropped first, with a warning) and entries older
than the TTL are dropped as new ones arrive.

A request for an id with no status is ``UnknownJob``; for a job that has ended,
``JobAlreadyEnded``. Between the status read and the mark the job may end: the mark is then
harmless (an ended job never runs again), and the caller still gets 202.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import aiormq
import structlog
from aio_pika import ExchangeType
from aio_pika.abc import (
    AbstractChannel,
)
from pamqp.commands import Basic

from leveret.producers.broker.confirm import publish_confirmed
from leveret.producers.broker.connection import mask_url
from leveret.producers.stores.redis import (
    DEFAULT_CANCEL_PREFIX,
    DEFAULT_TIMEOUT_S,
    redis_client,
    redis_errors,
)
from leveret.producers.stores.settings import DEFAULT_STATUS_TTL
from leveret.producers.stores.status import JobStatus, StatusStore
from leveret.topology.errors import LeveretError
from leveret.topology.model import cancel_exchange_name

log = structlog.get_logger("leveret.cancel")

# The status store's script clears marks under this prefix (a revive): one constant for both.
DEFAULT_PREFIX: Final = DEFAULT_CANCEL_PREFIX
DEFAULT_MAX_IDS: Final = 100_000


def cancel_exchange(exchange: str) -> str:
    """``jobs`` → ``jobs.cancel``: beside the jobs exchange in the management UI (the
    topology declares it: ``Topology.exchanges()``)."""
    return cancel_exchange_name(exchange)


class UnknownJob(LeveretError, LookupError):
    """No status for this id: never published with a status store, or its status expired."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} is unknown (no status, or it expired)")


class JobAlreadyEnded(LeveretError):
    """The job has ended (``succeeded``, ``dead``, ``cancelled``): nothing left to cancel."""

    def __init__(self, status: JobStatus) -> None:
        self.job_id = status.id
        self.status = status
        super().__init__(f"job {status.id!r} has already ended ({status.state})")


# --- marks ------------------------------------------------------------------------------------


class CancelMarks(ABC):
    """Where cancellation marks live; every method is safe from many processes at once."""

    ttl: int

    @abstractmethod
    async def mark(self, job_id: str) -> None:
        """Record that ``job_id`` is cancelled, for ``ttl`` seconds."""

    @abstractmethod
    def pending(self) -> AsyncIterator[str]:
        """Every id marked now (in no particular order)."""

    async def close(self) -> None:  # noqa: B027 - optional for stores holding nothing
        """Release connections."""


class MemoryCancelMarks(CancelMarks):
    """Process-local marks, for tests and the test kit."""

    def __init__(self, ttl: int = DEFAULT_STATUS_TTL) -> None:
        self.ttl = ttl
        self._ids: dict[str, float] = {}

    async def mark(self, job_id: str) -> None:
        self._ids[job_id] = time.monotonic() + self.ttl

    async def pending(self) -> AsyncIterator[str]:
        now = time.monotonic()
        for job_id, until in list(self._ids.items()):
            if until > now:
                yield job_id


class RedisCancelMarks(CancelMarks):
    """Marks as plain keys ``<prefix><id>`` (value ``1``) with a TTL; loaded with ``SCAN``."""

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis (decode_responses=True); see RedisStatusStore
        *,
        ttl: int = DEFAULT_STATUS_TTL,
        prefix: str = DEFAULT_PREFIX,
        url: str = "redis",
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.prefix = prefix
        self._where = f"cancel marks at {mask_url(url)}"

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl: int = DEFAULT_STATUS_TTL,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> RedisCancelMarks:
        """Marks on their own client (``redis_client``: bounded timeouts, one quick retry)."""
        return cls(redis_client(url, timeout=timeout), ttl=ttl, prefix=prefix, url=url)

    async def mark(self, job_id: str) -> None:
        with redis_errors(self._where, "mark"):
            await self.client.set(self.prefix + job_id, "1", ex=self.ttl)

    async def pending(self) -> AsyncIterator[str]:
        cut = len(self.prefix)
        with redis_errors(self._where, "scan"):
            async for key in self.client.scan_iter(match=self.prefix + "*", count=1000):
                text = key.decode() if isinstance(key, bytes) else str(key)
                yield text[cut:]

    async def close(self) -> None:
        await self.client.aclose()


# --- the request ------------------------------------------------------------------------------


async def broadcast_cancel(
    channel: aiormq.abc.AbstractChannel, exchange: str, job_id: str, *, timeout: float = 30.0
) -> None:
    """Tell every running worker at once. ``channel``: a confirming aiormq channel (see
    ``publish_confirmed``); the fanout exchange must exist (``declare_cancel_exchange``)."""
    await publish_confirmed(
        channel,
        job_id.encode(),
        exchange=cancel_exchange(exchange),
        routing_key="",
        properties=Basic.Properties(content_type="text/plain", message_id=job_id),
        timeout=timeout,
        mandatory=False,  # no bound queue = no worker running now; the mark covers it
        job=f"cancel {job_id}",
    )


async def declare_cancel_exchange(channel: AbstractChannel, exchange: str) -> None:
    """Idempotent; part of what the lead adds to ``Topology.exchanges()``."""
    await channel.declare_exchange(cancel_exchange(exchange), ExchangeType.FANOUT, durable=True)


async def request_cancel(
    store: StatusStore,
    marks: CancelMarks,
    job_id: str,
    broadcast: Callable[[str], Awaitable[None]] | None = None,
) -> JobStatus:
    """Cancel ``job_id``: mark it, then broadcast it; return its status as read before.

    Raises ``UnknownJob`` (no status: HTTP 404), ``JobAlreadyEnded`` (409) and
    ``StatusStoreUnavailable`` (Redis down: 503). A failing ``broadcast`` is logged, not raised:
    the mark is written and every worker will honour it at its next start or reconnect; only
    a job running right now may finish its current run instead of being cancelled at once.
    """
    status = await store.get(job_id)
    if status is None:
        raise UnknownJob(job_id)
    if status.ended:
        raise JobAlreadyEnded(status)
    await marks.mark(job_id)
    if broadcast is not None:
        try:
            await broadcast(job_id)
        except Exception as exc:
            log.warning(
                "cancel.broadcast_failed",
                job_id=job_id,
                error=f"{type(exc).__name__}: {exc}",
                effect="marked; running workers learn it at their next reconnect",
            )
    log.info("cancel.requested", job_id=job_id, job=status.job, state=status.state)
    return status


# --- the worker side --------------------------------------------------------------------------
