"""The history writer with a real worker, broker and PostgreSQL: outcomes become one row per job;
a writer killed with SIGKILL and a PostgreSQL stopped mid-run lose no row once both are back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from leveret.consumer import JobContext, Worker
from leveret.consumer.history.store import HistoryStore
from leveret.consumer.history.writer import HistoryWriter, history_queue
from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from leveret.producers.wire.events import JobEvent, events_exchange
from tests.history.pg import private_cluster
from tests.support import Broker, running, unique, wait_for

HERE = Path(__file__).resolve().parent


async def count(url: str, where: str = "true") -> int:
    conn = await asyncpg.connect(url, timeout=2)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM leveret_jobs WHERE {where}"))
    finally:
        await conn.close()


async def rows_by_id(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        return {r["id"]: r for r in await conn.fetch("SELECT * FROM leveret_jobs")}
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def writing(writer: HistoryWriter) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(writer.run())
    await wait_for(lambda: writer.consuming or task.done(), 20, "the writer to consume")
    if task.done():
        task.result()
    try:
        yield task
    finally:
        writer.stop()
        await asyncio.wait_for(task, 30)


async def test_a_real_workers_outcomes_become_one_row_per_job(
    broker: Broker, history_url: str
) -> None:
    exchange, queue = unique("hx"), unique("hq")
    settings = broker.settings(exchange=exchange, history_url=history_url)
    assert settings.events_mode == "outcomes"  # the default where a history is kept
    worker = Worker(settings)

    @worker.job("h_ok", queue=queue)
    async def ok(payload: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return {"n": payload["n"]}

    @worker.job("h_flaky", queue=queue, max_attempts=3, backoff=0.1)
    async def flaky(payload: dict[str, Any], ctx: JobContext) -> str:
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")
        return "second"

    @worker.job("h_doomed", queue=queue, max_attempts=2, backoff=0.1)
    async def doomed(payload: dict[str, Any]) -> None:
        raise ValueError("always fails")

    store = HistoryStore(history_url)
    await store.migrate()
    old = JobEvent.model_validate(
        {
            "job_id": "ancient",
            "job": "h_ok",
            "queue": queue,
            "state": "succeeded",
            "attempt": 1,
            "at": datetime.now(UTC) - timedelta(days=40),
            "result": None,
        }
    )
    await store.upsert([old])
    writer = HistoryWriter(settings, store, days=30, batch_size=50, flush_interval=0.05)
    publisher = Publisher(settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange))
    await publisher.connect()
    try:
        async with writing(writer), running(worker):
            assert await count(history_url, "id = 'ancient'") == 0  # retention ran at start
            ids = [await publisher.publish("h_ok", {"n": i}) for i in range(5)]
            flaky_id = await publisher.publish("h_flaky", {})
            doomed_id = await publisher.publish("h_doomed", {})
            await publisher.publish("h_ok", {"n": 99}, job_id="twice")
            await wait_for(lambda: count(history_url, "id = 'twice'"), 20, "the first run")
            await publisher.publish("h_ok", {"n": 100}, job_id="twice")
            # a malformed event on the events exchange: logged and acknowledged
            connection = await aio_pika.connect(broker.url)
            channel = await connection.channel()
            ex = await channel.get_exchange(events_exchange(exchange))
            await ex.publish(aio_pika.Message(b"not json"), routing_key="h_ok.succeeded")
            await connection.close()

            async def done() -> bool:
                ended = "state IN ('succeeded','dead')"
                return (
                    await count(history_url, ended) == 8
                    and writer.stats.malformed == 1
                    and (await rows_by_id(history_url))["twice"]["result"] == '{"n": 100}'
                )

            await wait_for(done, 30, "every outcome in the history")
        rows = await rows_by_id(history_url)
        assert len(rows) == 8
        for job_id in ids:
            row = rows[job_id]
            assert (row["job"], row["queue"], row["state"], row["attempts"]) == (
                "h_ok",
                queue,
                "succeeded",
                1,
            )
            assert row["duration_s"] >= 0.02 and row["ended_at"] >= row["started_at"]
        f = rows[flaky_id]
        assert (f["state"], f["attempts"], f["result"], f["error"]) == (
            "succeeded",
            2,
            '"second"',
            None,
        )
        d = rows[doomed_id]
        assert (d["state"], d["attempts"]) == ("dead", 2) and "always fails" in d["error"]
        twice = rows["twice"]
        assert (twice["state"], twice["attempts"]) == ("succeeded", 1)
        assert await broker.depth(history_queue(exchange)) == 0
        listed, _ = await store.list_jobs(state="dead")
        assert [r.id for r in listed] == [doomed_id]
    finally:
        await publisher.close()
        await store.close()


def _writer_process(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "leveret"
    return subprocess.Popen(
        [str(exe), "history", "history_app:worker", "--batch", "100", "--flush-ms", "50"],
        cwd=HERE,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
async def test_sigkill_of_the_writer_and_a_postgres_outage_lose_no_row(
    broker: Broker, tmp_path: Path
) -> None:
    exchange, queue = unique("hx"), unique("hq")
    with private_cluster() as pg:
        url = pg.url()
        env = {
            **os.environ,
            "LEVERET_AMQP_URL": broker.url,
            "LEVERET_EXCHANGE": exchange,
            "LEVERET_HISTORY_URL": url,
            "LEVERET_METRICS_PORT": "0",
            "LEVERET_LOG_LEVEL": "info",
            "HISTORY_TEST_QUEUE": queue,
        }
        migrate = await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).parent / "leveret"), "history", "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert migrate.returncode == 0 and "applied migration(s) 1" in migrate.stdout
        settings = broker.settings(exchange=exchange, history_url=url)
        worker = Worker(settings)

        @worker.job("history_ok", queue=queue)
        async def ok(payload: dict[str, Any]) -> None:
            await asyncio.sleep(0.001)

        log = tmp_path / "writer.log"
        writer = _writer_process(env, log)
        # Events published before <exchange>.history exists are routed nowhere: the writer
        # declares it, so it runs (once, ever) before the first job's outcome.
        await wait_for(lambda: "history.consuming" in log.read_text(), 30, "the writer")
        publisher = Publisher(settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange))
        await publisher.connect()
        try:
            async with running(worker):
                published: list[str] = []

                async def publish(n: int) -> None:
                    for i in range(n):
                        published.append(await publisher.publish("history_ok", {"i": i}))

                # 1. writing, then SIGKILL mid-run
                await publish(200)
                await wait_for(lambda: count(url), 20, "the first rows")
                writer.send_signal(signal.SIGKILL)
                writer.wait(10)
                await publish(200)
                # 2. a new writer; PostgreSQL stopped under it while events keep coming
                writer = _writer_process(env, log)
                await asyncio.sleep(1.5)
                pg.stop("immediate")
                await publish(200)
                await asyncio.sleep(2)
                assert writer.poll() is None, log.read_text()[-3000:]
                pg.start()
                await wait_for(
                    lambda: count(url, "state = 'succeeded'"),
                    60,
                    "rows after the outage",
                )

                async def all_rows() -> bool:
                    return await count(url, "state = 'succeeded'") == len(published)

                await wait_for(all_rows, 60, "every job's row")
            assert await count(url) == 600
            text = log.read_text()
            assert "history.database_unavailable" in text
            # 3. SIGTERM: exit 0
            writer.send_signal(signal.SIGTERM)
            assert writer.wait(30) == 0, text[-3000:]
            assert await broker.depth(history_queue(exchange)) == 0
        finally:
            await publisher.close()
            if writer.poll() is None:
                writer.kill()
                writer.wait(10)


async def test_the_writer_refuses_a_schema_that_lacks_a_migration(
    broker: Broker, history_url: str
) -> None:
    from leveret.consumer.history.writer import SchemaBehind

    settings = broker.settings(exchange=unique("hx"), history_url=history_url)
    store = HistoryStore(history_url)
    try:
        writer = HistoryWriter(settings, store)
        with pytest.raises(SchemaBehind, match="leveret history migrate"):
            await asyncio.wait_for(writer.run(), 30)
        # the queue is declared all the same: events wait for the writer from now on
        assert broker.queue_exists(history_queue(settings.exchange))
    finally:
        await store.close()
