"""The one Redis client builder and the one error wrapper, for every Redis user of Leveret.

The status store, de-duplication claims, cancel marks and the global rate limiter all talk to
the Redis of ``LEVERET_STATUS_URL``. Each gets its client from ``redis_client`` (bounded socket
and connect timeouts, one quick retry: a call fails within about ``timeout`` s while Redis is
down instead of hanging its caller, whose own backoff decides what happens next), and each
turns redis-py's errors into Leveret's two kinds with ``redis_errors``/``redis_call``:

* ``StatusStoreUnavailable`` (also a ``ConnectionError``): unreachable, timed out, or a refusal
  that passes (``READONLY`` during a failover, ``LOADING``, ``OOM``): the same call may work later;
* ``StatusStoreError``: a refusal for good, ``WRONGTYPE`` (a key of ours holds a foreign value).

The key prefixes live here too: the status store's script frees a dedup claim and clears a
cancel mark by name, so ``producers.dedup`` and ``producers.cancel`` take their defaults from
the same constants and the three cannot drift apart.

``redis`` (the ``status`` extra) is imported only when a client is built or an error is
translated, so a publisher that never asks for a status does not need it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator
from typing import Any, Final, TypeVar

from leveret.topology.errors import LeveretError

T = TypeVar("T")

# Where each user keeps its keys by default (see the module docstring).
DEFAULT_STATUS_PREFIX: Final = "leveret:status:"
DEFAULT_DEDUP_PREFIX: Final = "leveret:"
DEFAULT_CANCEL_PREFIX: Final = "leveret:cancel:"
DEFAULT_RATELIMIT_PREFIX: Final = "leveret:ratelimit:"

# Long enough for a loaded Redis, short enough that a caller hears of an outage at once.
DEFAULT_TIMEOUT_S: Final = 5.0


class StatusStoreError(LeveretError):
    """The status store refused an operation for good (e.g. a foreign value under our key)."""


class StatusStoreUnavailable(StatusStoreError, ConnectionError):
    """The status store cannot be reached right now; the same call may succeed later."""


def redis_client(url: str, *, timeout: float = DEFAULT_TIMEOUT_S, decode: bool = True) -> Any:
    """A ``redis.asyncio.Redis`` on ``url`` whose calls give up after ``timeout`` s (socket and
    connect) with one quick retry (50 ms, capped at 200 ms) for a connection that just dropped.

    ``decode``: replies as ``str`` (what every Leveret store expects). The return type is
    ``Any`` because redis-py types its commands for its sync and async clients at once
    (``Awaitable[T] | T``), and redis is an optional, lazily imported extra.
    """
    try:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise StatusStoreError(
            "the status store needs the redis package: pip install 'leveret[status]'"
        ) from exc
    return aioredis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
    )


@contextlib.contextmanager
def redis_errors(where: str, what: str) -> Iterator[None]:
    """Translate the redis-py errors raised inside into ``StatusStoreError`` (for good) or
    ``StatusStoreUnavailable`` (try later); ``where`` names the store and its masked URL,
    ``what`` the operation. Works around an ``await`` and an ``async for`` alike."""
    from redis.exceptions import RedisError, ResponseError

    try:
        yield
    except StatusStoreError:
        raise  # already translated (a nested call), and a ConnectionError: not an OSError here
    except ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            raise StatusStoreError(
                f"{where}: {what}: a key of ours holds a value of another type ({exc}); "
                "is another application using the same prefix?"
            ) from None
        # READONLY (failover in progress), OOM, LOADING ...: worth trying again later.
        raise StatusStoreUnavailable(f"{where}: {what} failed: {exc}") from None
    except (RedisError, OSError) as exc:
        raise StatusStoreUnavailable(
            f"{where} is unreachable ({what}): {type(exc).__name__}: {exc}"
        ) from None


async def redis_call(where: str, what: str, call: Awaitable[T]) -> T:
    """``await call`` under ``redis_errors(where, what)``."""
    with redis_errors(where, what):
        return await call
