"""``Publisher``: a submitted job is either confirmed in a queue, or the caller gets an error.

Every publish goes through ``batch.publish_batch`` (a single ``publish`` is a batch of one, as in
``confirm.publish_confirmed``; confirms and ``mandatory``): a nack
raises ``RefusedError``, a job no queue is bound for comes back from the broker and raises
``UnroutableError``, and no confirm within ``publish_timeout`` raises ``PublishTimeout``. An id is
only ever returned for a job the broker confirmed.

Concurrent ``publish`` calls share one channel and are pipelined: each waits only for its own
confirm, so a thousand tasks publishing at once need one round trip, not a thousand, and the
publishes made in one loop turn go out in one socket write. Without a status store or a
``dedup_key`` a publish pays for neither: no Redis call, no claim, no extra task.

Ids are unique in flight. The AMQP client matches a ``basic.return`` to its publish by
``message_id`` (a return carries no delivery tag), so two publishes in flight with one id could
get each other's return: the unroutable one would report success. ``publish_many`` refuses a
batch that repeats an id, and a ``publish`` whose id is already in flight waits for the earlier
one's confirm before it is sent.

Delays and ETAs (``delay_seconds``). ``delay=`` is seconds or a ``timedelta``; ``eta=`` an aware
``datetime``, turned into a delay against the clock at the moment of publishing: the delay chain
rounds *up* to 250 ms and the publish itself only adds time, so the job never runs before its
ETA. An ETA already past runs now, like ``delay=0``: a caller computing "in 5 minutes" from a
stale clock or after a slow request still gets its job, where an error would lose it. A
*negative* ``delay=`` is different (a sign error in the caller's arithmetic, not a late clock)
and raises, as do a naive ETA (its instant is unknown), both options at once, and a time past
the horizon (``MAX_DELAY_S``, about 388 days): every one an ``InvalidDelayError``.

De-duplication and cancellation (``producers.dedup``, ``producers.cancel``) use the status
store's Redis: ``dedup_key=`` claims the key atomically before the publish (a held key returns
the holder's id and sends nothing; a publish the broker refused frees it at once, one whose
outcome is unknown keeps it held for at most 60 s), and ``cancel(id)`` marks the job and
broadcasts the id to every running worker on this publisher's channel.

What AMQP cannot carry (a job id over 255 UTF-8 bytes, a header value with no AMQP type) is an
``InvalidMessageError`` (a ``ValueError``) before anything is sent (``message.check_message``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, NamedTuple, Self, overload

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel as AbstractAiormqChannel
from pamqp.commands import Basic
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, JsonValue

from leveret.producers.broker.batch import BatchPublishError, publish_batch
from leveret.producers.broker.connection import connect, mask_url
from leveret.producers.errors import DuplicateJobIdError, PublishError, PublishTimeout
from leveret.producers.groups import (
    GroupId,
    GroupStatus,
    GroupStore,
    GroupsUnavailableError,
    is_group_id,
    publish_group,
)
from leveret.producers.metrics import published_counter
from leveret.producers.schedules import (
    RuntimeSchedule,
    ScheduleStore,
    SchedulesUnavailableError,
    build_schedule,
)
from leveret.producers.settings import ConnectionSettings
from leveret.producers.stores.bundle import Stores
from leveret.producers.stores.cancel import (
    CancelMarks,
    broadcast_cancel,
    cancel_exchange,
    request_cancel,
)
from leveret.producers.stores.dedup import (
    HEADER_DEDUP_KEY,
    DedupStore,
    DedupUnavailableError,
    check_dedup_key,
    publish_once,
)
from leveret.producers.stores.settings import LifecycleSettings
from leveret.producers.stores.status import (
    JobStatus,
    StatusStore,
    StatusStoreError,
    StatusStoreUnavailable,
    wait_result,
)
from leveret.producers.wire.message import (
    check_max_attempts,
    check_priority,
    encode_payload,
    expires_header,
    job_properties,
    new_job_id,
)
from leveret.topology.delay import MAX_DELAY_S, delay_units, delayed_job_route
from leveret.topology.errors import InvalidDelayError
from leveret.topology.model import check_name

log = structlog.get_logger("leveret.publisher")

Payload = BaseModel | dict[str, Any]
Delay = float | timedelta


def delay_seconds(
    delay: Delay | None = None, eta: datetime | None = None, *, now: datetime | None = None
) -> float | None:
    """The delay in seconds a ``delay=`` or ``eta=`` asks for (``None``: neither, run now).

    Validated here, before anything is sent (see the module docstring for the rules): the
    result is always in ``[0, MAX_DELAY_S]``.
    """
    if delay is not None and eta is not None:
        raise InvalidDelayError(
            math.nan,
            "give delay= or eta=, not both (a delay is counted from now, an eta is a time)",
        )
    if eta is not None:
        if not isinstance(eta, datetime):
            raise InvalidDelayError(
                math.nan, f"eta= must be a timezone-aware datetime, got {type(eta).__name__}"
            )
        if eta.tzinfo is None or eta.utcoffset() is None:
            raise InvalidDelayError(
                math.nan,
                f"eta={eta.isoformat()} has no time zone, so its instant is unknown: pass an "
                f"aware datetime, e.g. datetime(2027, 1, 1, 9, tzinfo=ZoneInfo('Europe/Paris'))",
            )
        ahead = (eta - (now if now is not None else datetime.now(UTC))).total_seconds()
        if ahead > MAX_DELAY_S:
            raise InvalidDelayError(
                ahead,
                f"eta={eta.isoformat()} is {ahead:.0f} s ahead, past the longest delay Leveret "
                f"supports ({MAX_DELAY_S:.0f} s, about {MAX_DELAY_S / 86_400:.0f} days)",
            )
        return max(0.0, ahead)  # an eta already past runs now, like delay=0
    if delay is None:
        return None
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    delay_units(seconds)  # negative, not a number or past the horizon: a clear error now
    return float(seconds)


class Job(BaseModel):
    """One job for ``publish_many`` and ``group``: ``Job("report", {"day": 1}, priority=5)``
    (the name and payload by position or keyword, the rest as ``publish`` takes them)."""

    job: str
    payload: dict[str, Any] | BaseModel
    priority: int | None = None
    delay: float | timedelta | None = None
    eta: datetime | None = None
    job_id: str | None = None
    max_attempts: int | None = None
    dedup_key: str | None = None

    def __init__(
        self, job: str, payload: dict[str, Any] | BaseModel | None = None, **options: Any
    ) -> None:
        super().__init__(job=job, payload={} if payload is None else payload, **options)


# Job names ``check_name`` accepted already (a set lookup is cheaper than its pattern).
_VALID_NAMES: set[str] = set()


def prepare_job(
    exchange: str,
    job: str,
    payload: Payload,
    priority: int | None = None,
    delay: float | None = None,
    job_id: str | None = None,
    headers: Mapping[str, Any] | None = None,
    max_attempts: int | None = None,
) -> _Prepared:
    """Validate one job and build its message: the one builder, shared by ``Publisher`` and a
    handler's ``ctx.enqueue`` (whose follow-ups the worker publishes with the job's outcome)."""
    if job not in _VALID_NAMES:
        check_name("job", job)
        if len(_VALID_NAMES) >= 1024:  # bounded: job names are few, unless built per call
            _VALID_NAMES.clear()
        _VALID_NAMES.add(job)
    body = encode_payload(payload)
    job_id = job_id if job_id is not None else new_job_id()
    properties = job_properties(
        job,
        job_id,
        check_priority(priority),
        headers,
        max_attempts=check_max_attempts(max_attempts),
    )
    exchange, routing_key = delayed_job_route(exchange, delay, job) if delay else (exchange, job)
    return _Prepared(job, job_id, body, properties, exchange, routing_key)


# A status write must not hold a publish for long: the job is queued whatever Redis says.
STATUS_WRITE_TIMEOUT_S = 2.0


class Publisher:
    """Publishes jobs with confirms; use as ``async with Publisher(url) as pub``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: ConnectionSettings | None = None,
        registry: CollectorRegistry | None = None,
        status_url: str | None = None,
        status_store: StatusStore | None = None,
        queues: Mapping[str, str] | None = None,
    ) -> None:
        """``status_url`` (default ``LEVERET_STATUS_URL``) turns on the status store: each
        confirmed publish records ``queued`` and ``status``/``result`` read it back.
        ``queues`` (job name -> queue) is for a publisher that loads the app (the HTTP API):
        its ``queued`` statuses name the queue at once; elsewhere it is ``null`` until a
        worker has the job."""
        if settings is None:
            settings = ConnectionSettings() if url is None else ConnectionSettings(amqp_url=url)
        elif url is not None:
            settings = settings.model_copy(update={"amqp_url": url})
        self.settings = settings
        self._exchange = settings.exchange
        self._timeout = settings.publish_timeout
        self._published = published_counter(registry)
        self._published_children: dict[str, Counter] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        # The ids of the publishes in flight, each with the event a publish of the same id
        # waits on (made by the first such publish: None until then).
        self._in_flight: dict[str, asyncio.Event | None] = {}
        # The open aiormq channel under ``_channel`` (None: ask the robust channel for it).
        self._underlay: AbstractAiormqChannel | None = None
        self._status_store = status_store
        self._queues: Mapping[str, str] = queues or {}
        self._owns_store = False
        self._status_url = status_url
        if status_store is None and status_url is None:
            lifecycle = LifecycleSettings()
            if lifecycle.status_url is not None:
                self._status_url = lifecycle.status_url.get_secret_value()
        self._status_ttl = LifecycleSettings().status_ttl if self._status_url else 0
        self._dedup: DedupStore | None = None
        self._marks: CancelMarks | None = None
        self._cancel_declared = False
        self._groups: GroupStore | None = None

    def __repr__(self) -> str:
        return f"Publisher({mask_url(self.settings.amqp_url.get_secret_value())!r})"

    async def connect(self) -> None:
        if self._status_store is None and self._status_url:
            from leveret.producers.stores.status import RedisStatusStore

            self._status_store = RedisStatusStore.from_url(
                self._status_url, ttl=self._status_ttl, timeout=STATUS_WRITE_TIMEOUT_S
            )
            self._owns_store = True
        self._connection = await connect(self.settings)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = self._underlay = None
        if self._status_store is not None and self._owns_store:
            with contextlib.suppress(Exception):
                await self._status_store.close()
            self._status_store = None

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
        delay: Delay | None = None,
        eta: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        max_attempts: int | None = None,
        dedup_key: str | None = None,
        expires: float | timedelta | datetime | None = None,
    ) -> str:
        """Publish one job and wait for the broker's confirm; return its id.

        ``expires`` (seconds from now, a ``timedelta`` or an aware ``datetime``): a job not
        started by then is not run; it ends dead, ``x-reason: expired`` (docs/coordination.md).

        ``dedup_key`` (needs the status store): while a job published with that key is live
        (queued, delayed, waiting for a retry, running), publishing it again returns that job's
        id and enqueues nothing, from any number of processes (``producers.dedup``).

        ``max_attempts`` overrides the job's registered ``max_attempts`` for this one job.
        With a status store, the job reads ``queued`` once this returns.

        ``delay`` (seconds or a ``timedelta``) or ``eta`` (an aware ``datetime``) hold the job
        back until then: it runs no earlier, and at normal load at most ``MAX_LATENESS_S``
        (925 ms) later, for any time up to ``MAX_DELAY_S`` (about 388 days) ahead.
        """
        delay_s = delay_seconds(delay, eta)
        headers = expires_header(headers, expires)
        if dedup_key is not None:
            # Validated first: a bad payload or key never claims the key.
            key = check_dedup_key(dedup_key)
            self._dedup_store()
            carried = {**(headers or {}), HEADER_DEDUP_KEY: key}
            prepared = prepare_job(
                self._exchange, job, payload, priority, delay_s, job_id, carried, max_attempts
            )
            return await self._publish_once(key, prepared)
        prepared = prepare_job(
            self._exchange, job, payload, priority, delay_s, job_id, headers, max_attempts
        )
        await self._send(prepared)
        if self._status_store is not None:
            await self._record_queued(prepared)
        return prepared.job_id

    async def _publish_once(self, key: str, prepared: _Prepared) -> str:
        """Claim → publish → confirm the claim (``publish_once``): the holder's id if the key
        is held, else this job's once the broker confirmed it."""
        dedup = self._dedup_store()

        async def send(_: str, __: dict[str, str]) -> None:
            await self._send(prepared)

        returned, published = await publish_once(dedup, key, prepared.job_id, send)
        if published and self._status_store is not None:
            await self._record_queued(prepared)
        return returned

    def _dedup_store(self) -> DedupStore:
        if self._dedup is None:
            stores = Stores.of(self._status_store)
            if stores is None:
                raise DedupUnavailableError()
            self._dedup = stores.dedup
        return self._dedup

    async def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job (``producers.cancel``): it never runs again; a running
        ``cancellable=True`` job is cancelled at once, others finish their current run.

        Returns the status as it was when asked; raises ``UnknownJob`` (no status) or
        ``JobAlreadyEnded``. Needs the status store, where the mark every worker honours is
        kept; the broadcast goes out on this publisher's channel.
        """
        store = self._store()
        if self._marks is None:
            stores = Stores.of(store)
            if stores is None:
                raise StatusStoreError("cancel needs a Redis status store (LEVERET_STATUS_URL)")
            self._marks = stores.marks
        return await request_cancel(store, self._marks, job_id, self._broadcast_cancel)

    async def _broadcast_cancel(self, job_id: str) -> None:
        if self._channel is None:
            raise RuntimeError("Publisher is not connected: use `async with Publisher(...)`")
        if not self._cancel_declared:
            # Idempotent. A publish to a missing exchange would close this channel, and a
            # publisher may well run before any worker or `topology declare` did.
            from aio_pika import ExchangeType

            await self._channel.declare_exchange(
                cancel_exchange(self._exchange), ExchangeType.FANOUT, durable=True
            )
            self._cancel_declared = True
        async with asyncio.timeout(self._timeout):
            channel = await self._channel.get_underlay_channel()
        await broadcast_cancel(channel, self._exchange, job_id, timeout=self._timeout)

    async def publish_many(self, jobs: Iterable[Job | tuple[str, Payload]]) -> list[str]:
        """Send a whole batch, then wait for all its confirms at once.

        Every job is validated before the first is sent; the batch goes out in one write
        (``producers.batch``). Returns the ids in order once every job is confirmed; otherwise
        raises ``BatchPublishError`` once every job's outcome is in (or its wait ended), naming
        each job not confirmed with its typed error, and the ids that did land (``landed``,
        in order): every job is in one or the other.

        A ``Job`` with ``dedup_key`` is not part of the write: each goes through ``publish``'s
        claim → publish → confirm on its own, concurrently with the batch; its id in the list
        (and in ``landed``) is the one ``publish`` returns (the holder's when the key is held),
        and its failure is named under its own id like any other job's.
        """
        items = list(jobs)
        batch, once = self._prepare_batch(items)
        if self._channel is None:
            raise RuntimeError("Publisher is not connected: use `async with Publisher(...)`")
        keyed = asyncio.gather(
            *(self._publish_once(key, p) for key, p in once.values()), return_exceptions=True
        )
        try:
            results, _ = await self._send_batch(batch)
        except BaseException:
            keyed.cancel()  # the caller is cancelled: so are its keyed publishes
            raise
        keyed_results: list[str | BaseException] = await keyed
        for failed in keyed_results:  # cancelled: the caller, not a job, failed
            if isinstance(failed, BaseException) and not isinstance(failed, Exception):
                raise failed
        if self._status_store is not None:
            await asyncio.gather(
                *(self._record_queued(p) for p, r in zip(batch, results, strict=True) if r is None)
            )
        by_position = dict(zip(once, keyed_results, strict=True))
        ids: list[str] = []
        errors: dict[str, PublishError] = {}
        plain = iter(zip(batch, results, strict=True))
        for position in range(len(items)):
            outcome: str | BaseException | None
            if position in once:
                prepared = once[position][1]
                outcome = by_position[position]
            else:
                prepared, outcome = next(plain)
            if outcome is None:
                ids.append(prepared.job_id)
            elif isinstance(outcome, str):
                ids.append(outcome)
            else:
                errors[prepared.job_id] = _as_publish_error(prepared.job, outcome)
        if errors:
            raise BatchPublishError(ids, errors)
        return ids

    def _prepare_batch(
        self, items: list[Job | tuple[str, Payload]]
    ) -> tuple[list[_Prepared], dict[int, tuple[str, _Prepared]]]:
        """Every job validated and built before anything is sent: the batch to write, and the
        jobs with a ``dedup_key`` by position, with their key (published one by one)."""
        batch: list[_Prepared] = []
        seen: set[str] = set()
        once: dict[int, tuple[str, _Prepared]] = {}
        for position, item in enumerate(items):
            if isinstance(item, Job):
                key = check_dedup_key(item.dedup_key) if item.dedup_key is not None else None
                if key is not None:
                    self._dedup_store()
                delay_s = delay_seconds(item.delay, item.eta)
                prepared = prepare_job(
                    self._exchange,
                    item.job,
                    item.payload,
                    item.priority,
                    delay_s,
                    item.job_id,
                    {HEADER_DEDUP_KEY: key} if key is not None else None,
                    item.max_attempts,
                )
            else:  # (job, payload): no model to build per job on the hot path
                job, payload = item
                key = None
                prepared = prepare_job(self._exchange, job, payload)
            if prepared.job_id in seen:
                raise DuplicateJobIdError(prepared.job_id)
            seen.add(prepared.job_id)
            if key is not None:
                once[position] = (key, prepared)
            else:
                batch.append(prepared)
        return batch, once

    async def _send_batch(
        self, batch: list[_Prepared]
    ) -> tuple[list[BaseException | None], BatchPublishError | None]:
        """The batch in one write, confirms tracked by delivery tag (``producers.batch``).

        Returns each job's error (``None``: confirmed) and the ``BatchPublishError`` naming
        them. Ids already in flight on this publisher wait for those publishes first, as in
        ``_send`` (a return is matched to its publish by id).
        """
        if self._channel is None:
            raise RuntimeError("Publisher is not connected: use `async with Publisher(...)`")
        if not batch:
            return [], None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        channel = self._underlay
        if channel is None or channel.is_closed:
            try:
                channel = await self._underlay_channel(batch[0].job, deadline)
            except PublishTimeout:
                timed_out = BatchPublishError(
                    [], {p.job_id: PublishTimeout(p.job, self._timeout, sent=False) for p in batch}
                )
                return [timed_out.errors[p.job_id] for p in batch], timed_out
        in_flight = self._in_flight
        while (busy := next((p.job_id for p in batch if p.job_id in in_flight), None)) is not None:
            await self._after(busy)
        for p in batch:  # no await since the check: none of them is in flight
            in_flight[p.job_id] = None
        error: BatchPublishError | None = None
        try:
            await publish_batch(channel, batch, timeout=max(deadline - loop.time(), 0.001))
        except BatchPublishError as exc:
            error = exc
        finally:
            for p in batch:
                waiting = self._in_flight.pop(p.job_id)
                if waiting is not None:
                    waiting.set()
        results: list[BaseException | None] = (
            [None] * len(batch) if error is None else [error.errors.get(p.job_id) for p in batch]
        )
        counts: dict[str, int] = {}
        for p, result in zip(batch, results, strict=True):
            if result is None:
                counts[p.job] = counts.get(p.job, 0) + 1
        for job, count in counts.items():
            child = self._published_children.get(job)
            if child is None:
                child = self._published_children[job] = self._published.labels(job_name=job)
            child.inc(count)
        return results, error

    # -- status ---------------------------------------------------------------------------------

    def _store(self) -> StatusStore:
        if self._status_store is None:
            raise StatusStoreError(
                "no status store: set LEVERET_STATUS_URL or pass "
                "Publisher(url, status_url='redis://…')"
            )
        return self._status_store

    async def _record_queued(self, prepared: _Prepared) -> None:
        """``queued`` for a confirmed job; its queue where this publisher knows it (``queues``),
        else ``null`` until a worker has the job. A failing write is logged: the job is queued
        whatever Redis says, and the worker records its states from the start of its run."""
        assert self._status_store is not None
        queue = self._queues.get(prepared.job)
        try:
            async with asyncio.timeout(STATUS_WRITE_TIMEOUT_S):
                await self._status_store.set_queued(prepared.job_id, prepared.job, queue)
        except Exception as exc:
            log.warning(
                "status_queued_not_written",
                job_id=prepared.job_id,
                job=prepared.job,
                error=f"{type(exc).__name__}: {exc}",
                action="the job is queued; its status appears once a worker runs it",
            )

    @overload
    async def status(self, job_id: GroupId) -> GroupStatus | None: ...  # type: ignore[overload-overlap]

    @overload
    async def status(self, job_id: str) -> JobStatus | None: ...

    async def status(self, job_id: str) -> JobStatus | GroupStatus | None:
        """The job's latest status (``None``: unknown or expired id). Needs a status store.
        A group's id (``group-…``, from ``group``) gives the group's counts (``GroupStatus``)."""
        if is_group_id(job_id):
            return await self.group_status(job_id)
        return await self._store().get(job_id)

    # -- groups (``producers.groups``) ----------------------------------------------------------

    async def group(
        self,
        jobs: Iterable[Job | tuple[str, Payload]],
        *,
        then: Job,
        group_id: str | None = None,
    ) -> GroupId:
        """Publish ``jobs`` as one group; ``then`` runs once, after every member has ended
        (succeeded, dead or cancelled), with their ids, states and results in ``ctx.group``.
        Returns the group's id (``pub.status(group_id)``: its counts). Needs the status store's
        Redis (``GroupsUnavailableError``); see ``producers.groups``."""
        return await publish_group(self, self._group_store(), jobs, then, group_id)

    async def group_status(self, group_id: str) -> GroupStatus | None:
        """The group's counts per state (``None``: unknown or expired id)."""
        return await self._group_store().status(group_id)

    # -- runtime schedules (``producers.schedules``) ----------------------------------------------

    async def schedule(
        self,
        name: str,
        job: str,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        tz: str = "UTC",
        payload: Payload | None = None,
        missed: str = "once",
    ) -> RuntimeSchedule:
        """Add (or replace) the runtime schedule ``name``: ``job`` with ``payload`` on ``cron``
        (in ``tz``) or ``every`` seconds, fired by the app's scheduler leader exactly once per
        tick (job id ``<name>@<tick>``) from within about a second on. Kept in the status
        store's Redis (``SchedulesUnavailableError`` without it); validated like
        ``worker.schedule`` (``ConfigError``). Whether a worker knows ``job`` is not checked
        here: a tick no queue is bound for is logged ``schedule_unroutable`` by the leader."""
        body = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
        built = build_schedule(
            name, job, cron=cron, every=every, tz=tz, payload=body, missed=missed
        )
        await self._schedule_store().add(built)
        return built

    async def unschedule(self, name: str) -> bool:
        """Remove the runtime schedule ``name`` (it stops firing within about a second);
        ``False`` if there was none."""
        return await self._schedule_store().remove(name)

    async def schedules(self) -> list[RuntimeSchedule]:
        """The runtime schedules of this publisher's exchange (not the app's own)."""
        return await self._schedule_store().list()

    def _schedule_store(self) -> ScheduleStore:
        store = ScheduleStore.of(self._status_store, self._exchange)
        if store is None:
            raise SchedulesUnavailableError()
        return store

    def _group_store(self) -> GroupStore:
        if self._groups is None:
            self._groups = GroupStore.of(self._status_store)
            if self._groups is None:
                raise GroupsUnavailableError()
        return self._groups

    async def result(self, job_id: str, timeout: float | None = None) -> JsonValue:
        """Wait for the job to end: its result on ``succeeded``; ``JobFailed`` on ``dead``,
        ``JobCancelled`` on ``cancelled``, ``TimeoutError`` once ``timeout`` s passed."""
        return await wait_result(self._store(), job_id, timeout)

    async def _send(self, prepared: _Prepared) -> None:
        job_id = prepared.job_id
        in_flight = self._in_flight
        if job_id in in_flight:
            await self._after(job_id)
        in_flight[job_id] = None
        try:
            loop = asyncio.get_running_loop()
            # The timeout covers waiting for the channel too: during an outage the robust
            # channel waits for the reconnect, and a caller must hear within its timeout.
            deadline = loop.time() + self._timeout
            channel = self._underlay
            if channel is None or channel.is_closed:
                channel = await self._underlay_channel(prepared.job, deadline)
            try:  # a batch of one (``confirm.publish_one``, without its coroutine)
                await publish_batch(
                    channel, (prepared,), timeout=max(deadline - loop.time(), 0.001)
                )
            except BatchPublishError as exc:
                raise exc.errors[job_id] from None
        finally:
            waiting = in_flight.pop(job_id)
            if waiting is not None:
                waiting.set()
        child = self._published_children.get(prepared.job)
        if child is None:
            child = self._published_children[prepared.job] = self._published.labels(
                job_name=prepared.job
            )
        child.inc()

    async def _after(self, job_id: str) -> None:
        """Wait until no publish of ``job_id`` is in flight on this publisher (a return is
        matched to its publish by id, so two in flight with one id could get each other's)."""
        while job_id in self._in_flight:
            settled = self._in_flight[job_id]
            if settled is None:
                settled = self._in_flight[job_id] = asyncio.Event()
            await settled.wait()

    async def _underlay_channel(self, job: str, deadline: float) -> AbstractAiormqChannel:
        """The aiormq channel under the robust one, waiting for a reconnect until ``deadline``
        (``PublishTimeout``, not sent, after it); kept while it is open, so a publish on an
        open channel awaits nothing for it."""
        if self._channel is None:
            raise RuntimeError("Publisher is not connected: use `async with Publisher(...)`")
        try:
            async with asyncio.timeout_at(deadline):
                channel = await self._channel.get_underlay_channel()
        except TimeoutError:  # no channel in time: nothing was sent
            raise PublishTimeout(job, self._timeout, sent=False) from None
        self._underlay = channel
        return channel


class _Prepared(NamedTuple):
    """One validated job, ready to send: what ``_send`` needs and the id to return."""

    job: str
    job_id: str
    body: bytes
    properties: Basic.Properties
    exchange: str
    routing_key: str


def _as_publish_error(job: str, exc: BaseException) -> PublishError:
    """A job's failure as the ``PublishError`` a ``BatchPublishError`` names it with.

    A claim Redis could not make means nothing was sent; anything else unexpected leaves the
    outcome unknown (``maybe_queued``)."""
    if isinstance(exc, PublishError):
        return exc
    not_sent = isinstance(exc, StatusStoreUnavailable | DedupUnavailableError | ValueError)
    error = PublishError(
        job,
        f"job {job!r} "
        + ("was not sent" if not_sent else "may or may not have been queued")
        + f": {type(exc).__name__}: {exc}",
    )
    error.maybe_queued = not not_sent
    error.__cause__ = exc
    return error
