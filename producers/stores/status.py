"""Job status: the latest state of each job, written by whoever decides it, readable by id.

The publisher writes ``queued``; the worker writes ``started`` (best effort) and each outcome
after its copies are confirmed and before its ack, batched per loop turn (``write_many``, one
round trip). Writes can still arrive late, twice, or out of order (two workers after a
redelivery; a best-effort ``progress`` overtaken by the outcome). The store therefore never
applies a write blindly. The rule, the same in every store:

* a status that has ended (``succeeded``, ``dead``, ``cancelled``) is final;
* an ending event wins over any state that has not ended, whatever its ``attempt`` (a job
  cancelled while waiting for a retry may report ``attempt`` 0: no handler ran for it);
* other states are ordered by ``(attempt, rank)`` with ``queued`` < ``started`` < ``retrying``,
  and an event only applies if it moves that key forward (a duplicate changes nothing);
* ``progress`` updates ``progress``/``message`` while the status is ``started`` for the same
  attempt, unless it is older than the status; arriving first, it proves the run started and
  moves the status to ``started`` like a ``started`` event would;
* ``queued`` (written by whoever publishes) never overwrites anything: a worker may be faster.

``MemoryStatusStore`` implements the rule in Python (``next_status``); ``RedisStatusStore``
implements it again in one Lua script, so that the read-compare-write is atomic however many
workers write at once and a batch costs one round trip. The shared test suite runs both against
the same histories, in every order, so the two cannot drift apart unnoticed.

``wait_result`` polls (every 0.1 s by default) rather than subscribing to keyspace notifications:
those need ``notify-keyspace-events`` set on the server, which managed Redis often forbids, and a
poll of one key is cheap next to the 1 s the contract allows.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Final, Literal, NamedTuple

from pydantic import AwareDatetime, BaseModel, ConfigDict, JsonValue, field_serializer

from leveret.producers.broker.connection import mask_url
from leveret.producers.stores.redis import (
    DEFAULT_CANCEL_PREFIX,
    DEFAULT_DEDUP_PREFIX,
    DEFAULT_STATUS_PREFIX,
    DEFAULT_TIMEOUT_S,
    StatusStoreError,
    StatusStoreUnavailable,
    redis_call,
    redis_client,
)
from leveret.producers.stores.settings import DEFAULT_STATUS_TTL
from leveret.producers.wire.events import (
    CANCELLED,
    DEAD,
    PROGRESS,
    STARTED,
    SUCCEEDED,
    TERMINAL_STATES,
    JobEvent,
    now,
    now_rfc3339,
    rfc3339,
)
from leveret.topology.errors import LeveretError

# The store's errors and the key prefixes live in ``producers.redis`` (every Redis user shares
# them) and are re-exported here, where the store's callers have always imported them from.
__all__ = [
    "DEFAULT_CANCEL_PREFIX",
    "DEFAULT_DEDUP_PREFIX",
    "DEFAULT_PREFIX",
    "QUEUED",
    "REVIVE",
    "JobCancelled",
    "JobFailed",
    "JobStatus",
    "MemoryStatusStore",
    "RedisStatusStore",
    "StatusState",
    "StatusStore",
    "StatusStoreError",
    "StatusStoreUnavailable",
    "StatusWrite",
    "next_status",
    "queued_status",
    "status_write",
    "wait_result",
    "write_from_event",
]

StatusState = Literal["queued", "started", "retrying", "succeeded", "dead", "cancelled"]
QUEUED: Final = "queued"
DEFAULT_PREFIX: Final = DEFAULT_STATUS_PREFIX
# ``DEFAULT_DEDUP_PREFIX``/``DEFAULT_CANCEL_PREFIX`` (from ``producers.redis``, where
# ``producers.dedup`` and ``producers.cancel`` take theirs): an ending write frees a dedup
# claim, a revive clears a cancel mark, in one script.
_RANK: Final[dict[str, int]] = {QUEUED: 0, STARTED: 1, "retrying": 2}


# --- errors (``StatusStoreError``/``StatusStoreUnavailable``: ``producers.redis``) ---------------


class JobFailed(LeveretError):
    """The job ended ``dead``: its last run failed and it will not run again."""

    def __init__(self, job_id: str, error: str | None, status: JobStatus) -> None:
        self.job_id = job_id
        self.error = error
        self.status = status
        super().__init__(
            f"job {job_id} ({status.job}) failed after {status.attempt} attempt(s): "
            f"{error or 'no error recorded'}"
        )


class JobCancelled(LeveretError):
    """The job ended ``cancelled``: it was cancelled before it could succeed."""

    def __init__(self, job_id: str, error: str | None, status: JobStatus) -> None:
        self.job_id = job_id
        self.error = error
        self.status = status
        super().__init__(
            f"job {job_id} ({status.job}) was cancelled" + (f": {error}" if error else "")
        )


# --- the status object and the rule -----------------------------------------------------------


class JobStatus(BaseModel):
    """The contract's status object; ``model_dump(mode="json")`` is what users see."""

    model_config = ConfigDict(frozen=True)

    id: str
    job: str
    # Not known yet for a job published by a service that does not load the app: the first
    # write of a worker (or of the HTTP API, which loads the app) fills it in.
    queue: str | None
    state: StatusState
    attempt: int
    result: JsonValue = None
    error: str | None = None
    progress: float | None = None
    message: str | None = None
    updated_at: AwareDatetime
    created_at: AwareDatetime | None = None
    started_at: AwareDatetime | None = None
    ended_at: AwareDatetime | None = None

    @field_serializer("updated_at", "created_at", "started_at", "ended_at")
    def _serialize_times(self, value: datetime | None) -> str | None:
        return None if value is None else rfc3339(value)

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES


QUEUED_KIND: Final = QUEUED
REVIVE: Final = "revive"
_NOT_RUN: Final = frozenset({QUEUED, REVIVE})


class StatusWrite(NamedTuple):
    """One status change, as the store's script takes it (build it with ``status_write``).

    ``fields`` are the field/value pairs of the complete new status (absent fields left out);
    the store decides under the ordering rule whether it applies and keeps what the new status
    does not say (``created_at``, a run's ``started_at``, a ``queue`` known earlier, the
    attempt's progress when ``inherit``). ``dedup_key``, the key the job carries (its
    ``x-dedup-key`` header): an ending frees the claim if this job holds it; a ``revive`` holds
    it again when it is free; a ``queued`` keeps the job's pending claim for the status TTL (a
    follow-up enqueued with a key, once confirmed).
    """

    job_id: str
    kind: str  # an event state, ``queued`` or ``revive``
    attempt: int
    at: str  # RFC 3339, fixed width: string order is time order
    fields: tuple[str, ...]
    inherit: bool = False
    dedup_key: str | None = None


def status_write(
    kind: str,
    job_id: str,
    job: str,
    queue: str | None,
    attempt: int,
    *,
    at: datetime | str | None = None,
    result: JsonValue = None,
    error: str | None = None,
    progress: float | None = None,
    message: str | None = None,
    started_at: datetime | str | None = None,
    dedup_key: str | None = None,
) -> StatusWrite:
    """The write for ``kind`` (``queued``, ``revive``, or an event state); ``result`` is kept
    on ``succeeded`` only, ``ended_at`` is ``at`` for an ending state, and ``started_at`` is
    ``at`` for ``started``/``progress`` (else the run's start when one ran)."""
    when = at if isinstance(at, str) else rfc3339(at) if at is not None else now_rfc3339()
    state = STARTED if kind == PROGRESS else QUEUED if kind == REVIVE else kind
    pairs: list[str] = ["id", job_id, "job", job, "state", state, "attempt", str(attempt)]
    pairs += ["updated_at", when]
    if queue:
        pairs += ["queue", queue]
    if kind in (STARTED, PROGRESS):
        pairs += ["started_at", when]
    elif started_at is not None and kind not in _NOT_RUN:
        pairs += ["started_at", started_at if isinstance(started_at, str) else rfc3339(started_at)]
    if kind in TERMINAL_STATES:
        pairs += ["ended_at", when]
    if kind == SUCCEEDED and result is not None:
        pairs += ["result", json.dumps(result, separators=(",", ":"), ensure_ascii=False)]
    if error is not None:
        pairs += ["error", error]
    if progress is not None:
        pairs += ["progress", repr(float(progress))]
    if message is not None:
        pairs += ["message", message]
    inherit = kind != PROGRESS and progress is None and message is None
    return StatusWrite(job_id, kind, attempt, when, tuple(pairs), inherit, dedup_key)


def write_from_event(event: JobEvent) -> StatusWrite:
    """The write an event stands for (a run's ``started_at`` from its ``duration_s``)."""
    started_at = None
    if event.duration_s is not None:
        started_at = event.at - timedelta(seconds=event.duration_s)
    return status_write(
        event.state,
        event.job_id,
        event.job,
        event.queue,
        event.attempt,
        at=event.at,
        result=event.result,
        error=event.error,
        progress=event.progress,
        message=event.message,
        started_at=started_at,
    )


def queued_status(
    job_id: str, job: str, queue: str | None, at: datetime | None = None
) -> JobStatus:
    moment = at or now()
    return JobStatus(
        id=job_id,
        job=job,
        queue=queue,
        state=QUEUED,
        attempt=0,
        updated_at=moment,
        created_at=moment,
    )


def next_status(current: JobStatus | None, write: StatusWrite) -> JobStatus | None:
    """The status after ``write``, or ``None`` when it must not change it (the rule of the
    module docstring; ``_WRITE_LUA`` is the same rule for Redis)."""
    new = _from_hash(dict(zip(write.fields[::2], write.fields[1::2], strict=True)))
    assert new is not None
    if write.kind == REVIVE:
        return new.model_copy(
            update={
                "created_at": (current.created_at if current else None) or new.updated_at,
                "queue": new.queue or (current.queue if current else None),
            }
        )
    if current is not None:
        if current.ended or write.kind == QUEUED:
            return None
        if write.kind == PROGRESS and current.state == STARTED and current.attempt == write.attempt:
            if write.at < rfc3339(current.updated_at):
                return None  # an older progress report overtaken by a newer one
            return current.model_copy(
                update={
                    "progress": new.progress,
                    "message": new.message,
                    "updated_at": new.updated_at,
                }
            )
        if write.kind not in TERMINAL_STATES and (write.attempt, _RANK[new.state]) <= (
            current.attempt,
            _RANK[current.state],
        ):
            return None
    if current is None:
        return new.model_copy(update={"created_at": new.updated_at})
    keep = current.attempt == write.attempt and write.inherit
    return new.model_copy(
        update={
            "created_at": current.created_at or new.updated_at,
            "started_at": new.started_at or current.started_at,
            "queue": new.queue or current.queue,
            "progress": current.progress if keep else new.progress,
            "message": current.message if keep else new.message,
        }
    )


# --- the interface ----------------------------------------------------------------------------


class StatusStore(ABC):
    """Where statuses live. Every method is safe to call from many processes at once."""

    ttl: int

    @abstractmethod
    async def get(self, job_id: str) -> JobStatus | None:
        """The job's status, or ``None`` for an unknown (or expired) id."""

    @abstractmethod
    async def write_many(self, writes: Sequence[StatusWrite]) -> list[bool | str]:
        """Apply each write under the ordering rule, all in one step (one round trip for
        Redis): per write ``True`` if it changed the status, ``False`` if the rule discarded
        it, or the store's refusal of that one write as text. An ending write also frees the
        job's ``dedup_key``; a ``revive`` makes an ended job ``queued`` again. Raises
        ``StatusStoreUnavailable`` when the store cannot be reached (nothing known written)."""

    async def apply(self, event: JobEvent) -> bool:
        """Apply one event under the ordering rule; ``True`` if the status changed."""
        return await self._one(write_from_event(event))

    async def set_queued(
        self, job_id: str, job: str, queue: str | None, at: datetime | None = None
    ) -> bool:
        """Record ``queued`` unless the job already has a status; ``True`` if written."""
        return await self._one(status_write(QUEUED, job_id, job, queue, 0, at=at))

    async def revive(
        self, job_id: str, job: str, queue: str | None, dedup_key: str | None = None
    ) -> bool:
        """A job replayed from the DLQ is live again: ``queued``, attempts reset, whatever it
        read before; its ``dedup_key`` is held for it again if free, its cancel mark cleared."""
        return await self._one(status_write(REVIVE, job_id, job, queue, 0, dedup_key=dedup_key))

    async def _one(self, write: StatusWrite) -> bool:
        (outcome,) = await self.write_many([write])
        if isinstance(outcome, str):
            raise StatusStoreError(f"status of {write.job_id}: {outcome}")
        return outcome

    @abstractmethod
    async def ttl_remaining(self, job_id: str) -> float | None:
        """Seconds until the status expires; ``None`` for an unknown id."""

    @abstractmethod
    async def ping(self) -> None:
        """Return when the store answers; raise ``StatusStoreUnavailable`` when it does not."""

    async def close(self) -> None:  # noqa: B027 - optional for stores holding nothing
        """Release connections."""


class MemoryStatusStore(StatusStore):
    """A process-local store with the same semantics, for tests and the test kit.

    ``available`` can be set to ``False`` to act out an outage: every call then raises
    ``StatusStoreUnavailable`` like an unreachable Redis would. It keeps no dedup claims or
    cancel marks (those live beside it, in ``MemoryCancelMarks`` and the test kit).
    """

    def __init__(self, ttl: int = DEFAULT_STATUS_TTL) -> None:
        self.ttl = ttl
        self.available = True
        self._items: dict[str, tuple[JobStatus, float]] = {}

    def _check(self) -> None:
        if not self.available:
            raise StatusStoreUnavailable("the in-memory status store is marked unavailable")

    def _current(self, job_id: str) -> JobStatus | None:
        item = self._items.get(job_id)
        if item is None:
            return None
        if item[1] <= time.monotonic():
            del self._items[job_id]
            return None
        return item[0]

    async def get(self, job_id: str) -> JobStatus | None:
        self._check()
        return self._current(job_id)

    async def write_many(self, writes: Sequence[StatusWrite]) -> list[bool | str]:
        self._check()
        out: list[bool | str] = []
        for write in writes:  # no await in between: atomic for this process
            new = next_status(self._current(write.job_id), write)
            if new is not None:
                self._items[new.id] = (new, time.monotonic() + self.ttl)
            out.append(new is not None)
        return out

    async def ttl_remaining(self, job_id: str) -> float | None:
        self._check()
        if self._current(job_id) is None:
            return None
        return self._items[job_id][1] - time.monotonic()

    async def ping(self) -> None:
        self._check()


# --- Redis ------------------------------------------------------------------------------------

# Every write of a batch in one atomic script, each under the rule of ``next_status``, each in
# its own ``pcall`` so that one refused key (WRONGTYPE) fails only its own write.
# KEYS: the status hashes, one per write. ARGV: ttl, dedup prefix, cancel prefix, then a JSON
# array of writes ``[job_id, kind, attempt, at, inherit (0/1), dedup_key or '', f1, v1, ...]``.
_WRITE_LUA = """
local ttl = tonumber(ARGV[1])
local dedup, cancel = ARGV[2], ARGV[3]
local items = cjson.decode(ARGV[4])
local RANK = {queued = 0, started = 1, retrying = 2}
local TERMINAL = {succeeded = true, dead = true, cancelled = true}

-- Free the job's dedup claim: the key the write names (the job's header), else the one its
-- reverse entry names.
local function release(job_id, key)
  if key == '' then
    key = redis.call('GET', dedup .. 'dedup-job:' .. job_id)
    if not key then return end
  end
  local claim = dedup .. 'dedup:' .. key
  if redis.call('GET', claim) == job_id then
    redis.call('DEL', claim)
  end
  redis.call('DEL', dedup .. 'dedup-job:' .. job_id)
end

-- DEL, then one HSET of the new fields plus what the new status keeps of the current one.
local function put(key, w, cur, keep_started, kept)
  local fields, has = {}, {}
  for i = 7, #w, 2 do
    fields[#fields + 1] = w[i]
    fields[#fields + 1] = w[i + 1]
    has[w[i]] = true
  end
  local function keep(field, value)
    if value and not has[field] then
      fields[#fields + 1] = field
      fields[#fields + 1] = value
    end
  end
  keep('created_at', cur[4] or w[4])
  keep('queue', cur[6])
  if keep_started then keep('started_at', cur[5]) end
  if kept then
    keep('progress', kept[1])
    keep('message', kept[2])
  end
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(fields))
  redis.call('EXPIRE', key, ttl)
end

local function write(key, w)
  local job_id, kind, attempt, at, inherit = w[1], w[2], tonumber(w[3]), w[4], w[5] == 1
  local cur = redis.call('HMGET', key, 'state', 'attempt', 'updated_at', 'created_at',
    'started_at', 'queue')
  local cur_state, kept = cur[1], nil
  if kind == 'revive' then
    put(key, w, cur, false, nil)
    if w[6] ~= '' then
      if redis.call('SET', dedup .. 'dedup:' .. w[6], job_id, 'NX', 'EX', ttl) then
        redis.call('SET', dedup .. 'dedup-job:' .. job_id, w[6], 'EX', ttl)
      end
    end
    redis.call('DEL', cancel .. job_id)
    return 1
  end
  if kind == 'queued' and w[6] ~= '' then
    local claim = dedup .. 'dedup:' .. w[6]
    if redis.call('GET', claim) == job_id then
      redis.call('EXPIRE', claim, ttl)
      redis.call('EXPIRE', dedup .. 'dedup-job:' .. job_id, ttl)
    end
  end
  if cur_state then
    local cur_attempt = tonumber(cur[2])
    if TERMINAL[cur_state] or kind == 'queued' then
      if TERMINAL[kind] then release(job_id, w[6]) end
      return 0
    end
    if kind == 'progress' and cur_state == 'started' and cur_attempt == attempt then
      if cur[3] and at < cur[3] then return 0 end
      local update = {'updated_at', at}
      for i = 7, #w, 2 do
        if w[i] == 'progress' or w[i] == 'message' then
          update[#update + 1] = w[i]
          update[#update + 1] = w[i + 1]
        end
      end
      redis.call('HDEL', key, 'progress', 'message')
      redis.call('HSET', key, unpack(update))
      redis.call('EXPIRE', key, ttl)
      return 1
    end
    if not TERMINAL[kind] then
      local state = kind
      if kind == 'progress' then state = 'started' end
      local rank, cur_rank = RANK[state], RANK[cur_state]
      if attempt < cur_attempt or (attempt == cur_attempt and rank <= cur_rank) then return 0 end
    end
    if inherit and cur_attempt == attempt then
      kept = redis.call('HMGET', key, 'progress', 'message')
    end
  end
  put(key, w, cur, cur_state ~= nil, kept)
  if TERMINAL[kind] then release(job_id, w[6]) end
  return 1
end

local out = {}
for i, w in ipairs(items) do
  local ok, res = pcall(write, KEYS[i], w)
  if not ok then
    if type(res) == 'table' then res = res.err end
    res = tostring(res)
  end
  out[i] = res
end
return out
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _from_hash(raw: dict[Any, Any]) -> JobStatus | None:
    if not raw:
        return None
    data = {_text(k): _text(v) for k, v in raw.items()}
    return JobStatus(
        id=data["id"],
        job=data["job"],
        queue=data.get("queue") or None,  # v2 stored "" for "not known yet"
        state=data["state"],  # validated by pydantic
        attempt=int(data["attempt"]),
        result=json.loads(data["result"]) if "result" in data else None,
        error=data.get("error"),
        progress=float(data["progress"]) if "progress" in data else None,
        message=data.get("message"),
        updated_at=datetime.fromisoformat(data["updated_at"]),
        created_at=_time(data.get("created_at")),
        started_at=_time(data.get("started_at")),
        ended_at=_time(data.get("ended_at")),
    )


class RedisStatusStore(StatusStore):
    """Statuses as Redis hashes under ``<prefix><job id>``, each expiring ``ttl`` s after its last
    change. Built on ``redis.asyncio``; imported lazily so that publishers that never ask for a
    status do not need the ``redis`` package. An ending write frees the job's dedup claim
    (``<dedup_prefix>dedup:<key>``, see ``producers.dedup``) in the same script; a revive clears
    its cancel mark (``<cancel_prefix><id>``, see ``producers.cancel``).
    """

    def __init__(
        self,
        # A redis.asyncio.Redis: Any because redis-py types its commands for both its sync and
        # async clients (``Awaitable[T] | T``), and redis is an optional, lazily imported extra.
        client: Any,
        *,
        ttl: int = DEFAULT_STATUS_TTL,
        prefix: str = DEFAULT_PREFIX,
        url: str = "redis",
        dedup_prefix: str = DEFAULT_DEDUP_PREFIX,
        cancel_prefix: str = DEFAULT_CANCEL_PREFIX,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.prefix = prefix
        self.dedup_prefix = dedup_prefix
        self.cancel_prefix = cancel_prefix
        self.url = mask_url(url)  # masked: safe to log, and what its neighbours name
        self._where = f"status store at {self.url} (prefix {prefix!r})"
        self._script = client.register_script(_WRITE_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl: int = DEFAULT_STATUS_TTL,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> RedisStatusStore:
        """A store on its own client (``redis_client``: bounded timeouts, one quick retry)."""
        return cls(redis_client(url, timeout=timeout), ttl=ttl, prefix=prefix, url=url)

    def key(self, job_id: str) -> str:
        return self.prefix + job_id

    async def _call(self, what: str, coro: Any) -> Any:
        """Run one Redis call, its errors translated (``redis_errors``)."""
        return await redis_call(self._where, what, coro)

    async def get(self, job_id: str) -> JobStatus | None:
        raw = await self._call("get", self.client.hgetall(self.key(job_id)))
        return _from_hash(raw)

    async def write_many(self, writes: Sequence[StatusWrite]) -> list[bool | str]:
        if not writes:
            return []
        items = [
            [w.job_id, w.kind, w.attempt, w.at, 1 if w.inherit else 0, w.dedup_key or "", *w.fields]
            for w in writes
        ]
        args = [self.ttl, self.dedup_prefix, self.cancel_prefix, _ENCODE(items)]
        keys = [self.prefix + w.job_id for w in writes]
        raw = await self._call("write", self._script(keys=keys, args=args))
        return [r if isinstance(r, str) else bool(r) for r in raw]

    async def ttl_remaining(self, job_id: str) -> float | None:
        ms = await self._call("ttl", self.client.pttl(self.key(job_id)))
        return None if ms is None or ms < 0 else ms / 1000

    async def ping(self) -> None:
        await self._call("ping", self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


_ENCODE: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


# --- waiting for a result ---------------------------------------------------------------------


async def wait_result(
    store: StatusStore, job_id: str, timeout: float | None, *, interval: float = 0.1
) -> JsonValue:
    """Wait until the job ends: its result on ``succeeded``, ``JobFailed`` on ``dead``,
    ``JobCancelled`` on ``cancelled``, ``TimeoutError`` when ``timeout`` s pass first.

    An unknown id is waited for too (its first status may not be written yet). Store outages
    propagate as ``StatusStoreUnavailable``: the caller should know its wait cannot end.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = await store.get(job_id)
        if status is not None:
            if status.state == SUCCEEDED:
                return status.result
            if status.state == DEAD:
                raise JobFailed(job_id, status.error, status)
            if status.state == CANCELLED:
                raise JobCancelled(job_id, status.error, status)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                state = status.state if status else "unknown"
                raise TimeoutError(
                    f"job {job_id} did not end within {timeout:g} s (its status is {state})"
                )
            await asyncio.sleep(min(interval, left))
        else:
            await asyncio.sleep(interval)
