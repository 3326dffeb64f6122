"""``Stores``: the status store, de-duplication claims and cancel marks on one Redis client.

The three always go together: the status store's script frees a job's dedup claim when it ends
and clears its cancel mark when it is revived, so the claims and marks must live on the same
Redis under the prefixes that script was given. Building them here, from the status store,
makes that hold by construction. The worker (``consumer.startup``), the HTTP API
(``consumer.api.app``) and the publisher each take their bundle from here, one client per
process, closed once.
"""

from __future__ import annotations

from dataclasses import dataclass

from leveret.producers.stores.cancel import RedisCancelMarks
from leveret.producers.stores.dedup import DedupStore
from leveret.producers.stores.redis import DEFAULT_TIMEOUT_S
from leveret.producers.stores.settings import DEFAULT_STATUS_TTL
from leveret.producers.stores.status import RedisStatusStore, StatusStore


@dataclass(frozen=True, slots=True)
class Stores:
    """The status store and, on its client, the dedup claims and cancel marks it frees."""

    status: RedisStatusStore
    dedup: DedupStore
    marks: RedisCancelMarks

    @classmethod
    def open(
        cls, url: str, *, ttl: int = DEFAULT_STATUS_TTL, timeout: float = DEFAULT_TIMEOUT_S
    ) -> Stores:
        """All three on one new client for ``url`` (``redis_client``'s bounded timeouts)."""
        return cls.sharing(RedisStatusStore.from_url(url, ttl=ttl, timeout=timeout))

    @classmethod
    def sharing(cls, status: RedisStatusStore) -> Stores:
        """Claims and marks on ``status``'s client, with its TTL and the prefixes its script
        frees them under."""
        return cls(
            status,
            DedupStore(status.client, ttl=status.ttl, prefix=status.dedup_prefix, url=status.url),
            RedisCancelMarks(
                status.client, ttl=status.ttl, prefix=status.cancel_prefix, url=status.url
            ),
        )

    @classmethod
    def of(cls, status: StatusStore | None) -> Stores | None:
        """``sharing(status)`` for a Redis status store; ``None`` for any other (or none):
        de-duplication and cancellation need Redis."""
        return cls.sharing(status) if isinstance(status, RedisStatusStore) else None

    async def close(self) -> None:
        """Close the one client the three share."""
        await self.status.close()
