"""The redelivery guard: a job that keeps killing workers ends in the DLQ, not in a loop.

The broker's redelivered flag is a boolean and classic queues keep no count, so the count is
persisted by republishing the job with ``x-redeliveries`` + 1 (confirmed) and acking the
original. Quorum queues count for us (``x-delivery-count``). Past
``LEVERET_MAX_REDELIVERIES`` the job is dead-lettered as ``exhausted`` without running.

The counted copy can arrive before the original's ack has gone out; run then, a crash would
requeue both and the count would never add up. So a delivery of a job whose count is being
persisted waits for that to finish (``wait_if_counting``).
"""

from __future__ import annotations

import asyncio

from leveret.producers.message import HEADER_DELIVERY_COUNT, HEADER_REDELIVERIES, header_count

from .delivery import Delivery
from .settle import Settler


class RedeliveryGuard:
    def __init__(self, max_redeliveries: int) -> None:
        self.limit = max_redeliveries
        # job id -> set once its counted copy is confirmed and the original acked.
        self._counting: dict[str, asyncio.Event] = {}

    async def wait_if_counting(self, job_id: str) -> None:
        if self._counting and job_id in self._counting:
            await self._counting[job_id].wait()

    async def handled(self, d: Delivery, settler: Settler, label: str) -> bool:
        """Count a redelivery; True when the delivery was settled here (requeued or dead)."""
        headers = d.properties.headers
        count = header_count(headers, HEADER_DELIVERY_COUNT)
        if count is None:
            count = (header_count(headers, HEADER_REDELIVERIES) or 0) + 1
            if count <= self.limit:
                counted = self._counting[d.job_id] = asyncio.Event()
                try:
                    await settler.requeue_counted(d, count, self.limit)
                finally:
                    self._counting.pop(d.job_id, None)
                    counted.set()
                return True
        if count > self.limit:
            error = (
                f"delivered {count} times without a handler run finishing (the worker "
                f"crashed, was killed or lost its connection each time)"
            )
            await settler.dead_without_run(d, label, "exhausted", error, d.attempts)
            return True
        return False
