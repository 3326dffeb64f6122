"""The bare aio-pika loop: the reference every ratio is taken against.

Consumer: prefetch from the spec, a callback per delivery (aiormq runs each as a task), the body
parsed with ``json.loads`` and one ``ack`` per message after the handler, no validation, no
metrics, no logs. Publisher: persistent messages, ``mandatory``, confirms on (one in flight,
or ``window`` in flight), or confirms off for ``publish_noconfirm``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika

from bench.runners.common import Tally, load_spec, run_on_loop, say, shares_queue, wait_go
from bench.wire import PAD


async def publish(spec: dict[str, Any]) -> None:
    connection = await aio_pika.connect(spec["url"])
    confirms = spec["workload"] != "publish_noconfirm"
    channel = await connection.channel(publisher_confirms=confirms)
    await channel.declare_queue(spec["queue"], durable=True)
    say("READY")
    wait_go()
    n, queue = spec["n"], spec["queue"]
    exchange = channel.default_exchange
    loop = asyncio.get_running_loop()

    async def one(i: int) -> None:
        body = json.dumps({"i": i, "ts": 0.0, "pad": PAD}).encode()
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
            mandatory=True,
        )

    started = loop.time()
    if spec["workload"] == "publish_seq" or not confirms:
        for i in range(n):
            await one(i)
    else:
        numbers = iter(range(n))

        async def lane() -> None:
            for i in numbers:
                await one(i)

        await asyncio.gather(*(lane() for _ in range(spec["window"])))
    elapsed = loop.time() - started
    await connection.close()
    say("RESULT", elapsed=elapsed, n=n)


async def consume(spec: dict[str, Any]) -> None:
    connection = await aio_pika.connect(spec["url"])
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=spec["prefetch"])
    queue = await channel.declare_queue(spec["queue"], durable=True)
    say("READY")
    await asyncio.to_thread(wait_go)
    finished = asyncio.Event()
    loop = asyncio.get_running_loop()
    tally = Tally(spec, lambda: loop.call_soon_threadsafe(finished.set))
    io_s = float(spec.get("io_s", 0.0))

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        data = json.loads(message.body)
        tally.start(data)
        if io_s:
            await asyncio.sleep(io_s)
        await message.ack()
        tally.end()

    tally.go()
    await queue.consume(on_message)
    say("CONSUMING")
    if shares_queue(spec):
        tally.watch_idle()
    await finished.wait()
    await asyncio.sleep(0.2)  # let the last acks reach the socket
    result = tally.result()
    await connection.close()
    say("RESULT", **result)


def main() -> None:
    spec = load_spec()
    run_on_loop(spec, publish(spec) if spec["workload"].startswith("publish") else consume(spec))


if __name__ == "__main__":
    main()
