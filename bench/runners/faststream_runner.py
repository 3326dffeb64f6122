"""FastStream's RabbitBroker: a subscriber with a pydantic-validated ``dict`` body.

Best documented settings: a channel with ``prefetch_count`` 1,000 for no-op throughput, the
default ack policy (``REJECT_ON_ERROR``: ack after the handler returns), durable queue,
``persist=True`` and publisher confirms (its channels' default) for publishing. A RabbitMQ
subscriber handles one message at a time and FastStream 0.7 documents no concurrency option
for it, so the I/O-bound and retry workloads are not run (it has no delayed retry either).
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.runners.common import Tally, load_spec, run_on_loop, say, wait_go
from bench.wire import payload


async def run(spec: dict[str, Any]) -> None:
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(spec["url"], log_level=30)
    queue = RabbitQueue(spec["queue"], durable=True)
    finished = asyncio.Event()
    loop = asyncio.get_running_loop()
    tally = Tally(spec, lambda: loop.call_soon_threadsafe(finished.set))
    consuming = not spec["workload"].startswith("publish")
    if consuming:

        @broker.subscriber(queue, channel=Channel(prefetch_count=spec.get("prefetch", 1000)))
        async def handle(data: dict[str, Any]) -> None:
            tally.start(data)
            tally.end()

    await broker.connect()
    await broker.declare_queue(queue)
    say("READY")
    await asyncio.to_thread(wait_go)
    if not consuming:
        n = spec["n"]
        started = loop.time()
        if spec["workload"] == "publish_seq":
            for i in range(n):
                await broker.publish(payload(i), queue=spec["queue"], persist=True)
        else:
            numbers = iter(range(n))

            async def lane() -> None:
                for i in numbers:
                    await broker.publish(payload(i), queue=spec["queue"], persist=True)

            await asyncio.gather(*(lane() for _ in range(spec["window"])))
        elapsed = loop.time() - started
        await broker.stop()
        say("RESULT", elapsed=elapsed, n=n)
        return
    tally.go()
    await broker.start()
    say("CONSUMING")
    if spec["workload"] == "consume_2proc":
        tally.watch_idle()
    await finished.wait()
    await asyncio.sleep(0.2)
    await broker.stop()
    say("RESULT", **tally.result())


def main() -> None:
    spec = load_spec()
    run_on_loop(spec, run(spec))


if __name__ == "__main__":
    main()
