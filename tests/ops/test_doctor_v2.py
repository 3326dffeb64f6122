"""`leveret doctor` on a vhost upgraded from the v2 per-queue delay chains."""

from __future__ import annotations

import json
from urllib.parse import quote

import aio_pika

from leveret.topology import DELAY_BITS, Topology, WorkQueue, declare, retry_queue_name
from leveret.topology.delay import BIT_SET, _level_pattern, v2_exchange_name
from tests.ops.helpers import app_module
from tests.support import leveret_cli, unique, wait_for
from tests.topology.v2 import declare_v2

APP = """
    from pydantic import BaseModel
    from leveret.consumer import Worker

    worker = Worker()

    class P(BaseModel):
        n: int

    @worker.job("{job}", queue="{queue}", timeout=60)
    async def work(p: P) -> None:
        pass
"""


def _doctor(broker, tmp_path, app_source: str, ex: str) -> list[dict]:
    with app_module(tmp_path, app_source, unique("v2app").replace("-", "_")) as app:
        env = {"LEVERET_AMQP_URL": broker.url, "LEVERET_EXCHANGE": ex}
        result = leveret_cli("doctor", app, "--json", cwd=tmp_path, env=env)
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_doctor_lists_v2_leftovers_and_which_can_be_deleted(broker, tmp_path):
    ex, queue = unique("dv2"), unique("dv2q")
    job = f"{queue}-job"
    topo = Topology(exchange=ex, queues=(WorkQueue(name=queue, jobs=(job,)),))
    waiting = retry_queue_name(queue, 18)  # 65536 s: still there when doctor looks
    connection = await aio_pika.connect(broker.url)
    try:
        await declare_v2(connection, topo)
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=waiting)
        await declare(connection, topo)
        stats = f"/queues/{broker.qvhost}/{quote(waiting, safe='')}"
        await wait_for(lambda: broker.api("GET", stats).json().get("messages") == 1, 30, "stats")
        source = APP.format(job=job, queue=queue)

        seen = _doctor(broker, tmp_path, source, ex)
        assert not [f for f in seen if f["severity"] == "error"], seen
        leftovers = [f for f in seen if f["check"] == "v2_leftovers"]
        holding = next(f for f in leftovers if f["severity"] == "info")
        assert "1 v2 retry queue(s)" in holding["message"] and waiting in holding["message"]
        deletable = next(f for f in leftovers if f["severity"] == "warning")
        assert f"{DELAY_BITS - 1} empty v2 retry queue(s)" in deletable["message"]
        assert "--if-empty" in deletable["message"]
        chain = next(f for f in seen if f["check"] == "delay_chain")
        assert f"{ex}.delay.250ms" in chain["message"]

        # A v2 worker redeclares its layout: a second chain, copying jobs, is an error.
        v2_exchange = await channel.get_exchange(v2_exchange_name(ex, 3))
        rebound = await channel.get_queue(retry_queue_name(queue, 3))
        await rebound.bind(v2_exchange, _level_pattern(3, BIT_SET, f"q.{queue}"))
        seen = _doctor(broker, tmp_path, source, ex)
        error = next(f for f in seen if f["severity"] == "error")
        assert error["check"] == "v2_leftovers" and "copied into both" in error["message"]
    finally:
        await connection.close()
        for n in range(DELAY_BITS):
            name = quote(retry_queue_name(queue, n), safe="")
            broker.api("DELETE", f"/queues/{broker.qvhost}/{name}")


async def test_doctor_lists_the_v2_status_keepers_queue_as_a_leftover(broker, tmp_path):
    """The worker writes statuses itself (v3): ``<exchange>.events.status``, the keeper's
    queue, is no longer declared, and doctor says an upgraded vhost's copy can go."""
    ex, queue = unique("dks"), unique("dksq")
    topo = Topology(exchange=ex, queues=(WorkQueue(name=queue, jobs=(f"{queue}-job",)),))
    leftover = f"{ex}.events.status"
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, topo)
        assert not broker.queue_exists(leftover)  # no longer declared
        channel = await connection.channel()
        await channel.declare_queue(leftover, durable=True)
        seen = _doctor(broker, tmp_path, APP.format(job=f"{queue}-job", queue=queue), ex)
        found = [f for f in seen if f["check"] == "v2_leftovers" and leftover in f["message"]]
        assert found and found[0]["severity"] == "warning", seen
        assert "delete it" in found[0]["message"]
    finally:
        await connection.close()
        broker.api("DELETE", f"/queues/{broker.qvhost}/{quote(leftover, safe='')}")
