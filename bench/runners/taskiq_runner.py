"""taskiq with taskiq-aio-pika, its receiver embedded as ``taskiq worker`` runs it.

Best documented settings: a classic durable queue (its default is quorum; every other library
here uses classic), ``qos`` (prefetch) 1,000 and ``max_async_tasks`` 1,000 for no-op throughput,
100 and 100 for I/O-bound jobs, ``ack_time=WHEN_EXECUTED`` (ack after the task), publisher
confirms (aio-pika's default channel). Retries: ``SmartRetryMiddleware`` with a 1 s delay, no
jitter, through the broker's TTL delay queue.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.runners.common import Tally, load_spec, run_on_loop, say, wait_go
from bench.wire import payload


async def run(spec: dict[str, Any]) -> None:
    from taskiq import SmartRetryMiddleware
    from taskiq.acks import AcknowledgeType
    from taskiq.api import run_receiver_task
    from taskiq_aio_pika import AioPikaBroker
    from taskiq_aio_pika.queue import Queue, QueueType

    prefetch = spec.get("prefetch", 1000)
    broker = AioPikaBroker(
        spec["url"],
        qos=prefetch,
        task_queues=[Queue(name=spec["queue"], type=QueueType.CLASSIC)],
        delay_queue=Queue(name=spec["queue"] + ".delay", type=QueueType.CLASSIC),
        dead_letter_queue=Queue(name=spec["queue"] + ".dead", type=QueueType.CLASSIC),
    ).with_middlewares(
        SmartRetryMiddleware(
            default_retry_label=True,
            default_retry_count=3,
            default_delay=spec.get("backoff_s", 1.0),
            use_jitter=False,
            use_delay_exponent=False,
        )
    )
    finished = asyncio.Event()
    loop = asyncio.get_running_loop()
    tally = Tally(spec, lambda: loop.call_soon_threadsafe(finished.set))
    io_s = float(spec.get("io_s", 0.0))

    @broker.task(task_name=spec["job"])
    async def handle(data: dict[str, Any]) -> None:
        if tally.start(data):
            raise RuntimeError("first attempt fails on purpose")
        if io_s:
            await asyncio.sleep(io_s)
        tally.end()

    consuming = not spec["workload"].startswith("publish")
    broker.is_worker_process = consuming
    await broker.startup()
    say("READY")
    await asyncio.to_thread(wait_go)
    if not consuming:
        n = spec["n"]
        started = loop.time()
        if spec["workload"] == "publish_seq":
            for i in range(n):
                await handle.kiq(payload(i))
        else:
            numbers = iter(range(n))

            async def lane() -> None:
                for i in numbers:
                    await handle.kiq(payload(i))

            await asyncio.gather(*(lane() for _ in range(spec["window"])))
        elapsed = loop.time() - started
        await broker.shutdown()
        say("RESULT", elapsed=elapsed, n=n)
        return
    tally.go()
    receiver = asyncio.create_task(
        run_receiver_task(
            broker,
            max_async_tasks=spec.get("concurrency", prefetch),
            max_prefetch=0,
            ack_time=AcknowledgeType.WHEN_EXECUTED,
        )
    )
    await asyncio.sleep(0.05)
    say("CONSUMING")
    if spec["workload"] == "consume_2proc":
        tally.watch_idle()
    await finished.wait()
    await asyncio.sleep(0.2)
    receiver.cancel()
    await asyncio.gather(receiver, return_exceptions=True)
    await broker.shutdown()
    say("RESULT", **tally.result())


def main() -> None:
    spec = load_spec()
    run_on_loop(spec, run(spec))


if __name__ == "__main__":
    main()
