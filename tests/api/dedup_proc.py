"""One publishing process of the concurrent de-duplication test (run under ``spawn``)."""

from __future__ import annotations

import asyncio
import time

from leveret.producers.publisher import Publisher
from leveret.producers.stores.dedup import DedupStore, publish_once
from leveret.producers.wire.message import new_job_id

SHARED_REDIS = "redis://127.0.0.1:6379/0"


async def _publish(url: str, prefix: str, job: str, key: str, count: int,
                   start_at: float) -> list[tuple[str, bool]]:  # fmt: skip
    store = DedupStore.from_url(SHARED_REDIS, ttl=600, prefix=prefix)
    async with Publisher(url) as pub:

        async def send(job_id: str, headers: dict[str, str]) -> None:
            await pub.publish(job, {"n": 1}, job_id=job_id, headers=headers)

        await store.holder(key)  # connect before the start line
        await asyncio.sleep(max(0.0, start_at - time.time()))
        results = await asyncio.gather(
            *(publish_once(store, key, new_job_id(), send) for _ in range(count))
        )
    await store.close()
    return list(results)


def publish_many_once(url: str, prefix: str, job: str, key: str, count: int,
                      start_at: float) -> list[tuple[str, bool]]:  # fmt: skip
    return asyncio.run(_publish(url, prefix, job, key, count, start_at))
