"""The worker's side of job groups (``producers.groups``): count each member's ending, publish
the group's final job once, and show the final job its group (``ctx.group``).

``GroupEnds.ended`` is called by settle for every outcome, after the outcome's status is
written and before the ack (``Settler._finish``). For a member (header ``x-group-id``) that
ended it records the ending in one Lua script; when the script says this settle completed
the group, the final job goes out as one more outcome copy, confirmed before the member's
ack, then the group is marked ``then_sent``. A crash anywhere before the ack leaves the member
unacked: it runs again, and its settle (the script is idempotent per member) publishes the
same final job id again. For the final job itself (header ``x-group-then``) it records its
state for ``pub.status(group_id)``.

``group_context`` is a chain layer (put outermost among the user's middleware by
``consumer.runtime.startup``): for a final job it loads ``ctx.group``, and a duplicate final
job (its status already ended: published twice across a crash) is not run again, its first
run's result stands.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay
from tenacity import wait_exponential_jitter as jitter

from leveret.consumer.delivery.outbox import Copy
from leveret.producers import (
    HEADER_GROUP,
    HEADER_GROUP_THEN,
    GroupMember,
    GroupStatus,
    GroupStore,
    JobGroup,
    ThenJob,
)
from leveret.producers.stores import StatusStoreUnavailable, StatusWrite, status_write
from leveret.producers.wire import check_max_attempts, check_priority, job_properties

if TYPE_CHECKING:
    from leveret.consumer.context import JobContext
    from leveret.consumer.delivery.envelope import Delivery
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


async def group_context(ctx: JobContext, call_next: Callable[[JobContext], Awaitable[Any]]) -> Any:
    """For a group's final job: ``ctx.group`` loaded, and a duplicate not run again."""
    group_id = _header(ctx.delivery, HEADER_GROUP_THEN)
    if group_id is None:
        return await call_next(ctx)
    ends: GroupEnds | None = getattr(ctx.lifecycle, "groups", None)
    if ends is None:
        return await call_next(ctx)
    status_writer = getattr(ctx.lifecycle, "status", None)
    if status_writer is not None:
        current = await status_writer.store.get(ctx.job_id)
        if current is not None and current.ended:
            log.warning(
                "group_then_duplicate",
                group_id=group_id,
                state=current.state,
                action="not run again: the first run's outcome stands",
            )
            return current.result
    ctx.group = await ends.store.load(group_id)
    return await call_next(ctx)


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
