"""The global limiter's store failing is not the job's failure (issue 8): a ``global_rate_limit``
job whose Redis (``LEVERET_STATUS_URL``) goes away waits, postponed, and burns no attempt; it is
never dead-lettered for it. The worker says it is not ready (``/readyz`` 503) once the outage has
lasted ``LEVERET_STATUS_TIMEOUT``, the outage is one outage (one log line, not one per job), and
when Redis is back on the same port every job runs exactly once, on attempt 1.

The Redis is a private ``redis-server`` this test starts and stops (never the shared one). Only
the limiter uses it: the status store, which would hold every ack through the same outage, is
another test's subject and is left off here, so ``/readyz`` answers for the limiter alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import structlog.testing
from pydantic import BaseModel

from leveret.consumer import JobContext, Worker
from leveret.consumer.features.ratelimit.limiters import GlobalLimiters
from leveret.consumer.runtime import startup as startup_module
from leveret.producers import Publisher
from tests.support import Broker, running, unique, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of this test's own, stopped and started again on the same port."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class P(BaseModel):
    n: int


@pytest.mark.timeout(120)
async def test_limiter_store_outage_postpones_burns_no_attempt_and_reports_not_ready(
    broker: Broker, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = unique("rlout")
    settings = broker.settings(
        status_url=private_redis.url, status_timeout=1.5, metrics_port=_free_port()
    )
    worker = Worker(settings)
    runs: list[tuple[int, int]] = []

    @worker.job(f"{queue}-g", queue=queue, global_rate_limit="50/s", max_attempts=2)
    async def limited(p: P, ctx: JobContext) -> None:
        runs.append((p.n, ctx.attempt))

    # Only the limiter on the private Redis (see the module docstring).
    monkeypatch.setattr(startup_module, "open_status_store", lambda settings: None)
    made: list[GlobalLimiters] = []
    original = startup_module.global_limiters

    def global_limiters(s: Any) -> GlobalLimiters:
        limiters = original(s)
        # The worker's wiring (what startup/worker do once it is in): the outage's stall is a
        # reason the worker is not ready, after LEVERET_STATUS_TIMEOUT.
        if getattr(limiters, "on_stalled", None) is None:
            limiters.on_stalled = lambda stalled: worker._readiness.stall("rate_limit", stalled)
        if hasattr(limiters, "outage"):
            limiters.outage.status_timeout = s.status_timeout
        made.append(limiters)
        return limiters

    monkeypatch.setattr(startup_module, "global_limiters", global_limiters)

    async with (
        logs_captured() as logs,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.metrics_port}", timeout=2) as http,
        running(worker),
        Publisher(broker.url) as pub,
    ):

        async def readyz() -> int:
            return (await http.get("/readyz")).status_code

        await pub.publish_many([(f"{queue}-g", {"n": i}) for i in range(3)])
        await wait_for(lambda: len(runs) == 3, 20, "jobs before the outage")
        assert await readyz() == 200

        private_redis.stop()
        await pub.publish_many([(f"{queue}-g", {"n": i}) for i in range(3, 23)])
        await asyncio.sleep(3.0)  # the outage: jobs keep waiting, none is spent
        burnt = [e for e in logs if e["event"] in ("job_retried", "job_dead_lettered")]
        assert not burnt, burnt  # no attempt burnt, nothing dead-lettered for the limiter
        assert len(runs) == 3, runs
        assert await broker.depth(f"{queue}.dlq") == 0
        # not ready once the outage has lasted LEVERET_STATUS_TIMEOUT (1.5 s here)
        await wait_for(lambda: readyz_is(readyz, 503), 5, "/readyz 503 in the outage")

        private_redis.start()  # back, on the same port
        await wait_for(lambda: len(runs) >= 23, 45, "every job once Redis is back")
        await wait_for(lambda: readyz_is(readyz, 200), 15, "/readyz 200 after the outage")
        await asyncio.sleep(1.0)  # nothing runs twice
    assert Counter(n for n, _ in runs) == Counter(range(23))
    assert {a for _, a in runs} == {1}  # waiting burnt no attempt
    assert await broker.depth(f"{queue}.dlq") == 0
    outage_lines = [e for e in logs if e["event"] == "global_rate_limit_store_unavailable"]
    assert len(outage_lines) == 1, outage_lines  # one line per outage, not one per job
    assert [e["event"] for e in logs].count("global_rate_limit_store_back") == 1


@contextlib.asynccontextmanager
async def logs_captured() -> AsyncIterator[list[MutableMapping[str, Any]]]:
    """The worker's log entries as dicts (no rendering: tracebacks are not formatted)."""
    with structlog.testing.capture_logs() as logs:
        yield logs


async def readyz_is(readyz: Any, code: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return bool(await readyz() == code)
    return False


async def test_limiter_redis_that_never_answers_fails_within_its_timeouts() -> None:
    """A Redis that accepts connections and never answers (a hung server, a black hole) must not
    hang a limited delivery: the limiter's client has connect and socket timeouts, and the
    failure is the limiter's (``LimiterUnavailable``: the job waits), not the job's."""
    from leveret.consumer.features.ratelimit.limiters import parse_rate

    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiters = GlobalLimiters("jobs", f"redis://127.0.0.1:{port}/0", connect=lambda: None)
    try:
        limited = limiters.for_job("charge", parse_rate("5/s"))
        with pytest.raises(Exception) as raised:
            await asyncio.wait_for(limited.try_acquire(), 15)
        # not TimeoutError (this test's own bound: the limiter hung) but the limiter's own error
        assert type(raised.value).__name__ == "LimiterUnavailable", repr(raised.value)
        assert accepted  # it did reach the server: the timeout, not a refusal, ended it
    finally:
        await limiters.close()
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
