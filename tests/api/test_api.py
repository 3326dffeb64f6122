"""The HTTP API served by uvicorn, driven by an HTTP client, against the real broker and Redis:
each status code of the contract's table, and the body limit enforced while reading."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from leveret.consumer import Worker
from leveret.consumer.api import ApiSettings, create_app
from leveret.consumer.errors import ConfigError
from leveret.producers.wire.events import JobEvent
from tests.support import Broker, running, wait_for

from .conftest import (
    TOKEN,
    RedisParts,
    build,
    free_port,
    make_worker,
    purge,
    serve,
    wait_connected,
)

EMAIL = {"to": "a@b.c", "subject": "hi"}


# --- auth -------------------------------------------------------------------------------------


def test_no_token_refuses_to_start_unless_insecure(broker: Broker) -> None:
    worker = make_worker(broker.settings())
    with pytest.raises(ConfigError, match="LEVERET_API_TOKEN"):
        create_app(worker, ApiSettings(api_token=None), metrics_port=0)
    create_app(worker, ApiSettings(api_token=None), insecure_no_auth=True, metrics_port=0)


def test_401_for_a_missing_or_wrong_token_says_nothing_more(broker: Broker) -> None:
    app = build(broker, None, CollectorRegistry())
    with serve(app) as served:
        answers = []
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": f"Basic {TOKEN}"},  # right secret, wrong scheme
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": TOKEN},
        ):
            with httpx.Client(base_url=served.url, headers=headers) as client:
                for method, path in (("POST", "/jobs/send_email"), ("GET", "/jobs/x"),
                                     ("DELETE", "/jobs/x"), ("GET", "/openapi.json"),
                                     ("GET", "/nowhere")):  # fmt: skip
                    response = client.request(method, path, json=EMAIL)
                    assert response.status_code == 401, (headers, method, path)
                    assert "wrong-token" not in response.text
                    assert TOKEN not in response.text
                    answers.append(response.content)
        assert len(set(answers)) == 1, "every 401 must be the same answer"
        with httpx.Client(base_url=served.url) as client:
            assert client.get("/healthz").status_code == 200


# --- publish ----------------------------------------------------------------------------------


async def test_202_only_after_the_broker_has_the_job_and_the_job_runs(
    broker: Broker, redis_parts: RedisParts
) -> None:
    ran: list[Any] = []
    app = build(broker, redis_parts, CollectorRegistry(), ran=ran)
    worker: Worker = app.state.leveret.worker
    with serve(app) as served:
        wait_connected(served)
        purge(broker, "api_email")
        with served.client() as client:
            response = client.post("/jobs/send_email", json=EMAIL, params={"priority": 7})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            generic = client.post("/jobs/send_email", json=EMAIL, params={"delay": 0})
            assert generic.status_code == 202
            # On the queue already: the broker confirmed it before the 202.
            assert await broker.depth("api_email") == 2
            (message,) = [
                m for m in broker.get_messages("api_email")
                if m["properties"]["message_id"] == job_id
            ]  # fmt: skip
            assert message["properties"]["priority"] == 7
            assert message["properties"]["type"] == "send_email"
            # GET reads queued at once.
            status = client.get(f"/jobs/{job_id}")
            assert status.status_code == 200
            assert status.json()["state"] == "queued"
            assert status.json()["job"] == "send_email"
            assert status.json()["queue"] == "api_email"
        async with running(worker):
            await wait_for(lambda: {job_id, generic.json()["id"]} <= {r[0] for r in ran}, 20,
                           "both jobs to run")  # fmt: skip


async def test_get_reads_queued_then_succeeded_with_the_result(
    broker: Broker, redis_parts: RedisParts
) -> None:
    """No worker runs: the ``succeeded`` status is written the way a worker's settle writes it;
    what is under test is that GET serves what the store holds."""
    app = build(broker, redis_parts, CollectorRegistry())
    store = redis_parts.test_store()
    try:
        with serve(app) as served:
            wait_connected(served)
            with served.client() as client:
                job_id = client.post("/jobs/send_email", json=EMAIL).json()["id"]
                assert client.get(f"/jobs/{job_id}").json()["state"] == "queued"
                await store.apply(
                    JobEvent(
                        job_id=job_id,
                        job="send_email",
                        queue="api_email",
                        state="succeeded",
                        attempt=1,
                        at=datetime.now(UTC),
                        result={"sent": True},
                    )
                )
                body = client.get(f"/jobs/{job_id}").json()
                assert body["state"] == "succeeded"
                assert body["result"] == {"sent": True}
                assert set(body) == {"id", "job", "queue", "state", "attempt", "result",
                                     "error", "progress", "message", "updated_at",
                                     "created_at", "started_at", "ended_at"}  # fmt: skip
                assert body["created_at"] is not None and body["ended_at"] is not None
                assert client.get("/jobs/no-such-id").status_code == 404
    finally:
        await store.close()


def test_404_unknown_job_and_422_with_the_models_errors(broker: Broker) -> None:
    app = build(broker, None, CollectorRegistry())
    with serve(app) as served, served.client() as client:
        missing = client.post("/jobs/no_such_job", json=EMAIL)
        assert missing.status_code == 404
        bad = client.post("/jobs/send_email", json={"to": "x", "subject": 3})
        assert bad.status_code == 422
        errors = bad.json()["detail"]
        assert {tuple(e["loc"]) for e in errors} == {("to",), ("subject",)}
        assert {e["type"] for e in errors} == {"string_too_short", "string_type"}
        generic = client.post("/jobs/resize", json={"width": 0, "height": 5})
        assert generic.status_code == 422
        assert generic.json()["detail"][0]["loc"] == ["width"]
        not_json = client.post("/jobs/send_email", content=b"{nope",
                               headers={"content-type": "application/json"})  # fmt: skip
        assert not_json.status_code == 422
        assert not_json.json()["detail"][0]["type"] == "json_invalid"
        array = client.post("/jobs/free_form", json=[1, 2])
        assert array.status_code == 422
        assert client.post("/jobs/send_email", json=EMAIL,
                           params={"priority": 10}).status_code == 422  # fmt: skip
        assert client.post("/jobs/send_email", json=EMAIL,
                           params={"delay": -1}).status_code == 422  # fmt: skip


def test_503_while_the_broker_is_unreachable_and_healthz_still_answers(broker: Broker) -> None:
    dead = broker.settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
                           connect_timeout=1)  # fmt: skip
    worker = make_worker(dead)
    app = create_app(worker, ApiSettings(api_token=TOKEN, api_connect_backoff=0.1,
                                         api_connect_backoff_max=0.2),
                     registry=CollectorRegistry(), metrics_port=0)  # fmt: skip
    with serve(app) as served:
        with httpx.Client(base_url=served.url) as client:
            assert client.get("/healthz").status_code == 200
        with served.client() as client:
            response = client.post("/jobs/send_email", json=EMAIL)
            assert response.status_code == 503
            assert response.headers["retry-after"]
            # Still unreachable after a few attempts: still 503, still alive.
            deadline = time.monotonic() + 10
            while served.state.connect_failures < 3:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert client.post("/jobs/send_email", json=EMAIL).status_code == 503
            assert not served.state.connected


# --- the body limit ---------------------------------------------------------------------------


def _counting_chunks(total: int, chunk: int, sent: list[int]) -> Iterator[bytes]:
    """A JSON body streamed in chunks (no Content-Length): counts what was handed to the
    client, so the test sees how much the server let through before it answered."""
    head = b'{"to": "a@b.c", "subject": "'
    yield head
    sent[0] += len(head)
    while sent[0] < total:
        yield b"x" * chunk
        sent[0] += chunk
    yield b'"}'


def test_413_for_a_body_over_the_limit_sent_in_chunks_stops_reading_early(
    broker: Broker,
) -> None:
    limit = 64 * 1024
    app = build(broker, None, CollectorRegistry(),
                settings=ApiSettings(api_token=TOKEN, api_max_body=limit))  # fmt: skip
    with serve(app) as served, served.client() as client:
        wait_connected(served)
        sent = [0]
        huge = 2 * 1024**3  # 2 GiB: far more than could ever be read in this test's time
        response = client.post(
            "/jobs/send_email",
            content=_counting_chunks(huge, 64 * 1024, sent),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 413
        # The server answered and closed after about the limit: socket buffers let a few MiB
        # through at most, never the 2 GiB the generator would yield.
        assert sent[0] < 64 * 1024**2, f"{sent[0]} bytes were sent before the 413"
        print(f"bytes handed to the client before the 413: {sent[0]}")
        # A declared Content-Length over the limit answers at once, before any body.
        early = client.post(
            "/jobs/send_email",
            content=b"x" * (limit + 1),
            headers={"content-type": "application/json"},
        )
        assert early.status_code == 413
        # At the limit it is read and judged by the model (not 413).
        head = b'{"to": "a@b.c", "subject": "'
        exact = head + b"y" * (limit - len(head) - 2) + b'"}'
        assert len(exact) == limit
        for body in (exact, iter([exact[:1000], exact[1000:]])):  # declared, then chunked
            accepted = client.post("/jobs/send_email", content=body,
                                   headers={"content-type": "application/json"})  # fmt: skip
            assert accepted.status_code == 202, accepted.text


# --- metrics ----------------------------------------------------------------------------------


def test_request_metrics_by_route_template_method_and_status(broker: Broker) -> None:
    registry = CollectorRegistry()
    app = build(broker, None, registry)
    with serve(app) as served:
        with served.client() as client:
            client.get("/jobs/abc")
            client.get("/jobs/def")
            client.post("/jobs/no_such_job", json={})
        with served.client(token=None) as client:
            client.get("/jobs/abc")
            client.get("/healthz")

    def value(route: str, method: str, status: str) -> float:
        got = registry.get_sample_value(
            "leveret_api_requests_total", {"route": route, "method": method, "status": status}
        )
        return got or 0.0

    assert value("/jobs/{job_id}", "GET", "503") == 2  # no status store configured here
    assert value("/jobs/{job}", "POST", "404") == 1
    assert value("/jobs/{job_id}", "GET", "401") == 1
    assert value("/healthz", "GET", "200") == 1
    assert (
        registry.get_sample_value(
            "leveret_api_request_duration_seconds_count", {"route": "/healthz", "method": "GET"}
        )
        == 1
    )


def test_metrics_are_served_on_the_metrics_port_without_a_token(broker: Broker) -> None:
    worker = make_worker(broker.settings())
    app = create_app(worker, ApiSettings(api_token=TOKEN), registry=CollectorRegistry(),
                     metrics_port=free_port())  # fmt: skip
    with serve(app) as served:
        with served.client() as client:
            client.get("/healthz")
        port = served.state.health_port
        response = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        assert 'leveret_api_requests_total{method="GET",route="/healthz",status="200"}' in (
            response.text
        )
        with served.client() as client:  # not on the API port
            assert client.get("/metrics").status_code == 404


def test_422_for_a_body_that_is_not_utf8(broker: Broker) -> None:
    """Found by schemathesis: pydantic cannot serialise bytes input that is not UTF-8."""
    app = build(broker, None, CollectorRegistry())
    with serve(app) as served, served.client() as client:
        response = client.post("/jobs/resize", content=b"\x8a\xd6\x13x\x88\x96\xae",
                               headers={"content-type": "application/json"})  # fmt: skip
        assert response.status_code == 422
        assert response.json()["detail"][0]["type"] == "json_invalid"


def test_a_dropped_connection_answers_503_or_202_never_500_and_recovers(broker: Broker) -> None:
    app = build(broker, None, CollectorRegistry())
    with serve(app) as served, served.client() as client:
        wait_connected(served)
        assert client.post("/jobs/send_email", json=EMAIL).status_code == 202
        deadline = time.monotonic() + 20  # the management API lists connections with a lag
        closed = 0
        while closed < 2:  # the API's own connection and its publisher's
            closed += broker.close_connections()
            assert time.monotonic() < deadline, "the API's connections never showed up"
            time.sleep(0.2)
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = client.post("/jobs/send_email", json=EMAIL).status_code
            seen.append(status)
            if status == 202 and len(seen) > 1:
                break
            time.sleep(0.1)
        assert set(seen) <= {202, 503}, seen
        assert seen[-1] == 202, f"never recovered: {seen}"
        print(f"answers after the drop: {seen}")


def test_a_job_posted_with_the_status_url_in_the_environment_names_its_queue_at_once(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LEVERET_STATUS_URL`` set: the API's publisher writes ``queued`` itself, and it knows
    the app, so the queue is there from the first write (it read ``""`` when the library's
    write, which does not know the queue, came first)."""
    url = "redis://127.0.0.1:6379/13"
    monkeypatch.setenv("LEVERET_STATUS_URL", url)
    worker = make_worker(broker.settings(status_url=url))
    app = create_app(
        worker, ApiSettings(api_token=TOKEN), registry=CollectorRegistry(), metrics_port=0
    )
    ids: list[str] = []
    try:
        with serve(app) as served:
            wait_connected(served)
            with served.client() as client:
                job_id = client.post("/jobs/send_email", json=EMAIL).json()["id"]
                ids.append(job_id)
                body = client.get(f"/jobs/{job_id}").json()
        assert (body["state"], body["queue"]) == ("queued", "api_email")
        assert body["created_at"] is not None
        assert body["started_at"] is None and body["ended_at"] is None
    finally:
        import redis

        client_ = redis.Redis.from_url(url)
        for i in ids:
            client_.delete(f"leveret:status:{i}")
        client_.close()
        purge(broker, "api_email")
