"""`leveret publish --dedup-key` and `leveret cancel ID`, the real console script against the
real broker and Redis (database 13, keys deleted afterwards)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support import Broker, leveret_cli, unique

STATUS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def made() -> Iterator[list[str]]:
    ids: list[str] = []
    yield ids
    client = redis.Redis.from_url(STATUS_URL)
    keys = [k for i in ids for k in (f"leveret:{i}", f"leveret:cancel:{i}", f"leveret:dedup:{i}",
                                     f"leveret:dedup-job:{i}")]  # fmt: skip
    if keys:
        client.delete(*keys)
    client.close()


def _declare_queue(broker: Broker, exchange: str, queue: str, job: str) -> None:
    """A queue bound for ``job`` on ``exchange``, as a worker would declare it."""
    broker.api("PUT", f"/exchanges/{broker.qvhost}/{exchange}", json={"type": "direct",
               "durable": True})  # fmt: skip
    broker.api("PUT", f"/queues/{broker.qvhost}/{queue}", json={"durable": True})
    broker.api("POST", f"/bindings/{broker.qvhost}/e/{exchange}/q/{queue}",
               json={"routing_key": job})  # fmt: skip


def test_publish_with_a_dedup_key_prints_the_holders_id_and_cancel_prints_the_state(
    broker: Broker, made: list[str]
) -> None:
    exchange, queue, key = unique("ex"), unique("q"), unique("key")
    _declare_queue(broker, exchange, queue, "charge")
    env = {"LEVERET_AMQP_URL": broker.url, "LEVERET_EXCHANGE": exchange,
           "LEVERET_STATUS_URL": STATUS_URL}  # fmt: skip
    made.append(key)
    first = leveret_cli("publish", "charge", '{"n": 1}', "--dedup-key", key, env=env)
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip()
    made.append(job_id)
    again = leveret_cli("publish", "charge", '{"n": 2}', "--dedup-key", key, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == job_id  # held: the first id, nothing enqueued
    depth = broker.api("GET", f"/queues/{broker.qvhost}/{queue}").json().get("messages", 0)
    assert depth in (0, 1)  # the management API's count lags; never 2

    cancelled = leveret_cli("cancel", job_id, env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"{job_id}: cancel requested (state: queued)"

    unknown = leveret_cli("cancel", "no-such-job-" + unique(), env=env)
    assert unknown.returncode != 0
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert "unknown" in unknown.stderr

    no_store = leveret_cli("cancel", job_id, env={**env, "LEVERET_STATUS_URL": ""})
    assert no_store.returncode != 0
    assert "LEVERET_STATUS_URL" in no_store.stderr
