"""Job groups: publish several jobs as one group; a final job runs once every member has ended.

``await pub.group([Job(...), ...], then=Job("report", {...}))`` publishes the members (on any
queues) with the header ``x-group-id`` and returns the group's id (``group-<uuid>``). When a
member *ends* (``succeeded``, ``dead`` or ``cancelled``; a retry is not an ending) the worker
settling it records the ending in Redis, in one Lua script (``_END_LUA``):

* ``HSETNX`` of the member's id into the group's members hash: idempotent, so a member that
  runs again after a crash, or is settled twice, is counted once (its first ending stands);
* the count of its state and of ended members goes up in the same script, so two members
  ending at the same instant on two workers are both counted, whatever the order;
* the recording that makes ``ended == total`` names its member the group's *completer*.

Only a settle of the completer publishes the ``then`` job, with the deterministic id
``<group id>.then``, as one more outcome copy: confirmed by the broker *before* the member is
acked (``consumer.features.groups``). A worker that dies in between never acked the completer,
so the broker redelivers it; its settle finds it is still the completer with ``then`` not yet
marked sent, and publishes the same id again. Once confirmed, ``then_sent`` is set. So ``then``
is published at least once, and twice only if a worker dies in the microseconds between the
confirm and that mark; a duplicate is not run again: a final job's delivery holds the lock
key ``<group id>.then`` until it is settled, so a second copy waits (postponed) and then finds
the job ended and is acked as a duplicate (``consumer.features.groups``).

The ``then`` job runs with ``ctx.group`` (a ``JobGroup``): every member's id, job, state,
result (on ``succeeded``) and error, and the counts. ``pub.status(group_id)`` (or
``pub.group_status``) reads the counts: ``GroupStatus``.

Groups need the status store's Redis (``LEVERET_STATUS_URL``): ``GroupsUnavailableError``
otherwise, before anything is published. Keys live under ``leveret:group:`` and expire with
the status TTL, renewed as members end.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict, JsonValue

from leveret.producers.errors import DuplicateJobIdError
from leveret.producers.stores.redis import (
    DEFAULT_TIMEOUT_S,
    StatusStoreError,
    redis_call,
    redis_client,
)
from leveret.producers.stores.settings import DEFAULT_STATUS_TTL
from leveret.producers.wire.events import CANCELLED, DEAD, SUCCEEDED, now_rfc3339

if TYPE_CHECKING:
    from leveret.producers.publisher import Job, Payload, Publisher

__all__ = [
    "GROUP_ID_PREFIX",
    "HEADER_GROUP",
    "HEADER_GROUP_THEN",
    "GroupId",
    "GroupMember",
    "GroupStatus",
    "GroupStore",
    "GroupsUnavailableError",
    "JobGroup",
    "ThenJob",
    "is_group_id",
    "new_group_id",
    "publish_group",
    "then_id",
]

HEADER_GROUP: Final = "x-group-id"
# Carried by a group's final job: the group whose members ``ctx.group`` shows.
HEADER_GROUP_THEN: Final = "x-group-then"
GROUP_ID_PREFIX: Final = "group-"
DEFAULT_GROUP_PREFIX: Final = "leveret:group:"
ENDED_STATES: Final = (SUCCEEDED, DEAD, CANCELLED)


class GroupsUnavailableError(StatusStoreError):
    """Groups need the status store's Redis (``LEVERET_STATUS_URL``)."""

    def __init__(self) -> None:
        super().__init__(
            "job groups need a Redis status store: set LEVERET_STATUS_URL (or pass "
            "Publisher(url, status_url='redis://…')); members' endings are counted there"
        )


class GroupId(str):
    """A group's id (``group-<uuid>``): a ``str``, typed apart so ``pub.status(group_id)`` is
    known to return a ``GroupStatus``."""

    __slots__ = ()


def new_group_id() -> GroupId:
    return GroupId(f"{GROUP_ID_PREFIX}{uuid.uuid4()}")


THEN_SUFFIX = ".then"


def is_group_id(value: str) -> bool:
    """A group's own id, not its final job's (``<group id>.then``, a job id like any other)."""
    return value.startswith(GROUP_ID_PREFIX) and not value.endswith(THEN_SUFFIX)


def then_id(group_id: str) -> str:
    """The final job's id: deterministic, so a republish after a crash is the same job."""
    return f"{group_id}{THEN_SUFFIX}"


class ThenJob(BaseModel):
    """The final job as stored with its group: everything a worker needs to publish it."""

    job: str
    job_id: str
    body: str  # the JSON payload, as the publisher encoded it
    exchange: str
    routing_key: str
    priority: int | None = None
    max_attempts: int | None = None


class GroupMember(BaseModel):
    """One member's ending, as ``ctx.group`` shows it."""

    model_config = ConfigDict(frozen=True)

    id: str
    job: str | None = None
    state: str
    result: JsonValue = None
    error: str | None = None
    ended_at: str | None = None


class GroupStatus(BaseModel):
    """``pub.status(group_id)``: the group's counts. ``counts`` has ``succeeded``, ``dead``,
    ``cancelled`` (members ended so) and ``pending`` (not ended yet); ``then_state`` is the
    final job's state once it was published (``queued``, then its ending), else ``None``."""

    model_config = ConfigDict(frozen=True)

    id: str
    total: int
    ended: int
    counts: dict[str, int]
    then_id: str
    then_job: str
    then_state: str | None = None
    created_at: str | None = None

    @property
    def done(self) -> bool:
        """Every member has ended."""
        return self.ended >= self.total


class JobGroup(BaseModel):
    """``ctx.group`` in a group's final job: its members' endings, in publish order."""

    model_config = ConfigDict(frozen=True)

    id: str
    members: list[GroupMember]
    counts: dict[str, int]

    @property
    def succeeded(self) -> list[GroupMember]:
        return [m for m in self.members if m.state == SUCCEEDED]

    @property
    def failed(self) -> list[GroupMember]:
        """Members that did not succeed (``dead`` or ``cancelled``)."""
        return [m for m in self.members if m.state != SUCCEEDED]

    @property
    def results(self) -> dict[str, JsonValue]:
        """Member id -> result, for the members that succeeded."""
        return {m.id: m.result for m in self.members if m.state == SUCCEEDED}


# KEYS[1] the group's hash, KEYS[2] its members hash. ARGV: member id, state, the member's
# ending as JSON, ttl. Returns {status, then}: status -1 unknown group (expired, or published
# without this store), 0 recorded (or already recorded) and nothing to publish, 1 this settle
# must publish ``then`` (its JSON in the second entry).
_END_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local ttl = tonumber(ARGV[4])
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
  local ended = redis.call('HINCRBY', KEYS[1], 'ended', 1)
  if ended == tonumber(redis.call('HGET', KEYS[1], 'total')) then
    redis.call('HSET', KEYS[1], 'completer', ARGV[1])
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
local g = redis.call('HMGET', KEYS[1], 'completer', 'then_sent', 'then')
if g[1] == ARGV[1] and not g[2] then return {1, g[3]} end
return {0, ''}
"""

# KEYS[1] the group's hash; ARGV: the final job's state. Not once it has ended (final).
_THEN_STATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], 'then_state')
if cur == 'succeeded' or cur == 'dead' or cur == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'then_state', ARGV[1])
return 1
"""


class GroupStore:
    """Groups on the status store's Redis (the same client: one per process)."""

    def __init__(
        self,
        client: Any,
        *,
        ttl: int = DEFAULT_STATUS_TTL,
        prefix: str = DEFAULT_GROUP_PREFIX,
        url: str = "redis",
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.prefix = prefix
        self._where = f"group store at {url} (prefix {prefix!r})"
        self._end = client.register_script(_END_LUA)
        self._then_state = client.register_script(_THEN_STATE_LUA)

    @classmethod
    def from_url(
        cls, url: str, *, ttl: int = DEFAULT_STATUS_TTL, timeout: float = DEFAULT_TIMEOUT_S
    ) -> GroupStore:
        return cls(redis_client(url, timeout=timeout), ttl=ttl, url=url)

    @classmethod
    def of(cls, status_store: Any) -> GroupStore | None:
        """On a Redis status store's client, with its TTL; ``None`` for any other store."""
        from leveret.producers.stores.status import RedisStatusStore

        if not isinstance(status_store, RedisStatusStore):
            return None
        return cls(status_store.client, ttl=status_store.ttl, url=status_store.url)

    def _keys(self, group_id: str) -> tuple[str, str]:
        key = self.prefix + group_id
        return key, key + ":members"

    async def create(self, group_id: str, member_ids: list[str], then: ThenJob) -> None:
        """Record the group before any member is published (a member may end at once). An id
        already in use is refused (``DuplicateJobIdError``): recording it again would reset
        the counts of members that may have ended already."""
        key, members = self._keys(group_id)
        claimed = await redis_call(
            self._where, "create", self.client.hsetnx(key, "total", len(member_ids))
        )
        if not claimed:
            raise DuplicateJobIdError(group_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(members)
        pipe.hset(
            key,
            mapping={
                "total": len(member_ids),
                "ended": 0,
                "then": then.model_dump_json(),
                "then_id": then.job_id,
                "then_job": then.job,
                "order": json.dumps(member_ids),
                "created_at": now_rfc3339(),
            },
        )
        pipe.expire(key, self.ttl)
        await redis_call(self._where, "create", pipe.execute())

    async def end(
        self,
        group_id: str,
        member_id: str,
        state: str,
        *,
        job: str | None = None,
        result: JsonValue = None,
        error: str | None = None,
    ) -> tuple[int, ThenJob | None]:
        """Record a member's ending (idempotent per member). Returns the script's status (-1
        unknown group, 0 recorded, 1 publish ``then``) and, for 1, the final job to publish."""
        record = json.dumps(
            {"job": job, "state": state, "result": result, "error": error, "at": now_rfc3339()},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        key, members = self._keys(group_id)
        raw = await redis_call(
            self._where,
            "end",
            self._end(keys=[key, members], args=[member_id, state, record, self.ttl]),
        )
        code = int(raw[0])
        return code, (ThenJob.model_validate_json(raw[1]) if code == 1 else None)

    async def then_sent(self, group_id: str) -> None:
        """The final job is confirmed in its queue: no settle publishes it again."""
        key, _ = self._keys(group_id)
        await redis_call(self._where, "then_sent", self._then_state(keys=[key], args=["queued"]))
        await redis_call(self._where, "then_sent", self.client.hset(key, "then_sent", "1"))

    async def then_state(self, group_id: str, state: str) -> None:
        key, _ = self._keys(group_id)
        await redis_call(self._where, "then_state", self._then_state(keys=[key], args=[state]))

    async def status(self, group_id: str) -> GroupStatus | None:
        key, _ = self._keys(group_id)
        raw: dict[str, str] = await redis_call(self._where, "status", self.client.hgetall(key))
        if not raw:
            return None
        total, ended = int(raw["total"]), int(raw.get("ended", 0))
        counts = {state: int(raw.get(state, 0)) for state in ENDED_STATES}
        counts["pending"] = max(total - ended, 0)
        return GroupStatus(
            id=group_id,
            total=total,
            ended=ended,
            counts=counts,
            then_id=raw["then_id"],
            then_job=raw["then_job"],
            then_state=raw.get("then_state"),
            created_at=raw.get("created_at"),
        )

    async def load(self, group_id: str) -> JobGroup | None:
        """The members' endings (what ``ctx.group`` shows), in publish order."""
        key, members = self._keys(group_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(key, "order")
        pipe.hgetall(members)
        order_raw, ended = await redis_call(self._where, "load", pipe.execute())
        if order_raw is None:
            return None
        out: list[GroupMember] = []
        counts = dict.fromkeys(ENDED_STATES, 0)
        for member_id in json.loads(order_raw):
            record = ended.get(member_id)
            if record is None:
                out.append(GroupMember(id=member_id, state="pending"))
                counts["pending"] = counts.get("pending", 0) + 1
                continue
            data = json.loads(record)
            out.append(
                GroupMember(
                    id=member_id,
                    job=data.get("job"),
                    state=data["state"],
                    result=data.get("result"),
                    error=data.get("error"),
                    ended_at=data.get("at"),
                )
            )
            counts[data["state"]] = counts.get(data["state"], 0) + 1
        return JobGroup(id=group_id, members=out, counts=counts)

    async def delete(self, group_id: str) -> None:
        await redis_call(self._where, "delete", self.client.delete(*self._keys(group_id)))


async def publish_group(
    pub: Publisher,
    store: GroupStore,
    jobs: Iterable[Job | tuple[str, Payload]],
    then: Job,
    group_id: str | None = None,
) -> GroupId:
    """``Publisher.group``: record the group, then publish its members in one batch.

    Every member and the final job are validated and built before anything is written. A
    member the broker did not confirm is recorded ``dead`` (error ``not published: …``) so the
    group still completes, and the ``BatchPublishError`` is raised once that is recorded.
    """
    from leveret.producers.errors import DuplicateJobIdError
    from leveret.producers.publisher import Job, delay_seconds, prepare_job

    gid = GroupId(group_id) if group_id is not None else new_group_id()
    if not is_group_id(gid):
        raise ValueError(
            f"a group id starts with {GROUP_ID_PREFIX!r} and does not end with "
            f"{THEN_SUFFIX!r} (its final job's id), got {gid!r}"
        )
    exchange = pub.settings.exchange
    members = []
    seen: set[str] = set()
    for item in jobs:
        if isinstance(item, Job):
            if item.dedup_key is not None:
                raise ValueError(f"group member {item.job!r}: a group member has no dedup_key")
            prepared = prepare_job(
                exchange,
                item.job,
                item.payload,
                item.priority,
                delay_seconds(item.delay, item.eta),
                item.job_id,
                {HEADER_GROUP: str(gid)},
                item.max_attempts,
            )
        else:
            job, payload = item
            prepared = prepare_job(exchange, job, payload, headers={HEADER_GROUP: str(gid)})
        if prepared.job_id in seen:
            raise DuplicateJobIdError(prepared.job_id)
        seen.add(prepared.job_id)
        members.append(prepared)
    if not members:
        raise ValueError("a group needs at least one member job")
    if then.dedup_key is not None or then.job_id is not None:
        raise ValueError("the final job's id is the group's (<group id>.then); no job_id/dedup_key")
    final = prepare_job(
        exchange,
        then.job,
        then.payload,
        then.priority,
        delay_seconds(then.delay, then.eta),
        then_id(gid),
        {HEADER_GROUP_THEN: str(gid)},
        then.max_attempts,
    )
    spec = ThenJob(
        job=final.job,
        job_id=final.job_id,
        body=final.body.decode(),
        exchange=final.exchange,
        routing_key=final.routing_key,
        priority=then.priority,
        max_attempts=then.max_attempts,
    )
    await store.create(gid, [p.job_id for p in members], spec)
    results, error = await pub._send_batch(members)
    if pub._status_store is not None:
        for p, r in zip(members, results, strict=True):
            if r is None:
                await pub._record_queued(p)
    if error is None:
        return gid
    for p, r in zip(members, results, strict=True):
        if r is None:
            continue
        _, publish_then = await store.end(
            gid, p.job_id, DEAD, job=p.job, error=f"not published: {type(r).__name__}: {r}"
        )
        if publish_then is not None:  # every member failed to publish: the final job is ours
            await pub._send(final)
            await store.then_sent(gid)
    raise error
