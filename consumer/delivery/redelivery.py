"""The redelivery guard: a job that keeps killing workers ends in the DLQ, not in a loop.

The broker's redelivered flag is a boolean and classic queues keep no count, so the count is
persisted by republishing the job with ``x-redeliveries`` + 1 (confirmed) and acking the
original. Past ``LEVERET_MAX_REDELIVERIES`` the job is dead-lettered as ``exhausted`` without
running.

Quorum queues do keep a count (``x-delivery-count``) but it is not used: it counts every return,
so each crash counts against every job the worker had prefetched, and the job that crashed comes
back to the head of the queue and runs first again. In a crash loop the innocent jobs were
dead-lettered with the culprit (20 of 20 in the storm test). Republishing to the back, as on
classic queues, lets them run before the culprit's next turn, on both queue types alike.

The counted copy can arrive before the original's ack has gone out; run then, a crash would
requeue both and the count would never add up. So a delivery of a job whose count is being
persisted waits for that to finish (``wait_if_counting``).
"""

from __future__ import annotations

import asyncio

from leveret.consumer.delivery.envelope import Delivery
from leveret.consumer.delivery.settle import Settler
from leveret.producers.wire import HEADER_REDELIVERIES, header_count


class RedeliveryGuard:
    def __init__(self, max_redeliveries: int) -> None:
        self.limit = max_redeliveries
        # job id -> set once its counted copy is confirmed and the original acked.
        self._counting: dict[str, asyncio.Event] = {}

    async def wait_if_counting(self, job_id: str) -> None:
        if self._counting and job_id in self._counting:
            await self._counting[job_id].wait()

    async def settle(self, d: Delivery, settler: Settler, label: str) -> None:
        """Count a redelivery: put the job back with its count, or past the limit dead-letter
        it. A redelivered message never runs itself; its counted copy does."""
        count = (header_count(d.properties.headers, HEADER_REDELIVERIES) or 0) + 1
        if count <= self.limit:
            counted = self._counting[d.job_id] = asyncio.Event()
            try:
                await settler.requeue_counted(d, count, self.limit)
            finally:
                self._counting.pop(d.job_id, None)
                counted.set()
            return
        error = (
            f"delivered {count} times without a handler run finishing (the worker "
            f"crashed, was killed or lost its connection each time)"
        )
        # ``count`` deliveries of the job ended without their run finishing (the one this
        # redelivery returns and those counted before it): each was a run.
        await settler.dead_without_run(d, label, "exhausted", error, d.attempts + count)
