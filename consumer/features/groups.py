"""The worker's side of job groups (``producers.groups``): count each member's ending, publish
the group's final job, run it once, and show it its group (``ctx.group``).

``GroupEnds.ended`` is called by settle for every outcome, after the outcome's status is
written and before the ack (``Settler._finish``). For a member (header ``x-group-id``) that
ended it records the ending in one Lua script; when the script says this settle completed
the group, the final job goes out as one more outcome copy, confirmed before the member's
ack, then the group is marked ``then_sent``. A crash anywhere before the ack leaves the member
unacked: it runs again, and its settle (the script is idempotent per member) publishes the
same final job id again. For the final job itself (header ``x-group-then``) it records its
state for ``pub.status(group_id)``.

**The final job runs once.** So the final job ``<group id>.then`` is published at least once
and, across a crash between its confirm and the member's ack, twice; both copies may be in
flight together (two workers, a prefetch over 1, the first still running). ``ThenOnce``, the
group layer (first of each job's coordination layers: ``GroupCoordination``), makes the
handler run once whatever the interleaving:

1. A final job's delivery takes a hold on the lock key ``<group id>.then`` (the ``lock=``
   store, ``features.locks``: Redis ``SET`` if absent, with ``LEVERET_LOCK_TTL``) *before* it
   reads anything. A key held by another copy's run postpones the delivery (``Postponed``:
   the delay chain, no attempt burnt, no run counted); Redis unreachable postpones it too.
2. Holding it, the delivery reads the job's status. Ended (``succeeded``, ``dead``,
   ``cancelled``): the handler is not run and the copy is acked as a duplicate
   (``outcomes.AlreadyEnded``: no event, no status write, no run counted). Else it loads
   ``ctx.group`` and runs the handler.
3. The hold is kept, renewed every third of the TTL, until the delivery's *task* ends, not
   when the handler returns: settle runs in that task and writes the outcome's status before
   the ack, so by the time the key is free the first run's ending is readable.

Hence two copies never run the handler at once (they hold one key in turn), and the copy
that takes the hold second reads the status the first one's settle wrote: once the first
run has ended, the second is skipped. A first run that crashes (SIGKILL, host lost) stops
renewing; its hold lapses within the TTL and the next copy (its own redelivery, or the
republished one) runs: its status never ended. What this does not cover:

* A run whose outcome is a *retry* has not ended: a second copy taking the hold then runs
  (its own attempt count), and the retry copy that comes later is skipped once either ends.
  Two copies of a failing final job can so spend two sets of attempts, one at a time.
* The hold is a lease. Lost while the handler runs (Redis unreachable from this worker for a
  whole TTL, or the key removed), it sets ``ctx.lock_lost`` and logs
  ``group_then_hold_lost``; an ``async`` handler is cancelled (``LockLost``, a ``Retry``),
  a ``def`` handler cannot be stopped and may overlap a second copy's run.
* A run that succeeds but whose settle fails (the status store down longer than settle
  waits) is given back and runs again, as any job whose outcome was not recorded.

A job without ``x-group-then`` passes the layer on one header lookup: no Redis call.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay
from tenacity import wait_exponential_jitter as jitter

from leveret.consumer.delivery.outbox import Copy
from leveret.consumer.delivery.outcomes import AlreadyEnded, Postponed
from leveret.consumer.features.locks import (
    POSTPONE_S,
    UNAVAILABLE_RETRY_S,
    Coordination,
    Lease,
    LockLost,
    LockStore,
    release_soon,
)
from leveret.producers import (
    HEADER_GROUP,
    HEADER_GROUP_THEN,
    GroupMember,
    GroupStatus,
    GroupStore,
    JobGroup,
    ThenJob,
    then_id,
)
from leveret.producers.stores import (
    StatusStoreError,
    StatusStoreUnavailable,
    StatusWrite,
    status_write,
)
from leveret.producers.wire import check_max_attempts, check_priority, job_properties

if TYPE_CHECKING:
    from leveret.consumer.context import JobContext
    from leveret.consumer.delivery.envelope import Delivery
    from leveret.consumer.delivery.middleware import CallNext
    from leveret.consumer.delivery.status_writer import StatusWriter

log = structlog.get_logger("leveret.worker")

# A member's endings: what a group counts (a retry is none).
ENDED_STATES = ("succeeded", "dead", "cancelled")

# Redis just took the member's status write, so an outage here is short: retried this long
# before the settle fails (the member is then given back and runs again, counted once).
END_RETRY_S = 30.0


def _header(d: Any, name: str) -> str | None:
    headers = d.properties.headers if d is not None else None
    if not headers:
        return None
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def then_copy(then: ThenJob) -> Copy:
    """The final job's message, built as a publish would build it."""
    props = job_properties(
        then.job,
        then.job_id,
        check_priority(then.priority),
        {HEADER_GROUP_THEN: then.job_id.removesuffix(".then")},
        max_attempts=check_max_attempts(then.max_attempts),
    )
    return Copy(then.body.encode(), then.exchange, then.routing_key, props)


class GroupEnds:
    """One per settler: the group store on the status store's client."""

    def __init__(self, store: GroupStore, queue_of: Mapping[str, str]) -> None:
        self.store = store
        self._queue_of = queue_of

    async def ended(
        self,
        d: Delivery,
        write: StatusWrite,
        confirm: Callable[[tuple[Copy, ...]], Awaitable[Any]],
        status: StatusWriter | None,
    ) -> None:
        """Settle's hook (see the module docstring); ``write`` is the outcome's status write."""
        if not d.properties.headers or write.kind not in ENDED_STATES:
            return
        group_id = _header(d, HEADER_GROUP)
        if group_id is not None:
            await self._member_ended(d, group_id, write, confirm, status)
        then_of = _header(d, HEADER_GROUP_THEN)
        if then_of is not None:
            await self._retrying(lambda: self.store.then_state(then_of, write.kind))

    async def _member_ended(
        self,
        d: Delivery,
        group_id: str,
        write: StatusWrite,
        confirm: Callable[[tuple[Copy, ...]], Awaitable[Any]],
        status: StatusWriter | None,
    ) -> None:
        fields = dict(zip(write.fields[::2], write.fields[1::2], strict=True))
        result = json.loads(fields["result"]) if "result" in fields else None
        code, then = await self._retrying(
            lambda: self.store.end(
                group_id,
                d.job_id,
                write.kind,
                job=fields.get("job"),
                result=result,
                error=fields.get("error"),
            )
        )
        if code < 0:
            log.warning(
                "group_unknown",
                group_id=group_id,
                action="the member's ending is not counted (the group expired or was never "
                "recorded)",
            )
            return
        if then is None:
            return
        await confirm((then_copy(then),))
        if status is not None:
            queued = status_write("queued", then.job_id, then.job, self._queue_of.get(then.job), 0)
            await status.record([queued])
        await self._retrying(lambda: self.store.then_sent(group_id))
        log.info("group_completed", group_id=group_id, then_id=then.job_id, then_job=then.job)

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()``, again while Redis is unreachable, for up to ``END_RETRY_S`` (every
        store call here is idempotent)."""
        try:
            return await call()
        except StatusStoreUnavailable:
            pass
        result: Any = None
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StatusStoreUnavailable),
            wait=jitter(multiplier=0.1, max=2.0),
            stop=stop_after_delay(END_RETRY_S),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                result = await call()
        return result


def group_ends(status: StatusWriter | None, queue_of: Mapping[str, str]) -> GroupEnds | None:
    """Settle's group hook: on a Redis status store's client, else ``None`` (no groups)."""
    if status is None:
        return None
    store = GroupStore.of(status.store)
    return None if store is None else GroupEnds(store, queue_of)


class ThenOnce:
    """The chain layer that runs a group's final job once (the module docstring argues it).

    One per job on a worker with a status store (``GroupCoordination.layers``), since any job
    may be a group's final job: a delivery without ``x-group-then`` passes through on one
    header lookup. For a final job: take the hold on ``<group id>.then`` (held elsewhere:
    ``Postponed``), read the job's status (ended: not run, dropped as a duplicate),
    load ``ctx.group``, run. The hold is kept until the delivery's task ends.
    """

    __slots__ = ("_store", "_ttl", "cancels")

    def __init__(self, store: LockStore, ttl_s: float, *, cancels: bool) -> None:
        self._store = store
        self._ttl = ttl_s
        self.cancels = cancels  # an async handler: cancelled if its hold is lost mid-run

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        group_id = _header(ctx.delivery, HEADER_GROUP_THEN)
        if group_id is None:
            return await call_next(ctx)
        ends: GroupEnds | None = getattr(ctx.lifecycle, "groups", None)
        status_writer: StatusWriter | None = getattr(ctx.lifecycle, "status", None)
        task = asyncio.current_task()
        if ends is None or status_writer is None or task is None:
            return await call_next(ctx)
        key = then_id(group_id)
        owner = f"{ctx.job_id}:{uuid.uuid4().hex[:8]}"
        try:
            token = await self._store.acquire(key, owner, self._ttl)
        except StatusStoreError as exc:
            raise Postponed(UNAVAILABLE_RETRY_S, f"lock store unavailable ({exc})") from None
        if token is None:
            why = f"group final job {key!r} held by another copy's run"
            raise Postponed(random.uniform(*POSTPONE_S), why)
        # The hold lasts until the delivery's task ends (settle included), renewed meanwhile;
        # a loss cancels the task only while the handler runs (``_run``).
        hold = Lease(
            self._store, key, owner, token, self._ttl, ctx, None, lost_event="group_then_hold_lost"
        )
        task.add_done_callback(lambda _: _end(hold))
        try:  # nothing has run yet: Redis away postpones, as the lock layer does
            current = await status_writer.store.get(ctx.job_id)
            if current is None or not current.ended:
                ctx.group = await ends.store.load(group_id)
        except StatusStoreError as exc:
            raise Postponed(UNAVAILABLE_RETRY_S, f"status store unavailable ({exc})") from None
        if current is not None and current.ended:
            log.warning("group_then_duplicate", group_id=group_id, state=current.state)
            raise AlreadyEnded(current.state)
        return await self._run(hold, task, ctx, call_next)

    async def _run(
        self, hold: Lease, task: asyncio.Task[Any], ctx: JobContext, call_next: CallNext
    ) -> Any:
        """The rest of the chain; a run its lost hold cancelled raises ``LockLost``."""
        hold.watch_run(task if self.cancels else None)
        try:
            result = await call_next(ctx)
        except asyncio.CancelledError:
            if hold.cancelled_run and task.uncancel() == 0:
                raise LockLost(hold.key, hold.why) from None
            raise
        finally:
            hold.watch_run(None)
        if hold.cancelled_run:  # the handler swallowed the cancellation
            task.uncancel()
        return result


def _end(hold: Lease) -> None:
    """The final job's delivery is over: stop renewing, release (not awaited)."""
    hold.stop()
    release_soon(hold.store, hold.key, hold.owner, hold.token)


class GroupCoordination(Coordination):
    """The worker's ``Coordination`` (``startup.coordination``, with a status store) with the
    group layer in front of each job's ``lock=``/``idempotency_key=`` layers: after the rate
    limit, outside tracing and ``JobMetrics`` (a postponed or skipped copy is no run). The
    final job's hold is a lock of the same store, with ``LEVERET_LOCK_TTL``."""

    def layers(self, spec: Any, max_waiting: int) -> list[Any]:
        hold = ThenOnce(self, self.settings.lock_ttl, cancels=bool(spec.is_async))
        return [hold, *super().layers(spec, max_waiting)]


class MemoryGroups:
    """Groups in memory for ``TestBroker``: the same counting (each member once, its first
    ending stands) and the same ``JobGroup``/``GroupStatus``, without Redis."""

    def __init__(self) -> None:
        self._groups: dict[str, tuple[list[str], ThenJob, dict[str, GroupMember]]] = {}
        self._member_of: dict[str, str] = {}
        self._then_of: dict[str, str] = {}
        self._then_state: dict[str, str] = {}

    def add(self, group_id: str, member_ids: list[str], then: ThenJob) -> None:
        self._groups[group_id] = (member_ids, then, {})
        for member_id in member_ids:
            self._member_of[member_id] = group_id
        self._then_of[then.job_id] = group_id

    def ended(
        self, job_id: str, job: str, state: str, result: Any = None, error: str | None = None
    ) -> ThenJob | None:
        """Count a job's ending; the group's final job when this ending completed it."""
        then_of = self._then_of.get(job_id)
        if then_of is not None:
            self._then_state[then_of] = state
        group_id = self._member_of.get(job_id)
        if group_id is None:
            return None
        members, then, ended = self._groups[group_id]
        if job_id in ended:
            return None
        ended[job_id] = GroupMember(id=job_id, job=job, state=state, result=result, error=error)
        if len(ended) < len(members):
            return None
        self._then_state[group_id] = "queued"
        return then

    def group(self, then_job_id: str) -> JobGroup | None:
        """``ctx.group`` for a final job's id (``None`` for any other job)."""
        group_id = self._then_of.get(then_job_id)
        if group_id is None:
            return None
        members, _, ended = self._groups[group_id]
        out = [ended.get(m) or GroupMember(id=m, state="pending") for m in members]
        counts = dict.fromkeys(ENDED_STATES, 0)
        for m in out:
            counts[m.state] = counts.get(m.state, 0) + 1
        return JobGroup(id=group_id, members=out, counts=counts)

    def status(self, group_id: str) -> GroupStatus | None:
        if group_id not in self._groups:
            return None
        members, then, ended = self._groups[group_id]
        counts = dict.fromkeys(ENDED_STATES, 0)
        for m in ended.values():
            counts[m.state] += 1
        counts["pending"] = len(members) - len(ended)
        return GroupStatus(
            id=group_id,
            total=len(members),
            ended=len(ended),
            counts=counts,
            then_id=then.job_id,
            then_job=then.job,
            then_state=self._then_state.get(group_id),
        )
