"""``Publisher``: a submitted job is either confirmed in a queue, or the caller gets an error.

Every publish goes through ``confirm.publish_confirmed`` (confirms and ``mandatory``): a nack
raises ``RefusedError``, a job no queue is bound for comes back from the broker and raises
``UnroutableError``, and no confirm within ``publish_timeout`` raises ``PublishTimeout``. An id is
only ever returned for a job the broker confirmed.

Concurrent ``publish`` calls share one channel and are pipelined: each waits only for its own
confirm, so a thousand tasks publishing at once need one round trip, not a thousand.

Ids are unique in flight. The AMQP client matches a ``basic.return`` to its publish by
``message_id`` (a return carries no delivery tag), so two publishes in flight with one id could
get each other's return: the unroutable one would report success. ``publish_many`` refuses a
batch that repeats an id, and a ``publish`` whose id is already in flight waits for the earlier
one's confirm before it is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pamqp.commands import Basic
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from leveret.topology.model import check_name, delayed_job_route

from .confirm import publish_confirmed
from .connection import connect, mask_url
from .errors import DuplicateJobIdError
from .message import check_priority, encode_payload, job_properties, new_job_id
from .metrics import published_counter
from .settings import ConnectionSettings

Payload = BaseModel | dict[str, Any]


class Job(BaseModel):
    """One job for ``publish_many``."""

    job: str
    payload: dict[str, Any] | BaseModel
    priority: int | None = None
    delay: float | None = None
    job_id: str | None = None


class Publisher:
    """Publishes jobs with confirms; use as ``async with Publisher(url) as pub``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: ConnectionSettings | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if settings is None:
            settings = ConnectionSettings() if url is None else ConnectionSettings(amqp_url=url)
        elif url is not None:
            settings = settings.model_copy(update={"amqp_url": url})
        self.settings = settings
        self._exchange = settings.exchange
        self._timeout = settings.publish_timeout
        self._published = published_counter(registry)
        self._published_children: dict[str, Any] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        # message_id -> settled when that publish's confirm (or failure) is in.
        self._in_flight: dict[str, asyncio.Event] = {}

    def __repr__(self) -> str:
        return f"Publisher({mask_url(self.settings.amqp_url.get_secret_value())!r})"

    async def connect(self) -> None:
        self._connection = await connect(self.settings)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(
        self,
        job: str,
        payload: Payload,
        *,
        priority: int | None = None,
        delay: float | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Publish one job and wait for the broker's confirm; return its id."""
        body, properties, exchange, routing_key = self._prepare(
            job, payload, priority, delay, job_id, headers
        )
        await self._send(job, body, properties, exchange, routing_key)
        return properties.message_id  # type: ignore[return-value]

    async def publish_many(self, jobs: Iterable[Job | tuple[str, Payload]]) -> list[str]:
        """Send a whole batch, then wait for all its confirms at once.

        Every job is validated before the first is sent. Returns the ids in order; if any job is
        refused, the first error is raised after every confirm has arrived (the others were
        queued).
        """
        prepared = []
        seen: set[str] = set()
        for item in jobs:
            if isinstance(item, Job):
                job = item.job
                parts = self._prepare(
                    job, item.payload, item.priority, item.delay, item.job_id, None
                )
            else:  # (job, payload): no model to build per job on the hot path
                job, payload = item
                parts = self._prepare(job, payload, None, None, None, None)
            message_id = parts[1].message_id
            if message_id in seen:
                raise DuplicateJobIdError(message_id)
            seen.add(message_id)  # type: ignore[arg-type]
            prepared.append((*parts, job))
        results = await asyncio.gather(
            *(self._send(job, body, props, ex, rk) for body, props, ex, rk, job in prepared),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [props.message_id for _, props, _, _, _ in prepared]  # type: ignore[misc]

    def _prepare(
        self,
        job: str,
        payload: Payload,
        priority: int | None,
        delay: float | None,
        job_id: str | None,
        headers: Mapping[str, Any] | None,
    ) -> tuple[bytes, Basic.Properties, str, str]:
        check_name("job", job)
        body = encode_payload(payload)
        properties = job_properties(
            job,
            job_id if job_id is not None else new_job_id(),
            check_priority(priority),
            dict(headers) if headers else None,
        )
        if delay:
            return body, properties, *delayed_job_route(self._exchange, delay, job)
        return body, properties, self._exchange, job

    async def _send(
        self,
        job: str,
        body: bytes,
        properties: Basic.Properties,
        exchange: str,
        routing_key: str,
    ) -> None:
        if self._channel is None:
            raise RuntimeError("Publisher is not connected: use `async with Publisher(...)`")
        message_id: str = properties.message_id  # type: ignore[assignment]
        while (earlier := self._in_flight.get(message_id)) is not None:
            await earlier.wait()
        settled = self._in_flight[message_id] = asyncio.Event()
        try:
            await self._send_unique(job, body, properties, exchange, routing_key)
        finally:
            del self._in_flight[message_id]
            settled.set()

    async def _send_unique(
        self,
        job: str,
        body: bytes,
        properties: Basic.Properties,
        exchange: str,
        routing_key: str,
    ) -> None:
        assert self._channel is not None
        await publish_confirmed(
            await self._channel.get_underlay_channel(),
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            timeout=self._timeout,
            job=job,
        )
        child = self._published_children.get(job)
        if child is None:
            child = self._published_children[job] = self._published.labels(job_name=job)
        child.inc()
