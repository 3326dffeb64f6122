"""`leveret doctor` on a quorum topology: priorities and delivery limits as this broker has them.

Each test declares the app with ``LEVERET_QUEUE_TYPE=quorum`` in a vhost of its own, runs the
real `leveret doctor`, and checks what it says against what the broker does: the priority
finding against the order a quorum queue really hands out prioritised jobs, the delivery-limit
findings against the queues' arguments and a policy set on the broker.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.ops.helpers import app_module
from tests.ops.test_export import fresh_vhost, url_for
from tests.support import Broker, leveret_cli, unique

APP = """
    from pydantic import BaseModel
    from leveret.consumer import Worker

    worker = Worker()

    class P(BaseModel):
        n: int

    @worker.job("work", queue="{queue}", timeout=60)
    async def work(p: P) -> None:
        pass
"""


def broker_version(broker: Broker) -> tuple[int, ...]:
    text = broker.api("GET", "/overview").json()["rabbitmq_version"]
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@pytest.fixture
def quorum_app(broker: Broker, tmp_path: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(vhost, queue, env) for the app declared on quorum queues in a fresh vhost."""
    queue = unique("qdoc")
    with fresh_vhost(broker) as vhost, app_module(
        tmp_path, APP.format(queue=queue), "quorumdoctorapp"
    ) as app:  # fmt: skip
        env = {
            "LEVERET_AMQP_URL": url_for(broker, vhost),
            # Named, so the checks read the broker under test on whatever port it serves.
            "LEVERET_MANAGEMENT_URL": f"http://{broker.host}:{broker.mgmt_port}",
            "LEVERET_QUEUE_TYPE": "quorum",
        }
        declared = leveret_cli("topology", "declare", app, cwd=tmp_path, env=env)
        assert declared.returncode == 0, declared.stderr
        assert broker.api("GET", f"/queues/{vhost}/{queue}").json()["type"] == "quorum"
        yield vhost, queue, {**env, "APP": app}


def doctor(tmp_path: Path, env: dict[str, str]) -> tuple[int, list[dict[str, Any]]]:
    result = leveret_cli("doctor", env["APP"], "--json", cwd=tmp_path, env=env)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def by_check(findings: list[dict[str, Any]], check: str) -> list[dict[str, Any]]:
    return [f for f in findings if f["check"] == check]


async def test_doctor_says_what_priorities_do_and_the_broker_does_it(
    broker: Broker, tmp_path: Path, quorum_app: tuple[str, str, dict[str, str]]
) -> None:
    """The priority finding names this version and its behaviour; the queue behaves so."""
    vhost, queue, env = quorum_app
    code, findings = doctor(tmp_path, env)
    assert code == 0, findings
    [finding] = by_check(findings, "priorities")
    version = broker_version(broker)
    assert finding["severity"] == "info"
    assert re.search(rf"RabbitMQ {'.'.join(map(str, version))}\b", finding["message"])

    # What the broker really does with priorities on this quorum queue: publish while nobody
    # consumes, then read them back in delivery order.
    sent = [1, 5, 0, 9, 3]
    connection = await aio_pika.connect(url_for(broker, vhost))
    async with connection:
        channel = await connection.channel()
        for n in sent:
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps({"n": n}).encode(), priority=n), routing_key=queue
            )
        work = await channel.get_queue(queue)
        order = []
        for _ in sent:
            message = await work.get(timeout=5)
            order.append(json.loads(message.body)["n"])
            await message.ack()
    if version < (4, 0):
        assert "no priorities" in finding["message"]
        assert "arrival order (FIFO)" in finding["message"]
        assert order == sent  # priorities ignored: FIFO, as doctor said
    else:  # pragma: no cover - this machine runs 3.10; kept for a 4.x CI broker
        assert "two priorities" in finding["message"]
        assert order[0] in (5, 9)  # a high job first


def test_doctor_reports_the_delivery_limits_of_work_queue_and_dlq(
    broker: Broker, tmp_path: Path, quorum_app: tuple[str, str, dict[str, str]]
) -> None:
    """Q has the x-delivery-limit Leveret sets; Q.dlq has none, which doctor calls safe on 3.x
    (no default limit there) and an error on 4.0+ (default 20: listing would drop dead jobs)."""
    vhost, queue, env = quorum_app
    declared = broker.api("GET", f"/queues/{vhost}/{queue}").json()["arguments"]
    code, findings = doctor(tmp_path, env)
    limits = {
        re.search(r"'([^']+)'", f["message"])[1]: f for f in by_check(findings, "delivery_limit")
    }  # type: ignore[index]
    assert set(limits) == {queue, f"{queue}.dlq"}
    assert limits[queue]["severity"] == "ok"
    assert f"x-delivery-limit {declared['x-delivery-limit']}" in limits[queue]["message"]
    if broker_version(broker) < (4, 0):
        assert code == 0, findings
        assert limits[f"{queue}.dlq"]["severity"] == "ok"
        assert "no delivery limit" in limits[f"{queue}.dlq"]["message"]
    else:  # pragma: no cover - 4.0's default of 20 applies to a DLQ without its own limit
        assert limits[f"{queue}.dlq"]["severity"] == "error"


def test_doctor_flags_a_policy_that_limits_deliveries_of_the_dlq(
    broker: Broker, tmp_path: Path, quorum_app: tuple[str, str, dict[str, str]]
) -> None:
    """A policy giving Q.dlq a delivery limit (as 4.0's default would) is an error naming it."""
    vhost, queue, env = quorum_app
    policy = {"pattern": r"\.dlq$", "definition": {"delivery-limit": 3},
              "apply-to": "queues", "priority": 1}  # fmt: skip
    broker.api("PUT", f"/policies/{vhost}/dlq-limit", json=policy).raise_for_status()
    # The broker applies a policy to existing queues asynchronously; doctor reads it from there.
    deadline = time.monotonic() + 15
    while broker.api("GET", f"/queues/{vhost}/{queue}.dlq").json().get("policy") != "dlq-limit":
        assert time.monotonic() < deadline, "the policy never reached the DLQ"
        time.sleep(0.2)
    code, findings = doctor(tmp_path, env)
    assert code == 1, findings
    [error] = [f for f in by_check(findings, "delivery_limit") if f["severity"] == "error"]
    assert f"'{queue}.dlq'" in error["message"]
    assert "delivery limit of 3 (policy 'dlq-limit')" in error["message"]
    assert "x-delivery-limit -1" in error["message"]
