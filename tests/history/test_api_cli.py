"""GET /jobs, GET /stats and `leveret jobs` / `leveret stats` / `leveret history migrate` over a
real history database; 503 and one clear line without one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from leveret.consumer import Worker
from leveret.consumer.api import ApiSettings, create_app
from leveret.consumer.history.store import HistoryStore
from leveret.producers.stores.settings import LifecycleSettings
from leveret.producers.wire.events import JobEvent
from tests.support import Broker, leveret_cli

TOKEN = "history-token"


def _app(broker: Broker, history_url: str | None) -> Any:
    worker = Worker(broker.settings())

    @worker.job("h_api", queue="h_api")
    async def noop(payload: dict[str, Any]) -> None:
        pass

    lifecycle = LifecycleSettings(history_url=SecretStr(history_url) if history_url else None)
    return create_app(
        worker,
        ApiSettings(api_token=SecretStr(TOKEN)),
        lifecycle=lifecycle,
        metrics_port=0,
    )


@pytest.fixture
async def client_for(broker: Broker) -> AsyncIterator[Any]:
    apps: list[Any] = []

    def make(history_url: str | None, token: str | None = TOKEN) -> httpx.AsyncClient:
        app = _app(broker, history_url)
        apps.append(app)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api", headers=headers
        )

    yield make
    for app in apps:
        if app.state.history is not None:
            await app.state.history.close()


def _events(n: int) -> list[JobEvent]:
    now = datetime.now(UTC)
    out = []
    for i in range(n):
        state = "dead" if i % 4 == 0 else "succeeded"
        out.append(
            JobEvent.model_validate(
                {
                    "job_id": f"api-{i:02d}",
                    "job": ("mail", "resize")[i % 2],
                    "queue": "q",
                    "state": state,
                    "attempt": 1,
                    "at": now - timedelta(minutes=n - i),
                    "duration_s": 0.5 + i / 100,
                    "result": None,
                    **({"error": "boom"} if state == "dead" else {}),
                }
            )
        )
    return out


async def test_without_a_history_store_the_routes_answer_503(client_for: Any) -> None:
    async with client_for(None) as client:
        for path in ("/jobs", "/stats", "/jobs?state=dead"):
            response = await client.get(path)
            assert response.status_code == 503, response.text
            assert response.json() == {
                "detail": "no job history is configured (set LEVERET_HISTORY_URL)"
            }
    async with client_for(None, token=None) as client:
        assert (await client.get("/jobs")).status_code == 401


async def test_listing_and_stats_over_http(client_for: Any, store: HistoryStore) -> None:
    await store.upsert(_events(30))
    async with client_for(store._url) as client:
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 12}
            if cursor:
                params["cursor"] = cursor
            response = await client.get("/jobs", params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            seen += [j["id"] for j in body["jobs"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == [f"api-{i:02d}" for i in reversed(range(30))]
        dead = (await client.get("/jobs", params={"state": "dead", "job": "mail"})).json()
        assert [j["id"] for j in dead["jobs"]] == [
            f"api-{i:02d}" for i in reversed(range(30)) if i % 4 == 0 and i % 2 == 0
        ]
        assert dead["jobs"][0]["error"] == "boom" and dead["jobs"][0]["created_at"].endswith("Z")
        recent = (await client.get("/jobs", params={"since": "11m"})).json()
        assert len(recent["jobs"]) == 10
        for params, name in (
            ({"cursor": "garbage"}, "cursor"),
            ({"since": "yesterday"}, "since"),
            ({"until": "2026-01-01T00:00:00"}, "until"),
        ):
            response = await client.get("/jobs", params=params)
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["loc"] == ["query", name]
        assert (await client.get("/jobs", params={"state": "queued"})).status_code == 422
        assert (await client.get("/jobs", params={"limit": 0})).status_code == 422
        stats = (await client.get("/stats", params={"since": "1h"})).json()
        mail = next(s for s in stats["jobs"] if s["job"] == "mail")
        assert mail["total"] == 15 and mail["counts"]["dead"] == 8
        assert mail["failure_rate"] == pytest.approx(8 / 15)
        assert 0.5 <= mail["p50"] <= mail["p95"] <= mail["p99"] <= 0.8
        assert (await client.get("/stats", params={"since": "nonsense"})).status_code == 422


def cli(*args: str, env: dict[str, str]) -> Any:
    """The command in this process (click's runner): a second per run less than the script."""
    from click.testing import CliRunner

    from leveret.consumer.cli import cli as group

    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        runner = CliRunner()
    result = runner.invoke(group, list(args), env=env, catch_exceptions=False)
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def test_the_commands(history_url: str) -> None:
    async def fill() -> None:
        store = HistoryStore(history_url)
        try:
            await store.migrate()
            await store.upsert(_events(8))
        finally:
            await store.close()

    asyncio.run(fill())
    env = {"LEVERET_HISTORY_URL": history_url}
    again = cli("history", "migrate", env=env)
    assert again.returncode == 0 and again.stdout.strip() == "up to date; schema at 1"
    listed = cli("jobs", "--state", "dead", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "JOB", "QUEUE", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == ["api-04", "api-00"]
    paged = cli("jobs", "--limit", "3", "--json", env=env)
    assert [json.loads(line)["id"] for line in paged.stdout.splitlines()] == [
        "api-07",
        "api-06",
        "api-05",
    ]
    cursor = paged.stderr.strip().splitlines()[-1].removeprefix("more: --cursor ")
    rest = cli("jobs", "--limit", "3", "--cursor", cursor, "--json", env=env)
    assert [json.loads(line)["id"] for line in rest.stdout.splitlines()] == [
        "api-04",
        "api-03",
        "api-02",
    ]
    stats = cli("stats", env=env)
    assert stats.returncode == 0, stats.stderr
    header, *rows = stats.stdout.splitlines()
    assert header.split()[:3] == ["JOB", "TOTAL", "SUCCEEDED"]
    assert sorted(r.split()[0] for r in rows) == ["mail", "resize"]
    as_json = cli("stats", "--since", "1d", "--json", env=env)
    figures = {json.loads(line)["job"]: json.loads(line) for line in as_json.stdout.splitlines()}
    assert figures["mail"]["counts"]["dead"] == 2 and figures["mail"]["total"] == 4
    bad = cli("jobs", "--since", "yesterday", env=env)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


def test_the_commands_without_a_history_store() -> None:
    env = {"LEVERET_HISTORY_URL": ""}
    for args in (["jobs"], ["stats"], ["history", "migrate"]):
        done = cli(*args, env=env)
        assert done.returncode == 1
        assert done.stderr == (
            "error: no job history: set LEVERET_HISTORY_URL (e.g. postgresql://user:pass@host/db)\n"
        ), done.stderr
    down = leveret_cli("jobs", env={"LEVERET_HISTORY_URL": "postgresql://u:hunter2@127.0.0.1:1/x"})
    assert down.returncode == 1 and down.stderr.count("\n") == 1
    assert "hunter2" not in down.stderr and "unreachable" in down.stderr


async def test_the_routes_are_documented_only_with_a_history(
    client_for: Any, store: HistoryStore
) -> None:
    async with client_for(None) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert "/jobs" not in paths and "/stats" not in paths
    async with client_for(store._url) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert set(paths["/jobs"]) == {"get"} and "503" in paths["/stats"]["get"]["responses"]
        response = await client.get("/jobs", params={"queue": "a\x00b"})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["query", "queue"]
