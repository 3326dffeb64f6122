"""`leveret status` against a real broker: the management API's numbers, or passive declares."""

from __future__ import annotations

import json
from urllib.parse import quote

import aio_pika

from leveret.topology import Topology, WorkQueue, declare
from tests.ops.helpers import app_module, fill_dlq
from tests.support import leveret_cli, unique, wait_for
from tests.topology.v2 import declare_v2


async def _publish(channel: aio_pika.abc.AbstractChannel, queue: str, count: int) -> None:
    for i in range(count):
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id=f"m{i}", type="job_a"), routing_key=queue
        )


def _exchange(queue: str) -> str:
    """A delay chain of the test's own: the vhost's shared ``jobs`` one holds other tests'."""
    return f"{queue}-x"


async def _loaded_queue(broker, queue: str) -> aio_pika.abc.AbstractConnection:
    """Q with 5 ready and 3 unacked (held by a consumer), 6 dead; 4 waiting in the shared delay
    chain and 2 in a v2 queue ``Q.retry.65536s`` left from before the upgrade."""
    topo = Topology(exchange=_exchange(queue), queues=(WorkQueue(name=queue, jobs=("job_a",)),))
    connection = await aio_pika.connect(broker.url)
    await declare_v2(connection, topo)
    await declare(connection, topo)
    await fill_dlq(broker.url, queue, 6)
    channel = await connection.channel()
    await _publish(channel, queue, 8)
    await _publish(channel, f"{_exchange(queue)}.delay.65536s", 4)
    await _publish(channel, f"{queue}.retry.65536s", 2)
    holder = await connection.channel()
    await holder.set_qos(prefetch_count=3)
    held: list[aio_pika.abc.AbstractIncomingMessage] = []
    work = await holder.get_queue(queue)

    async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        held.append(message)

    await work.consume(hold)
    await wait_for(lambda: len(held) == 3, 10, "the consumer to hold 3 jobs")
    return connection


def _api_queue(broker, name: str) -> dict:
    return broker.api("GET", f"/queues/{broker.qvhost}/{quote(name, safe='')}").json()


async def test_status_numbers_equal_the_management_api(broker):
    """With the management API up, status reports exactly what the API says for Q."""
    queue = unique("st")
    connection = await _loaded_queue(broker, queue)
    try:
        await wait_for(
            lambda: _api_queue(broker, queue).get("messages_unacknowledged") == 3
            and _api_queue(broker, queue).get("consumers") == 1
            and _api_queue(broker, queue).get("messages_ready") == 5
            and _api_queue(broker, f"{queue}.dlq").get("messages") == 6
            and _api_queue(broker, f"{queue}.retry.65536s").get("messages") == 2
            and _api_queue(broker, f"{_exchange(queue)}.delay.65536s").get("messages") == 4,
            30, "the management statistics to catch up",
        )  # fmt: skip
        env = {"LEVERET_AMQP_URL": broker.url, "LEVERET_EXCHANGE": _exchange(queue)}
        result = leveret_cli("status", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert "source: management API" in result.stderr
        assert "guest:guest" not in result.stderr
        rows = {r["queue"]: r for r in map(json.loads, result.stdout.splitlines())}
        api = _api_queue(broker, queue)
        retry_total = sum(
            q["messages"]
            for q in broker.api("GET", f"/queues/{broker.qvhost}").json()
            if q["name"].startswith(f"{queue}.retry.")
        )
        row = rows[queue]
        assert row["ready"] == api["messages_ready"] == 5
        assert row["unacked"] == api["messages_unacknowledged"] == 3
        assert row["consumers"] == api["consumers"] == 1
        assert row["retrying"] == retry_total == 2  # its v2 leftovers
        assert row["dead"] == _api_queue(broker, f"{queue}.dlq")["messages"] == 6
        chain = rows[f"{_exchange(queue)}.delay.*"]
        assert chain["retrying"] == 4 and chain["ready"] is None
        # Neither a retry queue, a delay queue nor a DLQ is mistaken for a work queue.
        assert not any(".retry." in name or name.endswith(".dlq") for name in rows)
        assert not [n for n in rows if ".delay." in n and not n.endswith(".delay.*")]

        table = leveret_cli("status", env=env)
        line = next(x for x in table.stdout.splitlines() if x.startswith(queue + " "))
        assert line.split()[1:6] == ["5", "3", "1", "2", "6"]
        line = next(x for x in table.stdout.splitlines() if x.startswith(f"{_exchange(queue)}."))
        assert line.split()[1:] == ["-", "-", "-", "4", "-", "-", "-"]
    finally:
        await connection.close()


async def test_status_falls_back_to_passive_declares_and_says_so(broker, tmp_path):
    """Without the management API, status of an APP reads exact depths by passive declare."""
    queue = unique("sp")
    connection = await _loaded_queue(broker, queue)
    source = f"""
        from pydantic import BaseModel
        from leveret.consumer import Worker

        worker = Worker()

        class P(BaseModel):
            n: int = 0

        @worker.job("job_a", queue="{queue}")
        async def job_a(p: P) -> None:
            pass
    """
    try:
        with app_module(tmp_path, source, "statusapp") as app:
            result = leveret_cli(
                "status", app, "--json", cwd=tmp_path,
                env={"LEVERET_AMQP_URL": broker.url,
                     "LEVERET_MANAGEMENT_URL": "http://127.0.0.1:1",
                     "LEVERET_EXCHANGE": _exchange(queue)},
            )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "source: passive declares" in result.stderr
        row, chain = map(json.loads, result.stdout.splitlines())
        assert row == {
            "queue": queue, "ready": 5, "unacked": None, "consumers": 1, "retrying": 2,
            "dead": 6, "publish_rate": None, "deliver_rate": None,
        }  # fmt: skip
        assert chain == {
            "queue": f"{_exchange(queue)}.delay.*", "ready": None, "unacked": None,
            "consumers": None, "retrying": 4, "dead": None, "publish_rate": None,
            "deliver_rate": None,
        }  # fmt: skip
        no_api = {"LEVERET_AMQP_URL": broker.url, "LEVERET_MANAGEMENT_URL": "http://127.0.0.1:1"}
        no_app = leveret_cli("status", env=no_api)
        assert no_app.returncode != 0 and "name the APP" in no_app.stderr
        assert "Traceback" not in no_app.stderr
    finally:
        await connection.close()
