"""Job locks: ``@worker.job(..., lock="{customer_id}")``.

Runs of jobs whose lock key (the format string over the payload's fields) renders equal never
overlap, across every worker process: a run holds the key in Redis (``LEVERET_STATUS_URL``), or
on the broker where none is set (``broker_locks``), taken just before its handler starts and
held until it ends. The key space is shared by every
job: two jobs with ``lock="customer:{customer_id}"`` exclude each other for the same customer;
put the job's name in the template to lock per job.

* Held: the run waits briefly holding its delivery (at most ``MAX_HOLD_S``, and only half the
  prefetch share may wait at once), then is given back through the delay chain
  (``Postponed``): no attempt burns, no prefetch slot is held while the key stays taken.
* A holder that dies (SIGKILL, host lost) stops renewing: its key expires within
  ``LEVERET_LOCK_TTL`` seconds (default 60) and the next run takes it.
* A holder that runs longer renews its key every third of the TTL. Each acquisition gets a
  *fencing token* (``ctx.lock_token``), a number that only grows across all keys: a resource
  that remembers the highest token it saw can refuse a write from an older holder.
* A renewal that finds the key gone or taken by another holder, or that cannot reach Redis
  until the TTL has passed since the last good renewal, means the lock is lost:
  ``ctx.lock_lost`` becomes true, ``job_lock_lost`` is logged, and an ``async`` handler is
  cancelled at once (its run raises ``LockLost``, a ``Retry``: the job is retried under its
  attempts and backoff). A plain ``def`` handler cannot be stopped: it is only told
  (``ctx.lock_lost``) and may overlap the next holder until it returns.

Redis being down when a run wants its lock postpones the run (nothing ran, nothing burnt), as
the global rate limiter does. Without ``LEVERET_STATUS_URL`` the locks are exclusive queues on
the broker (``broker_locks``: a holder's keys go with its connection, no TTL to renew, and the
fencing token only grows within a process); ``idempotency_key=`` still needs Redis, and a
worker with such a job and no ``LEVERET_STATUS_URL`` refuses to start (``ConfigError``).
"""

from __future__ import annotations

import asyncio
import random
import string
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from leveret.consumer.delivery.outcomes import Postponed
from leveret.consumer.errors import ConfigError, Reject, Retry
from leveret.producers.stores import StatusStoreError, StatusStoreUnavailable, redis_call

if TYPE_CHECKING:
    from leveret.consumer.context import JobContext
    from leveret.consumer.delivery.middleware import CallNext

log = structlog.get_logger("leveret.worker")

DEFAULT_LOCK_PREFIX: Final = "leveret:lock:"
DEFAULT_LOCK_TTL_S: Final = 60.0
# A held key is waited for holding the delivery at most this long, polled this often.
MAX_HOLD_S: Final = 0.5
POLL_S: Final = 0.05
# Given back for a random time in this range (the delay chain rounds up to 250 ms).
POSTPONE_S: Final = (0.25, 1.0)
# Redis unreachable: the run comes back after this long.
UNAVAILABLE_RETRY_S: Final = 2.0


class CoordinationSettings(BaseSettings):
    """``LEVERET_LOCK_TTL`` and ``LEVERET_IDEMPOTENCY_TTL``, read from the environment."""

    model_config = SettingsConfigDict(env_prefix="LEVERET_", frozen=True, extra="ignore")

    lock_ttl: float = Field(default=DEFAULT_LOCK_TTL_S, gt=0)
    idempotency_ttl: int = Field(default=7 * 86400, gt=0)


def settings_of(worker_settings: object) -> CoordinationSettings:
    """The coordination settings: the worker's own fields where it has them, else the env."""
    env = CoordinationSettings()
    return CoordinationSettings(
        lock_ttl=getattr(worker_settings, "lock_ttl", env.lock_ttl),
        idempotency_ttl=getattr(worker_settings, "idempotency_ttl", env.idempotency_ttl),
    )


# -- key templates -------------------------------------------------------------------------------


class _Fields(Mapping[str, Any]):
    """A payload (pydantic model or dict) as the mapping ``str.format_map`` reads."""

    __slots__ = ("_payload",)

    def __init__(self, payload: Any) -> None:
        self._payload = payload

    def __getitem__(self, name: str) -> Any:
        payload = self._payload
        if isinstance(payload, BaseModel):
            try:
                return getattr(payload, name)
            except AttributeError:
                raise KeyError(name) from None
        return payload[name]

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


def key_template(
    template: object, option: str, job: str, model: Any = None
) -> Callable[[Any], str]:
    """``template`` checked once (at registration) and returned as ``payload -> key``.

    A payload without a field the template names cannot be run under its key: the run is
    rejected (``Reject``, dead-lettered ``rejected``), since no retry would give it the field.
    """
    if not isinstance(template, str) or not template:
        raise ConfigError(f"{option} of job {job!r} must be a non-empty format string")
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"{option} of job {job!r} is not a format string: {exc}") from None
    roots = {n.split(".")[0].split("[")[0] for n in names}
    if "" in roots:
        raise ConfigError(f"{option} of job {job!r} must name payload fields, like '{{order_id}}'")
    fields = getattr(model, "model_fields", None)
    if isinstance(fields, dict):
        missing = sorted(r for r in roots if r not in fields)
        if missing:
            raise ConfigError(
                f"{option} of job {job!r} names {', '.join(missing)}, not a field of "
                f"{model.__name__}"
            )

    def render(payload: Any) -> str:
        try:
            return template.format_map(_Fields(payload))
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise Reject(
                f"{option} {template!r} cannot be rendered from the payload: {exc!r}"
            ) from None

    return render


# -- stores --------------------------------------------------------------------------------------


class LockStore(Protocol):
    async def acquire(self, key: str, owner: str, ttl_s: float) -> int | None:
        """The fencing token of a new hold, or ``None`` while another holds ``key``."""

    async def renew(self, key: str, owner: str, token: int, ttl_s: float) -> bool:
        """Extend a hold; false if it is no longer ours (expired, or taken since)."""

    async def release(self, key: str, owner: str, token: int) -> None: ...


# Optional, besides: ``release_soon(key, owner, token) -> Future`` (release without a task of its
# own) and ``watch(key, owner, token, on_lost)`` (a store that learns of a loss by itself, the
# broker's when its connection closes, calls ``on_lost(why)`` at once).


# Many holds in one call: KEYS are the lock keys then the fence counter; ARGV are (owner, ttl ms)
# pairs. Each reply is the new token, or 0 where the key is held (by an earlier one too).
_ACQUIRE_MANY = """
local fence = KEYS[#KEYS]
local out = {}
for i = 1, #KEYS - 1 do
  if redis.call('exists', KEYS[i]) == 1 then
    out[i] = 0
  else
    local token = redis.call('incr', fence)
    redis.call('set', KEYS[i], ARGV[2 * i - 1] .. '|' .. token, 'PX', ARGV[2 * i])
    out[i] = token
  end
end
return out
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
# Many releases: KEYS the lock keys, ARGV the values each must still hold.
_RELEASE_MANY = """
local out = {}
for i = 1, #KEYS do
  out[i] = 0
  if redis.call('get', KEYS[i]) == ARGV[i] then out[i] = redis.call('del', KEYS[i]) end
end
return out
"""


class RedisBatch:
    """Redis commands issued in one loop turn go out as one pipeline (no transaction): a
    worker running hundreds of locked jobs at once makes one round trip per turn, not one per
    job, and never needs more than a few connections of the status store's client (its pool is
    bounded; the status writes share it). Each caller gets its own reply or error.

    The acquisitions of one batch are one script call (``_ACQUIRE_MANY``), and so are its
    releases: a batch costs a couple of commands whatever its size. Lua scripts go by
    ``EVALSHA``; a ``NOSCRIPT`` reply (Redis restarted, scripts flushed) loads them again and
    retries the batch once.
    """

    def __init__(self, client: Any, where: str, fence: str = DEFAULT_LOCK_PREFIX + "fence") -> None:
        self.client = client
        self._where = where
        self.fence = fence
        self._pending: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._shas: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, command: str, *args: Any) -> asyncio.Future[Any]:
        """``command`` in the next batch: a redis-py command name, or ``acquire`` (key, owner,
        ttl ms), ``renew`` (key, value, ttl ms), ``release`` (key, value)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((command, args, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        from redis.exceptions import NoScriptError

        try:
            replies = await redis_call(self._where, "coordinate", self._pipeline(batch))
            if any(isinstance(r, NoScriptError) for r in replies):
                self._shas.clear()
                replies = await redis_call(self._where, "coordinate", self._pipeline(batch))
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(
                    StatusStoreUnavailable(f"{self._where}: {type(reply).__name__}: {reply}")
                )
            else:
                future.set_result(reply)

    async def _pipeline(self, batch: list[tuple[str, tuple[Any, ...], Any]]) -> list[Any]:
        """One pipeline for ``batch``; the replies in its order (``acquire``/``release``
        entries are merged into one script call each, their replies split back)."""
        merged: dict[str, list[int]] = {"acquire": [], "release": []}
        for i, (command, _, _) in enumerate(batch):
            if command in merged:
                merged[command].append(i)
        for lua in (_ACQUIRE_MANY, _RELEASE_MANY, _RENEW):
            if lua not in self._shas:
                self._shas[lua] = await self.client.script_load(lua)
        pipe = self.client.pipeline(transaction=False)
        order: list[tuple[str, list[int]]] = []
        if acquires := merged["acquire"]:
            keys = [batch[i][1][0] for i in acquires]
            argv = [a for i in acquires for a in batch[i][1][1:]]
            pipe.evalsha(self._shas[_ACQUIRE_MANY], len(keys) + 1, *keys, self.fence, *argv)
            order.append(("many", acquires))
        if releases := merged["release"]:
            keys = [batch[i][1][0] for i in releases]
            argv = [batch[i][1][1] for i in releases]
            pipe.evalsha(self._shas[_RELEASE_MANY], len(keys), *keys, *argv)
            order.append(("many", releases))
        for i, (command, args, _) in enumerate(batch):
            if command == "renew":
                pipe.evalsha(self._shas[_RENEW], 1, *args)
                order.append(("one", [i]))
            elif command not in merged:
                getattr(pipe, command)(*args)
                order.append(("one", [i]))
        replies: list[Any] = [None] * len(batch)
        for (kind, where), reply in zip(
            order, await pipe.execute(raise_on_error=False), strict=True
        ):
            if kind == "one" or isinstance(reply, Exception):
                for i in where:
                    replies[i] = reply
            else:
                for i, each in zip(where, reply, strict=True):
                    replies[i] = each
        return replies


class RedisLocks:
    """Locks on the status store's Redis: ``<prefix>key:<key>`` holds ``<owner>|<token>`` with a
    TTL; ``<prefix>fence`` is the one counter every token is drawn from (never expires)."""

    def __init__(
        self, client: Any, *, prefix: str = DEFAULT_LOCK_PREFIX, where: str = "", batch: Any = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._fence = prefix + "fence"
        self._batch = (
            batch if batch is not None else RedisBatch(client, where or "lock store", self._fence)
        )

    async def acquire(self, key: str, owner: str, ttl_s: float) -> int | None:
        token = await self._batch.call(
            "acquire", self.prefix + "key:" + key, owner, int(ttl_s * 1000)
        )
        return int(token) or None

    async def renew(self, key: str, owner: str, token: int, ttl_s: float) -> bool:
        value, ms = f"{owner}|{token}", int(ttl_s * 1000)
        return bool(await self._batch.call("renew", self.prefix + "key:" + key, value, ms))

    async def release(self, key: str, owner: str, token: int) -> None:
        await self.release_soon(key, owner, token)

    def release_soon(self, key: str, owner: str, token: int) -> asyncio.Future[Any]:
        """``release`` in the next batch, without a task of its own."""
        return self._batch.call("release", self.prefix + "key:" + key, f"{owner}|{token}")


class MemoryLocks:
    """Locks in one process (``TestBroker``): the same semantics, a dict and a clock."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, int, float]] = {}  # key -> owner, token, expires at
        self._fence = 0

    async def acquire(self, key: str, owner: str, ttl_s: float) -> int | None:
        now = time.monotonic()
        current = self.held.get(key)
        if current is not None and current[2] > now:
            return None
        self._fence += 1
        self.held[key] = (owner, self._fence, now + ttl_s)
        return self._fence

    async def renew(self, key: str, owner: str, token: int, ttl_s: float) -> bool:
        current = self.held.get(key)
        if current is None or current[:2] != (owner, token) or current[2] <= time.monotonic():
            return False
        self.held[key] = (owner, token, time.monotonic() + ttl_s)
        return True

    async def release(self, key: str, owner: str, token: int) -> None:
        self.release_soon(key, owner, token)

    def release_soon(self, key: str, owner: str, token: int) -> asyncio.Future[Any]:
        """Released now (a ``TestBroker``'s next job finds the key free)."""
        current = self.held.get(key)
        if current is not None and current[:2] == (owner, token):
            del self.held[key]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


# -- the chain layer -----------------------------------------------------------------------------


class LockLost(Retry):
    """The run's lock was lost while it ran (see the module docstring): retried."""

    def __init__(self, key: str, why: str = "LEVERET_LOCK_TTL") -> None:
        super().__init__(f"lock {key!r} was lost while the job ran ({why})")


class Lease:
    """One held lock: renews itself every third of the TTL on a timer (a run shorter than
    that never starts a task), and tells the run when the lock is lost: ``ctx.lock_lost``, a
    log line (``lost_event``), and the task it was given cancelled (``cancelled_run``).
    ``Locked`` holds one for a run; a group's final job (``features.groups``) holds one for
    its whole delivery and gives it the task only while the handler runs (``watch_run``)."""

    __slots__ = (
        "_handle",
        "_interval",
        "_last_ok",
        "_live",
        "_loop",
        "_renewing",
        "_task",
        "cancelled_run",
        "ctx",
        "key",
        "lost_event",
        "owner",
        "store",
        "token",
        "ttl_s",
        "why",
    )

    def __init__(
        self,
        store: LockStore,
        key: str,
        owner: str,
        token: int,
        ttl_s: float,
        ctx: JobContext,
        task: asyncio.Task[Any] | None,
        *,
        lost_event: str = "job_lock_lost",
    ) -> None:
        self.store, self.key, self.owner, self.token, self.ttl_s = store, key, owner, token, ttl_s
        self.ctx = ctx
        self.lost_event = lost_event
        self._task = task  # cancelled when the lock is lost (async handlers only)
        self.cancelled_run = False
        self.why = "LEVERET_LOCK_TTL"
        self._live = True
        self._loop = asyncio.get_running_loop()
        self._interval = ttl_s / 3
        self._last_ok = self._loop.time()
        self._renewing: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._interval, self._due)

    def _due(self) -> None:
        self._handle = None
        self._renewing = self._loop.create_task(self._renew())

    async def _renew(self) -> None:
        sent = self._loop.time()
        try:
            ok: bool | None = await asyncio.wait_for(
                self.store.renew(self.key, self.owner, self.token, self.ttl_s),
                max(self.ttl_s - (sent - self._last_ok), 0.01),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: the hold may still stand until its TTL
            ok = None
            log.warning(
                "job_lock_renewal_failed", lock=self.key, error=f"{type(exc).__name__}: {exc}"
            )
        if self._renewing is None:  # stopped meanwhile
            return
        if ok:
            self._last_ok = sent
        elif ok is False or self._loop.time() - self._last_ok >= self.ttl_s:
            return self._lose("taken or expired" if ok is False else "lock store unreachable")
        delay = self._interval if ok else min(self._interval / 2, 1.0)
        self._handle = self._loop.call_later(delay, self._due)

    def watch_run(self, task: asyncio.Task[Any] | None) -> None:
        """The task a loss cancels from now on (``None``: none, e.g. once the run is over)."""
        self._task = task

    def lost(self, why: str) -> None:
        """The store says the hold is gone (``watch``): the run is told now."""
        if self._live:
            self.stop()
            self._lose(why)

    def _lose(self, why: str) -> None:
        self._live = False
        self.why = why
        self.ctx.lock_lost = True
        log.error(self.lost_event, lock=self.key, token=self.token, why=why)
        if self._task is not None and not self._task.done():
            self.cancelled_run = True
            self._task.cancel()

    def stop(self) -> None:
        self._live = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        renewing, self._renewing = self._renewing, None
        if renewing is not None and not renewing.done():
            renewing.cancel()


def release_soon(store: LockStore, key: str, owner: str, token: int) -> None:
    """Release without making the run wait for it (its outcome does not depend on it; a
    release that fails leaves the key to its TTL). Batched with the next Redis calls."""
    soon = getattr(store, "release_soon", None)
    try:
        future = (
            soon(key, owner, token)
            if soon
            else asyncio.ensure_future(store.release(key, owner, token))
        )
    except Exception:
        return  # not even sent: the key lapses after its TTL
    future.add_done_callback(_quiet)


def _quiet(future: asyncio.Future[Any]) -> None:
    """Retrieve a background call's error (logged at debug), so asyncio does not warn."""
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.debug("job_lock_release_failed", error=f"{type(exc).__name__}: {exc}")


class Locked:
    """The chain layer of a ``lock=`` job (order: after the rate limit, before the
    idempotency check; ``middleware``'s table)."""

    __slots__ = (
        "_key",
        "_max_waiting",
        "_store",
        "_ttl",
        "_waiting",
        "_watch",
        "cancels",
        "template",
    )

    def __init__(
        self,
        template: str,
        key: Callable[[Any], str],
        store: LockStore,
        ttl_s: float,
        *,
        max_waiting: int,
        cancels: bool,
    ) -> None:
        self.template = template
        self._key = key
        self._store = store
        self._ttl = ttl_s
        self._max_waiting = max(1, max_waiting)
        self._waiting = 0
        self._watch = getattr(store, "watch", None)
        self.cancels = cancels  # an async handler: cancelled when its lock is lost

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        key = self._key(ctx.payload)
        owner = f"{ctx.job_id}:{uuid.uuid4().hex[:8]}"
        token = await self._take(key, owner)
        task = asyncio.current_task() if self.cancels else None
        lease = Lease(self._store, key, owner, token, self._ttl, ctx, task)
        if self._watch is not None:
            self._watch(key, owner, token, lease.lost)
        ctx.lock_token = token
        try:
            result = await call_next(ctx)
        except asyncio.CancelledError:
            if lease.cancelled_run and task is not None and task.uncancel() == 0:
                raise LockLost(key, lease.why) from None
            raise
        finally:
            lease.stop()
            self._release(key, owner, token)
        if lease.cancelled_run and task is not None:  # the handler swallowed the cancellation
            task.uncancel()
        return result

    def _release(self, key: str, owner: str, token: int) -> None:
        release_soon(self._store, key, owner, token)

    async def _take(self, key: str, owner: str) -> int:
        try:
            token = await self._store.acquire(key, owner, self._ttl)
            if token is not None:
                return token
            if self._waiting < self._max_waiting:
                self._waiting += 1
                try:
                    deadline = time.monotonic() + MAX_HOLD_S
                    while time.monotonic() < deadline:
                        await asyncio.sleep(POLL_S)
                        token = await self._store.acquire(key, owner, self._ttl)
                        if token is not None:
                            return token
                finally:
                    self._waiting -= 1
        except StatusStoreError as exc:
            raise Postponed(UNAVAILABLE_RETRY_S, f"lock store unavailable ({exc})") from None
        raise Postponed(random.uniform(*POSTPONE_S), f"lock {key!r} held")


def require_redis(jobs: Mapping[str, Any], status_url: object) -> None:
    """``idempotency_key=`` needs Redis (its done marks live there): refuse to start without
    it. ``lock=`` does not: without Redis its locks are on the broker."""
    if status_url is not None:
        return
    needing = sorted(name for name, spec in jobs.items() if getattr(spec, "idempotency_key", None))
    if needing:
        raise ConfigError(
            f"job(s) {', '.join(needing)} use idempotency_key=, which needs Redis (the done "
            f"marks are kept there): set LEVERET_STATUS_URL (lock= alone works without it, on "
            f"the broker)"
        )


def has_locks(jobs: Mapping[str, Any]) -> bool:
    return any(getattr(spec, "lock", None) is not None for spec in jobs.values())


class Coordination:
    """One worker's lock store and done marks, on the status store's Redis client: the chain
    layers are built before that client exists (``startup.pipeline``), so they hold this, and
    ``attach`` plugs the client in when the worker opens its status store
    (``startup.session_plan``). The client is the status store's, closed with it.

    Without a status store, ``locks`` is the broker's lock store (``BrokerLocks``), closed by
    ``close``; there are no done marks then (``ctx.done_before`` says to set
    ``LEVERET_STATUS_URL``)."""

    def __init__(self, settings: CoordinationSettings, locks: Any = None) -> None:
        self.settings = settings
        self._locks: Any = locks
        self._marks: Any = None
        self._on_broker = locks is not None

    def attach(self, client: Any, where: str = "") -> None:
        from leveret.consumer.features.idempotency import RedisDoneMarks

        batch = RedisBatch(client, where or "coordination store (LEVERET_STATUS_URL)")
        self._locks = RedisLocks(client, batch=batch)
        self._marks = RedisDoneMarks(client, ttl_s=self.settings.idempotency_ttl, batch=batch)

    def _store(self) -> Any:
        if self._locks is None:
            raise StatusStoreUnavailable("the lock store is not open yet")
        return self._locks

    async def acquire(self, key: str, owner: str, ttl_s: float) -> int | None:
        return await self._store().acquire(key, owner, ttl_s)  # type: ignore[no-any-return]

    async def renew(self, key: str, owner: str, token: int, ttl_s: float) -> bool:
        return await self._store().renew(key, owner, token, ttl_s)  # type: ignore[no-any-return]

    async def release(self, key: str, owner: str, token: int) -> None:
        await self._store().release(key, owner, token)

    def release_soon(self, key: str, owner: str, token: int) -> asyncio.Future[Any]:
        return self._store().release_soon(key, owner, token)  # type: ignore[no-any-return]

    def watch(self, key: str, owner: str, token: int, on_lost: Callable[[str], None]) -> None:
        if self._on_broker:
            self._locks.watch(key, owner, token, on_lost)

    async def close(self) -> None:
        """The broker lock store's connection (Redis's client is the status store's)."""
        if self._on_broker:
            await self._locks.close()

    async def lookup(self, key: str) -> tuple[bool, Any]:
        self._marks_store()
        return await self._marks.lookup(key)  # type: ignore[no-any-return]

    async def mark(self, key: str, result: Any = None) -> None:
        self._marks_store()
        await self._marks.mark(key, result)

    def _marks_store(self) -> None:
        if self._on_broker:
            from leveret.consumer.features.idempotency import no_marks

            raise no_marks()
        self._store()

    def layers(self, spec: Any, max_waiting: int) -> list[Any]:
        """The lock and idempotency layers of ``spec``, outermost first (none if it has
        neither option)."""
        return coordination_layers(spec, self, self, self.settings.lock_ttl, max_waiting)


def coordination_layers(
    spec: Any, locks: LockStore, marks: Any, ttl_s: float, max_waiting: int
) -> list[Any]:
    """``[Locked?, Idempotent?]`` for one job: what ``execution.build_chain`` places after the
    rate limit (the worker on Redis, ``TestBroker`` in memory)."""
    from leveret.consumer.features.idempotency import Idempotent

    layers: list[Any] = []
    if spec.lock_key is not None:
        layers.append(
            Locked(
                spec.lock,
                spec.lock_key,
                locks,
                ttl_s,
                max_waiting=max_waiting,
                cancels=spec.is_async,
            )
        )
    if spec.idempotency_key_of is not None:
        layers.append(Idempotent(spec.name, spec.idempotency_key_of, marks))
    return layers
