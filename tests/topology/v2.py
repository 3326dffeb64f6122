"""The v2 delay layout (per-queue ``Q.retry.<ttl>`` chains), rebuilt for upgrade tests.

Reconstructed from the v2 code (``git show 9311e50:topology/model.py``): the chain exchanges
``<exchange>.delay.<ttl>`` (one per bit, topic) ending at ``<exchange>.delay.done``; for each
work queue ``Q``, 27 queues ``Q.retry.<ttl>`` with a queue-level TTL dead-lettering (keeping the
routing key) to the v2 exchange one bit down, quorum ones with at-least-once dead-lettering and
``reject-publish``; bindings: each v2 exchange skips a clear bit to the next one down
(``<bit n is =>.#``), sends a set bit into ``Q.retry.<ttl>`` per address (``<bit n is +>.q.Q``,
``….j.<job>``), and ``….delay.done`` routes ``<27 words>.<address>`` to ``Q``. The keys are the
same as v3's (``+``/``=`` words, 27 bits).
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractConnection, ExchangeType

from leveret.topology import DELAY_BITS, Topology, WorkQueue, retry_queue_name, retry_ttl_ms
from leveret.topology.delay import BIT_CLEAR, BIT_SET, _level_pattern, v2_exchange_name


def v2_retry_arguments(queue: WorkQueue, exchange: str, level: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-message-ttl": retry_ttl_ms(level),
        "x-dead-letter-exchange": v2_exchange_name(exchange, level - 1),
    }
    if queue.queue_type == "quorum":
        args = {"x-queue-type": "quorum", **args}
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


async def declare_v2(connection: AbstractConnection, topology: Topology) -> None:
    """Declare ``topology`` as the v2 code did."""
    ex = topology.exchange
    ch = await connection.channel(publisher_confirms=False)
    try:
        jobs = await ch.declare_exchange(ex, ExchangeType.DIRECT, durable=True)
        chain = {
            n: await ch.declare_exchange(v2_exchange_name(ex, n), ExchangeType.TOPIC, durable=True)
            for n in range(DELAY_BITS - 1, -2, -1)
        }
        for n in range(DELAY_BITS - 1, -1, -1):
            await chain[n - 1].bind(chain[n], _level_pattern(n, BIT_CLEAR, "#"))
        arrived = ".".join(["*"] * DELAY_BITS)
        for q in topology.queues:
            work = await ch.declare_queue(q.name, durable=True, arguments=q.work_arguments())
            await ch.declare_queue(q.dlq, durable=True, arguments=q.dlq_arguments())
            addresses = [f"q.{q.name}", *(f"j.{job}" for job in q.jobs)]
            for job in q.jobs:
                await work.bind(jobs, job)
            for n in range(DELAY_BITS):
                retry = await ch.declare_queue(
                    retry_queue_name(q.name, n),
                    durable=True,
                    arguments=v2_retry_arguments(q, ex, n),
                )
                for addr in addresses:
                    await retry.bind(chain[n], _level_pattern(n, BIT_SET, addr))
            for addr in addresses:
                await work.bind(chain[-1], f"{arrived}.{addr}")
    finally:
        await ch.close()
