"""How fast the history writer drains outcome events into PostgreSQL.

    LEVERET_HISTORY_URL=postgresql://… python -m bench.history [--events 100000] [--batch 1000]

Publishes N ``succeeded`` events (one job id each, a small result) straight to a fresh
``<exchange>.events`` while no writer consumes (they wait in ``<exchange>.history``), migrates
the database given, then starts one ``HistoryWriter`` in this process and times it from its
start to the last batch acknowledged: events/s is N over that time. The queue is left empty and
the rows are left in the table (give it a scratch database). Without ``--url`` or
``LEVERET_HISTORY_URL`` it starts a private PostgreSQL cluster (fsync on) in a temp dir, as the
tests do, and removes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator

import aio_pika

from leveret.consumer.history.store import HistoryStore
from leveret.consumer.history.writer import HistoryWriter, history_queue, routing_keys
from leveret.producers.eventloop import loop_factory, resolve
from leveret.producers.settings import ConnectionSettings
from leveret.producers.wire.events import build_event, events_exchange


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from tests.history.pg import private_cluster

    with private_cluster(fsync=True) as cluster:
        yield cluster.url()


async def _publish(amqp: str, exchange: str, n: int) -> None:
    connection = await aio_pika.connect(amqp)
    channel = await connection.channel(publisher_confirms=True)
    events = await channel.declare_exchange(
        events_exchange(exchange), aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(history_queue(exchange), durable=True)
    for key in routing_keys():
        await queue.bind(events, key)
    step = 2000
    for start in range(0, n, step):
        await asyncio.gather(
            *(
                events.publish(
                    aio_pika.Message(
                        build_event(
                            job_id=uuid.uuid4().hex,
                            job=f"job{i % 10}",
                            queue="bench",
                            state="succeeded",
                            attempt=1,
                            duration_s=0.01 + (i % 100) / 1000,
                            result={"i": i},
                        ),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=f"job{i % 10}.succeeded",
                )
                for i in range(start, min(n, start + step))
            )
        )
    await connection.close()


async def _replicas(
    args: argparse.Namespace, amqp: str, exchange: str, store: HistoryStore
) -> float:
    import tempfile
    from pathlib import Path

    app = Path(tempfile.mkdtemp()) / "bench_history_app.py"
    app.write_text("from leveret import Worker\nworker = Worker()\n")
    env = {
        **os.environ,
        "LEVERET_AMQP_URL": amqp,
        "LEVERET_EXCHANGE": exchange,
        "LEVERET_HISTORY_URL": args.url,
        "LEVERET_LOG_LEVEL": "warning",
    }
    exe = Path(sys.executable).parent / "leveret"
    command = [str(exe), "history", "run", "bench_history_app:worker", "--loop", args.loop,
               "--batch", str(args.batch), "--prefetch", str(args.prefetch)]  # fmt: skip
    started = time.perf_counter()
    procs = [
        await asyncio.create_subprocess_exec(*command, cwd=app.parent, env=env)
        for _ in range(args.writers)
    ]
    try:
        while True:
            rows, _ = await store.list_jobs(limit=1)
            if rows:
                count = await _count(args.url)
                if count >= args.events:
                    return time.perf_counter() - started
            await asyncio.sleep(0.05)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)


async def _count(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM leveret_jobs"))
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> dict[str, object]:
    amqp = os.environ.get("LEVERET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    exchange = f"bench-history-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    await _publish(amqp, exchange, args.events)
    published_s = time.perf_counter() - started
    store = HistoryStore(args.url)
    await store.migrate()
    settings = ConnectionSettings(amqp_url=amqp, exchange=exchange)
    if args.writers == 1:
        writer = HistoryWriter(
            settings, store, batch_size=args.batch, prefetch=args.prefetch, retention_interval=1e9
        )
        started = time.perf_counter()
        task = asyncio.create_task(writer.run())
        while writer.stats.events < args.events:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        writer.stop()
        await task
    else:  # replicas: `leveret history` processes; done when every row is in the table
        elapsed = await _replicas(args, amqp, exchange, store)
    connection = await aio_pika.connect(amqp)
    channel = await connection.channel()
    await channel.queue_delete(history_queue(exchange))
    await channel.exchange_delete(events_exchange(exchange))
    await connection.close()
    await store.close()
    return {
        "events": args.events,
        "batch": args.batch,
        "publish_s": round(published_s, 2),
        "drain_s": round(elapsed, 2),
        "events_per_s": round(args.events / elapsed),
        "writers": args.writers,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--prefetch", type=int, default=4000)
    parser.add_argument("--url", default=os.environ.get("LEVERET_HISTORY_URL"))
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--writers", type=int, default=1, help="replicas (processes) if > 1")
    parsed = parser.parse_args()
    from leveret.consumer.logging import configure_logging

    configure_logging("warning")
    with _database(parsed.url) as url:
        parsed.url = url
        with asyncio.Runner(loop_factory=loop_factory(parsed.loop)) as runner:
            result = runner.run(main(parsed))
        result["loop"] = resolve(parsed.loop)
    json.dump(result, sys.stdout)
    print()
