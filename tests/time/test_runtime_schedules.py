"""Runtime schedules on the real broker and Redis: added, listed and removed through the API and
the CLI, fired by the app's leader exactly once per tick (two workers running), and surviving a
restart of every process and of the broker (a dedicated node: the shared broker is never
touched). Redis database 9; the schedule hash of each test's exchange is deleted afterwards."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from leveret.consumer import JobContext, Worker
from leveret.producers import Publisher
from leveret.producers.schedules import (
    DEFAULT_SCHEDULES_PREFIX,
    SchedulesUnavailableError,
    runtime_schedules,
)
from leveret.producers.settings import ConnectionSettings
from leveret.producers.stores.status import DEFAULT_PREFIX
from leveret.topology.errors import InvalidValueError
from tests.faults.conftest import certs, node  # noqa: F401 - the dedicated node's fixtures
from tests.faults.plumbing import DedicatedNode, WorkerProcess, reaped
from tests.support import Broker, leveret_cli, running, unique, wait_for

STATUS_URL = "redis://127.0.0.1:6379/9"


@pytest.fixture
def exchange() -> Iterator[str]:
    """The test's exchange; afterwards its schedule hash and its ticks' statuses are deleted."""
    name = unique("ex")
    yield name
    client = redis.Redis.from_url(STATUS_URL)
    client.delete(DEFAULT_SCHEDULES_PREFIX + name)
    for prefix in TICK_NAMES:
        keys = list(client.scan_iter(f"{DEFAULT_PREFIX}{prefix}@*"))
        if keys:
            client.delete(*keys)
    TICK_NAMES.clear()
    client.close()


TICK_NAMES: list[str] = []


def schedule_name(prefix: str) -> str:
    name = unique(prefix)
    TICK_NAMES.append(name)
    return name


def publisher(url: str, exchange: str, status_url: str | None = STATUS_URL) -> Publisher:
    return Publisher(
        settings=ConnectionSettings(amqp_url=url, exchange=exchange), status_url=status_url
    )


def ticking_worker(url: str, exchange: str, queue: str, fired: list[str]) -> Worker:
    worker = Worker(
        Broker_settings(url, exchange=exchange, status_url=STATUS_URL),
        registry=CollectorRegistry(),
    )

    @worker.job(f"{queue}-tick", queue=queue)
    async def tick(payload: dict[str, int], ctx: JobContext) -> None:
        fired.append(ctx.job_id)

    return worker


def Broker_settings(url: str, **overrides: object) -> object:
    from leveret.consumer import WorkerSettings

    values: dict[str, object] = {"amqp_url": url, "metrics_port": 0, "shutdown_grace": 5}
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


def assert_once_per_tick(fired: list[str], name: str) -> list[str]:
    """Every id once, each ``<name>@<tick>``: no tick fired (or run) twice."""
    counts = collections.Counter(fired)
    assert all(n == 1 for n in counts.values()), counts.most_common(3)
    ticks = sorted(fired)
    assert all(t.startswith(f"{name}@") for t in ticks), ticks
    return ticks


async def test_api_add_list_remove_fired_once_per_tick_by_one_of_two_workers(
    broker: Broker, exchange: str
) -> None:
    queue, name = unique("q"), schedule_name("every")
    fired: list[str] = []
    one = ticking_worker(broker.url, exchange, queue, fired)
    two = ticking_worker(broker.url, exchange, queue, fired)
    async with running(one), running(two), publisher(broker.url, exchange) as pub:
        added = await pub.schedule(name, f"{queue}-tick", every=1, payload={"n": 1})
        assert added.every_s == 1 and added.payload == {"n": 1}
        listed = await pub.schedules()
        assert [s.name for s in listed] == [name]
        assert [s.name for s in await runtime_schedules(STATUS_URL, exchange)] == [name]
        await wait_for(lambda: len(fired) >= 4, 20, "four ticks fired")
        assert await pub.unschedule(name) is True
        assert await pub.unschedule(name) is False
        await asyncio.sleep(1.5)  # the leader reads the set every second
        stopped_at = len(fired)
        await asyncio.sleep(2.0)
        assert len(fired) == stopped_at, "a removed schedule kept firing"
    assert_once_per_tick(fired, name)


async def test_schedule_errors(broker: Broker, exchange: str) -> None:
    async with publisher(broker.url, exchange, status_url=None) as pub:
        with pytest.raises(SchedulesUnavailableError, match="LEVERET_STATUS_URL"):
            await pub.schedule("n", "job", every=5)
    async with publisher(broker.url, exchange) as pub:
        with pytest.raises(InvalidValueError, match="exactly one of cron= or every="):
            await pub.schedule("n", "job")
        with pytest.raises(InvalidValueError, match="time zone"):
            await pub.schedule("n", "job", cron="0 2 * * *", tz="Mars/Olympus")
        assert await pub.schedules() == []


async def test_cli_add_list_remove_and_fired(broker: Broker, exchange: str) -> None:
    queue, name = unique("q"), schedule_name("cli")
    env = {"LEVERET_STATUS_URL": STATUS_URL, "LEVERET_EXCHANGE": exchange}
    fired: list[str] = []
    worker = ticking_worker(broker.url, exchange, queue, fired)
    async with running(worker):
        out = await asyncio.to_thread(
            leveret_cli, "schedule", "add", name, f"{queue}-tick", "--every", "1",
            "--payload", '{"n": 2}', env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert f"added {name}" in out.stdout
        listed = await asyncio.to_thread(leveret_cli, "schedule", "list", "--json", env=env)
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(r["name"], r["source"], r["expression"]) for r in rows] == [
            (name, "runtime", "every 1s")
        ]
        table = await asyncio.to_thread(leveret_cli, "schedule", "list", env=env)
        assert name in table.stdout and "runtime" in table.stdout
        await wait_for(lambda: len(fired) >= 2, 20, "the CLI's schedule fired")
        gone = await asyncio.to_thread(leveret_cli, "schedule", "remove", name, env=env)
        assert gone.returncode == 0 and f"removed {name}" in gone.stdout
        again = await asyncio.to_thread(leveret_cli, "schedule", "remove", name, env=env)
        assert again.returncode == 1 and "no runtime schedule" in again.stderr
        bad = await asyncio.to_thread(
            leveret_cli, "schedule", "add", "x", "y", "--cron", "nope", env=env
        )
        assert bad.returncode == 1 and "cron" in bad.stderr
        nourl = await asyncio.to_thread(
            leveret_cli, "schedule", "list", env={"LEVERET_STATUS_URL": ""}
        )
        assert nourl.returncode != 0
    assert_once_per_tick(fired, name)


APP = """
import os
from leveret.consumer import JobContext, Worker

worker = Worker()
_LOG = os.open(os.environ["TICK_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@worker.job(os.environ["TICK_QUEUE"] + "-tick", queue=os.environ["TICK_QUEUE"])
async def tick(payload: dict, ctx: JobContext) -> None:
    os.write(_LOG, (ctx.job_id + "\\n").encode())
"""


@pytest.mark.slow
async def test_runtime_schedule_survives_a_restart_of_every_process_and_of_the_broker(
    node: DedicatedNode,  # noqa: F811
    exchange: str,
    tmp_path: Path,
) -> None:
    queue, name = unique("q"), schedule_name("durable")
    (tmp_path / "tickapp.py").write_text(APP)
    log = tmp_path / "ticks.log"
    env = {
        "TICK_QUEUE": queue,
        "TICK_LOG": str(log),
        "LEVERET_EXCHANGE": exchange,
        "LEVERET_STATUS_URL": STATUS_URL,
    }

    def fired() -> list[str]:
        return log.read_text().split() if log.exists() else []

    first = WorkerProcess.start(tmp_path, "tickapp:worker", node.url, env=env)
    with reaped(first):
        await first.wait_ready()
        async with publisher(node.url, exchange) as pub:
            await pub.schedule(name, f"{queue}-tick", every=1)
        await wait_for(lambda: len(fired()) >= 3, 30, "three ticks before the restart")
        # Every Leveret process gone (the publisher closed above). SIGTERM: the tick running
        # is finished and acked (a SIGKILL would run it again after the restart: the job's
        # at-least-once, not a second fire; the takeover tests cover a killed leader).
        first.proc.terminate()
        assert await first.wait_exit(20) == 0, first.log()
    before = len(fired())
    await asyncio.to_thread(node.ctl, "stop_app")
    await asyncio.sleep(1)
    await asyncio.to_thread(node.ctl, "start_app")
    await asyncio.to_thread(node.wait_app, True)
    second = WorkerProcess.start(tmp_path, "tickapp:worker", node.url, env=env)
    with reaped(second):
        await second.wait_ready()
        await wait_for(lambda: len(fired()) >= before + 4, 40, "ticks after the restart")
        async with publisher(node.url, exchange) as pub:
            assert [s.name for s in await pub.schedules()] == [name]
            await pub.unschedule(name)
    ticks = assert_once_per_tick(fired(), name)
    print(f"\nRUNTIME-SCHEDULE restart: {before} ticks before, {len(ticks) - before} after, "
          f"each once")  # fmt: skip
