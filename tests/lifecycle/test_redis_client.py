"""One Redis client builder and one error wrapper (``producers.redis``) for every Redis user."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from leveret.consumer.features.ratelimit.limiters import GlobalLimiters
from leveret.producers.stores.bundle import Stores
from leveret.producers.stores.cancel import RedisCancelMarks
from leveret.producers.stores.dedup import DedupStore
from leveret.producers.stores.redis import redis_client
from leveret.producers.stores.status import (
    DEFAULT_CANCEL_PREFIX,
    DEFAULT_DEDUP_PREFIX,
    RedisStatusStore,
    StatusStoreError,
    StatusStoreUnavailable,
    status_write,
)

from .conftest import SHARED_REDIS, unique_prefix


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers (a hung Redis)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"


def _clients(url: str, timeout: float) -> dict[str, Any]:
    limiters = GlobalLimiters("jobs", url, lambda: None, timeout=timeout)
    return {
        "status": RedisStatusStore.from_url(url, timeout=timeout).client,
        "dedup": DedupStore.from_url(url, timeout=timeout).client,
        "cancel": RedisCancelMarks.from_url(url, timeout=timeout).client,
        "ratelimit": limiters._client(),
    }


def test_every_redis_user_gets_the_same_bounded_decoding_client() -> None:
    """Status, dedup, cancel marks and the global limiter all build ``redis_client``'s client."""
    expected = redis_client(SHARED_REDIS, timeout=0.7).connection_pool.connection_kwargs
    for name, client in _clients(SHARED_REDIS, 0.7).items():
        kwargs = client.connection_pool.connection_kwargs
        for key in ("socket_timeout", "socket_connect_timeout", "decode_responses"):
            assert kwargs[key] == expected[key], (name, key)
        assert client.get_retry().get_retries() == 1, name


async def test_a_hung_redis_is_unavailable_within_the_timeout_for_every_store(
    silent_server: str,
) -> None:
    """Each store's call fails as ``StatusStoreUnavailable`` after its timeout, not never."""
    stores = Stores.open(silent_server, timeout=0.3)
    calls = {
        "status": lambda: stores.status.get("j"),
        "dedup": lambda: stores.dedup.claim("k", "j"),
        "cancel": lambda: stores.marks.mark("j"),
    }
    try:
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(StatusStoreUnavailable, match="unreachable"):
                await call()
            assert time.monotonic() - started < 2.0, name
        with pytest.raises(StatusStoreUnavailable):
            [job_id async for job_id in stores.marks.pending()]
    finally:
        await stores.close()


async def test_a_foreign_value_under_our_key_is_a_refusal_for_good() -> None:
    """WRONGTYPE is ``StatusStoreError`` and not "unavailable" (retrying would not help)."""
    prefix = unique_prefix()
    status = RedisStatusStore.from_url(SHARED_REDIS, prefix=prefix + "status:")
    stores = Stores.sharing(status)
    dedup = DedupStore(status.client, prefix=prefix)
    try:
        await status.client.set(status.key("j"), "not a hash")
        await status.client.hset(dedup.claim_key("k"), "not", "a string")
        for call in (status.get("j"), dedup.holder("k")):
            with pytest.raises(StatusStoreError, match="another type") as refused:
                await call
            assert not isinstance(refused.value, StatusStoreUnavailable)
        assert stores.dedup.client is stores.marks.client is status.client
    finally:
        await status.client.delete(status.key("j"), dedup.claim_key("k"))
        await stores.close()


def test_dedup_and_cancel_default_to_the_prefixes_the_status_script_frees() -> None:
    """The three stores' default prefixes come from one place."""
    status = RedisStatusStore(redis_client(SHARED_REDIS))
    assert DedupStore(status.client).prefix == status.dedup_prefix == DEFAULT_DEDUP_PREFIX
    assert RedisCancelMarks(status.client).prefix == status.cancel_prefix == DEFAULT_CANCEL_PREFIX


async def test_stores_built_together_free_claims_and_marks_under_custom_prefixes() -> None:
    """``Stores.sharing`` puts claims and marks where the status store's script looks for them."""
    prefix = unique_prefix()
    status = RedisStatusStore(
        redis_client(SHARED_REDIS),
        prefix=prefix + "status:",
        dedup_prefix=prefix + "d:",
        cancel_prefix=prefix + "c:",
    )
    stores = Stores.sharing(status)
    try:
        assert await stores.dedup.claim("k", "j1") is None
        await status.set_queued("j1", "job", "q")
        await status.write_many([status_write("succeeded", "j1", "job", "q", 1)])
        assert await stores.dedup.holder("k") is None  # the ending write freed the claim
        await stores.marks.mark("j1")
        assert [j async for j in stores.marks.pending()] == ["j1"]
        await status.revive("j1", "job", "q")
        assert [j async for j in stores.marks.pending()] == []  # the revive cleared the mark
    finally:
        keys = [k async for k in status.client.scan_iter(match=prefix + "*")]
        if keys:
            await status.client.delete(*keys)
        await stores.close()
