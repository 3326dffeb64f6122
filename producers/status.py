"""Job status: the latest state of each job, kept from lifecycle events, readable by id.

Events can arrive late, twice, or out of order (several keepers consume one queue; a broker
redelivers after a lost ack; ``progress`` is not confirmed). The store therefore never applies an
event blindly. The rule, the same in every store:

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
keepers write at once and costs one round trip. The shared test suite runs both against the same
histories, in every order, so the two cannot drift apart unnoticed.

``wait_result`` polls (every 0.1 s by default) rather than subscribing to keyspace notifications:
those need ``notify-keyspace-events`` set on the server, which managed Redis often forbids, and a
poll of one key is cheap next to the 1 s the contract allows.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, JsonValue, field_serializer

from leveret.topology.errors import LeveretError

from .connection import mask_url
from .events import (
    CANCELLED,
    DEAD,
    PROGRESS,
    STARTED,
    SUCCEEDED,
    TERMINAL_STATES,
    JobEvent,
    now,
    rfc3339,
)
from .lifecycle_settings import DEFAULT_STATUS_TTL

StatusState = Literal["queued", "started", "retrying", "succeeded", "dead", "cancelled"]
QUEUED: Final = "queued"
DEFAULT_PREFIX: Final = "leveret:status:"
_RANK: Final[dict[str, int]] = {QUEUED: 0, STARTED: 1, "retrying": 2}


# --- errors -----------------------------------------------------------------------------------


class StatusStoreError(LeveretError):
    """The status store refused an operation for good (e.g. a foreign value under our key)."""


class StatusStoreUnavailable(StatusStoreError, ConnectionError):
    """The status store cannot be reached right now; the same call may succeed later."""


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
    queue: str
    state: StatusState
    attempt: int
    result: JsonValue = None
    error: str | None = None
    progress: float | None = None
    message: str | None = None
    updated_at: AwareDatetime

    @field_serializer("updated_at")
    def _serialize_updated_at(self, value: datetime) -> str:
        return rfc3339(value)

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES


def queued_status(job_id: str, job: str, queue: str, at: datetime | None = None) -> JobStatus:
    return JobStatus(
        id=job_id, job=job, queue=queue, state=QUEUED, attempt=0, updated_at=at or now()
    )


def _inherits_progress(event: JobEvent) -> bool:
    """An event that says nothing about progress keeps what its attempt reported last."""
    return event.state != PROGRESS and event.progress is None and event.message is None


def next_status(current: JobStatus | None, event: JobEvent) -> JobStatus | None:
    """The status after ``event``, or ``None`` when the event must not change it."""
    state: StatusState = STARTED if event.state == PROGRESS else event.state
    if current is not None:
        if current.ended:
            return None
        if (
            event.state == PROGRESS
            and current.state == STARTED
            and current.attempt == event.attempt
        ):
            if rfc3339(event.at) < rfc3339(current.updated_at):
                return None  # an older progress report overtaken by a newer one
            return current.model_copy(
                update={
                    "progress": event.progress,
                    "message": event.message,
                    "updated_at": event.at,
                }
            )
        if not event.terminal and (event.attempt, _RANK[state]) <= (
            current.attempt,
            _RANK[current.state],
        ):
            return None
    keep = current is not None and current.attempt == event.attempt and _inherits_progress(event)
    return JobStatus(
        id=event.job_id,
        job=event.job,
        queue=event.queue,
        state=state,
        attempt=event.attempt,
        result=event.result if event.state == SUCCEEDED else None,
        error=event.error,
        progress=current.progress if keep and current else event.progress,
        message=current.message if keep and current else event.message,
        updated_at=event.at,
    )


# --- the interface ----------------------------------------------------------------------------


class StatusStore(ABC):
    """Where statuses live. Every method is safe to call from many processes at once."""

    ttl: int

    @abstractmethod
    async def get(self, job_id: str) -> JobStatus | None:
        """The job's status, or ``None`` for an unknown (or expired) id."""

    @abstractmethod
    async def apply(self, event: JobEvent) -> bool:
        """Apply one event under the ordering rule; ``True`` if the status changed."""

    @abstractmethod
    async def set_queued(
        self, job_id: str, job: str, queue: str, at: datetime | None = None
    ) -> bool:
        """Record ``queued`` unless the job already has a status; ``True`` if written."""

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
    ``StatusStoreUnavailable`` like an unreachable Redis would.
    """

    def __init__(self, ttl: int = DEFAULT_STATUS_TTL) -> None:
        self.ttl = ttl
        self.available = True
        self._items: dict[str, tuple[JobStatus, float]] = {}
        self._lock = asyncio.Lock()

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

    def _put(self, status: JobStatus) -> None:
        self._items[status.id] = (status, time.monotonic() + self.ttl)

    async def get(self, job_id: str) -> JobStatus | None:
        self._check()
        return self._current(job_id)

    async def apply(self, event: JobEvent) -> bool:
        self._check()
        async with self._lock:
            new = next_status(self._current(event.job_id), event)
            if new is None:
                return False
            self._put(new)
            return True

    async def set_queued(
        self, job_id: str, job: str, queue: str, at: datetime | None = None
    ) -> bool:
        self._check()
        async with self._lock:
            if self._current(job_id) is not None:
                return False
            self._put(queued_status(job_id, job, queue, at))
            return True

    async def ttl_remaining(self, job_id: str) -> float | None:
        self._check()
        if self._current(job_id) is None:
            return None
        return self._items[job_id][1] - time.monotonic()

    async def ping(self) -> None:
        self._check()


# --- Redis ------------------------------------------------------------------------------------

# One atomic read-compare-write per event; the rule is the module docstring's (``next_status``).
# KEYS[1] the status hash. ARGV: ttl, kind (event state or 'queued'), attempt, at (RFC 3339,
# fixed width, so string order is time order), inherit ('1': keep this attempt's progress),
# then field/value pairs of the complete new status.
_APPLY_LUA = """
local key = KEYS[1]
local ttl = tonumber(ARGV[1])
local kind = ARGV[2]
local attempt = tonumber(ARGV[3])
local at = ARGV[4]
local inherit = ARGV[5] == '1'
local RANK = {queued = 0, started = 1, retrying = 2}
local TERMINAL = {succeeded = true, dead = true, cancelled = true}
local kept = nil
local cur = redis.call('HMGET', key, 'state', 'attempt', 'updated_at')
local cur_state = cur[1]
if cur_state then
  local cur_attempt = tonumber(cur[2])
  if TERMINAL[cur_state] or kind == 'queued' then return 0 end
  if kind == 'progress' and cur_state == 'started' and cur_attempt == attempt then
    if cur[3] and at < cur[3] then return 0 end
    local update = {'updated_at', at}
    for i = 6, #ARGV, 2 do
      if ARGV[i] == 'progress' or ARGV[i] == 'message' then
        update[#update + 1] = ARGV[i]
        update[#update + 1] = ARGV[i + 1]
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
redis.call('DEL', key)
redis.call('HSET', key, unpack(ARGV, 6))
if kept then
  if kept[1] then redis.call('HSET', key, 'progress', kept[1]) end
  if kept[2] then redis.call('HSET', key, 'message', kept[2]) end
end
redis.call('EXPIRE', key, ttl)
return 1
"""


def _fields(status: JobStatus) -> list[str]:
    """The hash fields of a status; absent (``None``) fields are not stored at all."""
    pairs: list[str] = [
        "id", status.id,
        "job", status.job,
        "queue", status.queue,
        "state", status.state,
        "attempt", str(status.attempt),
        "updated_at", rfc3339(status.updated_at),
    ]  # fmt: skip
    if status.result is not None:
        pairs += ["result", json.dumps(status.result, separators=(",", ":"), ensure_ascii=False)]
    if status.error is not None:
        pairs += ["error", status.error]
    if status.progress is not None:
        pairs += ["progress", repr(float(status.progress))]
    if status.message is not None:
        pairs += ["message", status.message]
    return pairs


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _from_hash(raw: dict[Any, Any]) -> JobStatus | None:
    if not raw:
        return None
    data = {_text(k): _text(v) for k, v in raw.items()}
    return JobStatus(
        id=data["id"],
        job=data["job"],
        queue=data["queue"],
        state=data["state"],  # validated by pydantic
        attempt=int(data["attempt"]),
        result=json.loads(data["result"]) if "result" in data else None,
        error=data.get("error"),
        progress=float(data["progress"]) if "progress" in data else None,
        message=data.get("message"),
        updated_at=datetime.fromisoformat(data["updated_at"]),
    )


class RedisStatusStore(StatusStore):
    """Statuses as Redis hashes under ``<prefix><job id>``, each expiring ``ttl`` s after its last
    change. Built on ``redis.asyncio``; imported lazily so that publishers that never ask for a
    status do not need the ``redis`` package.
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
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.prefix = prefix
        self._where = mask_url(url)
        self._script = client.register_script(_APPLY_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl: int = DEFAULT_STATUS_TTL,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 5.0,
    ) -> RedisStatusStore:
        """A store on its own client: bounded timeouts and one quick retry, so a call fails fast
        while Redis is down instead of hanging the caller (the keeper does its own backoff)."""
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise StatusStoreError(
                "the status store needs the redis package: pip install 'leveret[status]'"
            ) from exc
        client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        )
        return cls(client, ttl=ttl, prefix=prefix, url=url)

    def key(self, job_id: str) -> str:
        return self.prefix + job_id

    async def _call(self, what: str, coro: Any) -> Any:
        """Run one Redis call, translating its errors into the store's two kinds."""
        from redis.exceptions import RedisError, ResponseError

        try:
            return await coro
        except ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise StatusStoreError(
                    f"status store at {self._where}: {what}: a key under prefix "
                    f"{self.prefix!r} holds a value that is not a status ({exc})"
                ) from None
            # READONLY (failover in progress), OOM, LOADING ...: worth trying again later.
            raise StatusStoreUnavailable(
                f"status store at {self._where}: {what} failed: {exc}"
            ) from None
        except (RedisError, OSError) as exc:
            raise StatusStoreUnavailable(
                f"status store at {self._where} is unreachable ({what}): "
                f"{type(exc).__name__}: {exc}"
            ) from None

    async def get(self, job_id: str) -> JobStatus | None:
        raw = await self._call("get", self.client.hgetall(self.key(job_id)))
        return _from_hash(raw)

    async def _write(self, kind: str, attempt: int, new: JobStatus, inherit: bool) -> bool:
        args = [self.ttl, kind, attempt, rfc3339(new.updated_at), "1" if inherit else "0"]
        written = await self._call(
            "apply", self._script(keys=[self.key(new.id)], args=[*args, *_fields(new)])
        )
        return bool(written)

    async def apply(self, event: JobEvent) -> bool:
        # The status this event would write over an empty key; the script decides whether it
        # applies and, for an in-place progress update or an inherited progress, what to keep.
        candidate = next_status(None, event)
        assert candidate is not None  # an event always applies to an unknown job
        return await self._write(event.state, event.attempt, candidate, _inherits_progress(event))

    async def set_queued(
        self, job_id: str, job: str, queue: str, at: datetime | None = None
    ) -> bool:
        return await self._write(QUEUED, 0, queued_status(job_id, job, queue, at), False)

    async def ttl_remaining(self, job_id: str) -> float | None:
        ms = await self._call("ttl", self.client.pttl(self.key(job_id)))
        return None if ms is None or ms < 0 else ms / 1000

    async def ping(self) -> None:
        await self._call("ping", self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


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
