"""De-duplication: at most one live job per ``dedup_key``, atomic in Redis.

A publish with ``dedup_key=K`` first *claims* ``K`` for a fresh job id (``SET <prefix>dedup:K
<id> NX``). Exactly one claimant wins however many processes race (Redis runs commands one at a
time); every other one reads the winner's id and returns it without publishing anything. The
winner publishes (confirms + ``mandatory``). A publish the broker refused (nacked, unroutable)
or that never left this process releases the claim at once; one whose outcome is unknown (no
confirm in time, the connection lost after sending) keeps it until its pending TTL
(``PENDING_TTL``, 60 s) frees it, so a retry cannot enqueue a second job that the first may
be. A confirmed publish extends the claim to ``LEVERET_STATUS_TTL``. When the job ends
(``succeeded``, ``dead``, ``cancelled``) the worker's status write frees the key in the same
script that records the ending (``producers.stores.status``), before the job's ack. Every release
is compare-and-delete: a release never frees a key that a newer job holds.

The key is findable from the job in two ways: the job carries it in its ``x-dedup-key`` header
(``HEADER_DEDUP_KEY``, kept through retries and DLQ replays like every user header), and Redis
keeps a reverse entry ``<prefix>dedup-job:<id>`` → ``K`` with the same lifetime as the claim, so a
writer that knows only the job id (``release_job``, a status written without the header) can
free it.

**The guarantee.** While a job published with key ``K`` is queued, delayed, waiting for a retry or
running, and for at most ``LEVERET_STATUS_TTL`` after its publish, publishing ``K`` again returns
its id and enqueues nothing, from any number of processes.

**Its windows**, all bounded and stated in the docs:

* a publisher that dies *between claim and publish* leaves the key held by an id that never
  reaches the broker; the claim's pending TTL (``PENDING_TTL``, 60 s, longer than the default
  30 s publish timeout) frees it. Until then a publish of ``K`` returns that id, whose status is
  unknown (404);
* a publisher that dies *between the broker's confirm and the extension* (microseconds), or
  whose extension write fails (Redis lost just then: the publish still returns the id and logs
  a warning), leaves a live job whose claim expires after ``PENDING_TTL``: a publish of ``K``
  after that can enqueue a second job;
* a publish whose outcome is unknown (``PublishTimeout``, ``ConnectionLost``) keeps ``K``
  held by its id for at most ``PENDING_TTL``: a retry within it returns that id, whose job may
  not exist (its status unknown, 404); one after it enqueues a new job, which may be a second
  if the first was queued after all;
* a job that lives longer than ``LEVERET_STATUS_TTL`` (a delay or retry chain longer than the
  retention) outlives its claim;
* the key is freed with the job's ending status, after its outcome's copies are confirmed and
  before its ack, not at the instant the handler returns;
* Redis with asynchronous replication can lose a claim in a failover, like any Redis lock.

Redis being unreachable is ``StatusStoreUnavailable``: the publish is not attempted (a
de-duplicated publish without the store would not be de-duplicated).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog

from leveret.producers.broker.connection import mask_url
from leveret.producers.errors import PublishError
from leveret.producers.stores.redis import (
    DEFAULT_DEDUP_PREFIX,
    DEFAULT_TIMEOUT_S,
    StatusStoreError,
    redis_call,
    redis_client,
)
from leveret.producers.stores.settings import DEFAULT_STATUS_TTL
from leveret.topology.errors import InvalidValueError

log = structlog.get_logger("leveret.dedup")

HEADER_DEDUP_KEY: Final = "x-dedup-key"
# The status store's script frees claims under this prefix: one constant for both.
DEFAULT_PREFIX: Final = DEFAULT_DEDUP_PREFIX
# Covers a publish (default timeout 30 s) with room to spare; see the module docstring.
PENDING_TTL: Final = 60
MAX_KEY_LENGTH: Final = 512

# KEYS[1] the claim, KEYS[2] the reverse entry; ARGV: job id, pending TTL (s), the key.
# Returns the holder's id, or '' when this call won the claim.
_CLAIM_LUA = """
local ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2]))
if ok then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[2]))
  return ''
end
return redis.call('GET', KEYS[1])
"""
# KEYS[1] the claim, KEYS[2] the reverse entry; ARGV: job id, ttl. 1 if still ours and extended.
_EXTEND_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
  return 1
end
return 0
"""
# KEYS[1] the claim, KEYS[2] the reverse entry; ARGV: job id. 1 if the claim was ours and freed.
_RELEASE_LUA = """
redis.call('DEL', KEYS[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
# KEYS[1] the reverse entry; ARGV: claim prefix, job id. The claim's name is read from the
# reverse entry, so this script names a key it was not passed: fine on one Redis (and on a
# primary/replica pair), not on Redis Cluster, which Leveret does not support for this.
_RELEASE_JOB_LUA = """
local key = redis.call('GET', KEYS[1])
if not key then return 0 end
redis.call('DEL', KEYS[1])
local claim = ARGV[1] .. key
if redis.call('GET', claim) == ARGV[2] then
  redis.call('DEL', claim)
  return 1
end
return 0
"""


class InvalidDedupKeyError(InvalidValueError):
    """A ``dedup_key`` that is empty, too long, or not text."""

    def __init__(self, key: object) -> None:
        self.key = key
        super().__init__(
            f"dedup_key must be a non-empty string of at most {MAX_KEY_LENGTH} characters, "
            f"got {key!r}"[:300]
        )


class DedupUnavailableError(StatusStoreError):
    """``dedup_key`` was given but no status store is configured (``LEVERET_STATUS_URL``)."""

    def __init__(self) -> None:
        super().__init__(
            "dedup_key needs the status store: set LEVERET_STATUS_URL (redis://...) "
            "or pass status_url="
        )


def check_dedup_key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidDedupKeyError(key)
    return key


class DedupStore:
    """Claims in Redis (``redis.asyncio``, ``decode_responses=True``) under ``prefix``."""

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis; Any for the reason RedisStatusStore gives
        *,
        ttl: int = DEFAULT_STATUS_TTL,
        prefix: str = DEFAULT_PREFIX,
        pending_ttl: int = PENDING_TTL,
        url: str = "redis",
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.prefix = prefix
        self.pending_ttl = pending_ttl
        self._where = f"de-duplication store at {mask_url(url)}"
        self._claim = client.register_script(_CLAIM_LUA)
        self._extend = client.register_script(_EXTEND_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._release_job = client.register_script(_RELEASE_JOB_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl: int = DEFAULT_STATUS_TTL,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> DedupStore:
        """Claims on their own client (``redis_client``: bounded timeouts, one quick retry)."""
        return cls(redis_client(url, timeout=timeout), ttl=ttl, prefix=prefix, url=url)

    def claim_key(self, key: str) -> str:
        return f"{self.prefix}dedup:{key}"

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}dedup-job:{job_id}"

    async def _call(self, what: str, coro: Awaitable[Any]) -> Any:
        return await redis_call(self._where, what, coro)

    async def claim(self, key: str, job_id: str) -> str | None:
        """Claim ``key`` for ``job_id``: ``None`` if won, else the id of the job holding it."""
        key = check_dedup_key(key)
        holder = await self._call(
            "claim",
            self._claim(
                keys=[self.claim_key(key), self.job_key(job_id)],
                args=[job_id, self.pending_ttl, key],
            ),
        )
        return holder or None

    async def confirm(self, key: str, job_id: str) -> bool:
        """The publish was confirmed: keep the claim for ``ttl``. ``False`` if it was lost."""
        return bool(
            await self._call(
                "extend",
                self._extend(
                    keys=[self.claim_key(key), self.job_key(job_id)], args=[job_id, self.ttl]
                ),
            )
        )

    async def release(self, key: str, job_id: str) -> bool:
        """Free ``key`` if ``job_id`` still holds it (a failed publish, or the worker knowing
        the key from the ``x-dedup-key`` header); ``True`` if it did."""
        return bool(
            await self._call(
                "release",
                self._release(keys=[self.claim_key(key), self.job_key(job_id)], args=[job_id]),
            )
        )

    async def release_job(self, job_id: str) -> bool:
        """Free whatever key ``job_id`` holds (the status script does the same as a job ends).
        ``True`` if a key was freed; ``False`` for a job published without one (one GET)."""
        return bool(
            await self._call(
                "release_job",
                self._release_job(
                    keys=[self.job_key(job_id)], args=[self.prefix + "dedup:", job_id]
                ),
            )
        )

    async def holder(self, key: str) -> str | None:
        """The id holding ``key`` now, or ``None``."""
        value = await self._call("get", self.client.get(self.claim_key(check_dedup_key(key))))
        return str(value) if value else None

    async def close(self) -> None:
        await self.client.aclose()


def _certainly_not_queued(exc: BaseException) -> bool:
    """The publish failed in a way that says the job is not queued: the broker refused it
    (nacked, returned as unroutable, no such exchange) or it never left this process (refused
    as invalid before sending, no channel before the timeout). Anything else (no confirm in
    time, the connection lost after sending, a cancelled caller, an unexpected error) leaves
    the outcome unknown: the job may be queued."""
    if isinstance(exc, PublishError):
        return not exc.maybe_queued
    return isinstance(exc, InvalidValueError | TypeError)  # validation: nothing was sent


async def publish_once(
    store: DedupStore,
    key: str,
    job_id: str,
    publish: Callable[[str, dict[str, str]], Awaitable[object]],
) -> tuple[str, bool]:
    """Publish under ``key`` unless it is held; returns ``(id, published)``.

    ``publish(job_id, headers)`` must publish the job with that id and those extra headers and
    return only once the broker confirmed it. A holder's id comes back with ``published=False``.

    What ``publish`` raises propagates. The claim is released at once only when the job is
    certainly not queued (a refusal the broker stated: ``RefusedError``, ``UnroutableError``;
    or nothing was sent); on an unknown outcome (``PublishTimeout``, ``ConnectionLost``, a
    cancelled or timed-out caller) it is kept and expires after the pending TTL (at most
    ``PENDING_TTL``, 60 s), so a retry in the meantime gets this id instead of enqueuing a
    second job that the first may be. A confirmed publish whose claim extension then fails
    still returns its id (the job is queued): a warning is logged, and the pending claim holds
    the key until it expires.
    """
    holder = await store.claim(key, job_id)
    if holder is not None:
        return holder, False
    try:
        await publish(job_id, {HEADER_DEDUP_KEY: key})
    except BaseException as exc:
        if _certainly_not_queued(exc):
            try:
                await store.release(key, job_id)
            except StatusStoreError as lost:  # the pending TTL frees it; the caller hears why
                log.warning(
                    "dedup_release_failed",
                    key=key,
                    job_id=job_id,
                    error=str(lost),
                    action=f"the key stays held for at most {store.pending_ttl} s",
                )
        raise
    try:
        extended = await store.confirm(key, job_id)
    except StatusStoreError as exc:
        log.warning(
            "dedup_extend_failed",
            key=key,
            job_id=job_id,
            error=str(exc),
            action=f"the job is queued; its key is held for at most {store.pending_ttl} s, "
            f"not until it ends",
        )
    else:
        if not extended:
            log.warning(
                "dedup_claim_lost",
                key=key,
                job_id=job_id,
                action="the job is queued, but its claim expired before the confirm: "
                "the key is not held for it",
            )
    return job_id, True
