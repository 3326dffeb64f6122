"""`leveret status` against a real broker: the management API's numbers, or passive declares."""

from __future__ import annotations

import json
from urllib.parse import quote

import aio_pika

from tests.ops.helpers import app_module, declare_queue, fill_dlq
from tests.support import leveret_cli, unique, wait_for


async def _publish(channel: aio_pika.abc.AbstractChannel, queue: str, count: int) -> None:
    for i in range(count):
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id=f"m{i}", type="job_a"), routing_key=queue
        )


async def _loaded_queue(broker, queue: str) -> aio_pika.abc.AbstractConnection:
    """Q with 5 ready and 3 unacked (held by a consumer), 4 retrying, 6 dead."""
    await declare_queue(broker.url, queue)
    await fill_dlq(broker.url, queue, 6)
    connection = await aio_pika.connect(broker.url)
    channel = await connection.channel()
    await _publish(channel, queue, 8)
    await _publish(channel, f"{queue}.retry.65536s", 4)
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
            and _api_queue(broker, f"{queue}.retry.65536s").get("messages") == 4,
            30, "the management statistics to catch up",
        )  # fmt: skip
        result = leveret_cli("status", "--json", env={"LEVERET_AMQP_URL": broker.url})
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
        assert row["retrying"] == retry_total == 4
        assert row["dead"] == _api_queue(broker, f"{queue}.dlq")["messages"] == 6
        # Neither a retry queue nor a DLQ is mistaken for a work queue.
        assert not any(".retry." in name or name.endswith(".dlq") for name in rows)

        table = leveret_cli("status", env={"LEVERET_AMQP_URL": broker.url})
        line = next(x for x in table.stdout.splitlines() if x.startswith(queue + " "))
        assert line.split()[1:6] == ["5", "3", "1", "4", "6"]
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
                     "LEVERET_MANAGEMENT_URL": "http://127.0.0.1:1"},
            )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "source: passive declares" in result.stderr
        (row,) = map(json.loads, result.stdout.splitlines())
        assert row == {
            "queue": queue, "ready": 5, "unacked": None, "consumers": 1, "retrying": 4,
            "dead": 6, "publish_rate": None, "deliver_rate": None,
        }  # fmt: skip
        no_api = {"LEVERET_AMQP_URL": broker.url, "LEVERET_MANAGEMENT_URL": "http://127.0.0.1:1"}
        no_app = leveret_cli("status", env=no_api)
        assert no_app.returncode != 0 and "name the APP" in no_app.stderr
        assert "Traceback" not in no_app.stderr
    finally:
        await connection.close()
