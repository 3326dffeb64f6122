"""`leveret dlq` against a quorum DLQ: no command may rely on channel-wide (global) QoS.

Quorum queues refuse a consumer on a channel with global QoS, and RabbitMQ 4.3 refuses global
QoS for every queue type, so these run every command against a quorum ``Q.dlq``.
"""

from __future__ import annotations

import json

import aio_pika

from leveret.topology import Topology, WorkQueue, declare
from tests.ops.helpers import days_ago, drain, fill_dlq
from tests.support import leveret_cli, unique


async def declare_quorum(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        topology = Topology(
            queues=(WorkQueue(name=queue, jobs=("job_a", "job_b"), queue_type="quorum"),)
        )
        await declare(connection, topology)
    finally:
        await connection.close()


def env(broker) -> dict[str, str]:
    return {"LEVERET_AMQP_URL": broker.url}


async def test_list_replay_purge_work_on_a_quorum_dlq(broker):
    """Paged listing (several pages), replay and purge all run on a quorum Q.dlq."""
    queue = unique("qdlq")
    await declare_quorum(broker.url, queue)
    assert broker.queue(f"{queue}.dlq")["type"] == "quorum"
    sent = await fill_dlq(
        broker.url, queue, 1200,
        job=lambda i: "job_b" if i % 5 == 0 else "job_a",
        died=lambda i: days_ago(10) if i % 2 else None,
    )  # fmt: skip

    listed = leveret_cli("dlq", "list", queue, "--json", env=env(broker))
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in sent]
    # Listing left the quorum DLQ as it was, in order.
    again = leveret_cli("dlq", "list", queue, "--json", env=env(broker))
    assert [json.loads(line)["id"] for line in again.stdout.splitlines()] == [s.id for s in sent]

    job_b = [s for s in sent if s.job == "job_b"]
    replayed = leveret_cli("dlq", "replay", queue, "--job", "job_b", env=env(broker))
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == f"{len(job_b)}\n"

    old = [s for i, s in enumerate(sent) if s.job != "job_b" and i % 2]
    purged = leveret_cli("dlq", "purge", queue, "--older-than", "7d", "--yes", env=env(broker))
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == f"{len(old)}\n"

    moved = await drain(broker.url, queue)
    assert sorted(m.id for m in moved) == sorted(s.id for s in job_b)
    left = await drain(broker.url, f"{queue}.dlq")
    assert sorted(m.id for m in left) == sorted(
        s.id for s in sent if s not in job_b and s not in old
    )
