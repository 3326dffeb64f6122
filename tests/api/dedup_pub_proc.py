"""One publishing process of the Publisher-level de-duplication test (run under ``spawn``):
``Publisher.publish(..., dedup_key=)`` with the status store on Redis database 13."""

from __future__ import annotations

import asyncio
import time

from leveret.producers.publisher import Publisher

STATUS_URL = "redis://127.0.0.1:6379/13"


async def _publish(url: str, job: str, key: str, count: int, start_at: float) -> list[str]:
    async with Publisher(url, status_url=STATUS_URL) as pub:
        await pub.status("warm-up")  # connect to Redis before the start line
        await asyncio.sleep(max(0.0, start_at - time.time()))
        return list(
            await asyncio.gather(*(pub.publish(job, {"n": n}, dedup_key=key) for n in range(count)))
        )


def publish(url: str, job: str, key: str, count: int, start_at: float) -> list[str]:
    return asyncio.run(_publish(url, job, key, count, start_at))
