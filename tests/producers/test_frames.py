"""``producers.broker.frames``: frames read in bulk decode exactly as aiormq's own reader
decodes them, however the socket splits them, and a delivery reaches the consumer whole."""

from __future__ import annotations

import asyncio
import random

import aio_pika
import aiormq
import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from leveret.producers.broker import frames
from tests.support import Broker, unique, wait_for


def _wire() -> tuple[bytes, list[tuple[int, object]]]:
    """A run of frames as a broker sends them: deliveries (method, header, body in pieces),
    heartbeats, on two channels."""
    out: list[tuple[int, object]] = []
    for n in range(40):
        body = bytes([n % 256]) * (n * 97)
        out.append((1 + n % 2, spec.Basic.Deliver("ctag", n + 1, False, "jobs", f"k{n}")))
        out.append(
            (1 + n % 2, ContentHeader(0, len(body), spec.Basic.Properties(message_id=f"m{n}")))
        )
        for at in range(0, len(body), 1000):
            out.append((1 + n % 2, ContentBody(body[at : at + 1000])))
        if n % 7 == 0:
            out.append((0, Heartbeat()))
    return b"".join(pamqp.frame.marshal(f, ch) for ch, f in out), out


def _same(a: object, b: object, channel: int) -> bool:
    return type(a) is type(b) and pamqp.frame.marshal(a, channel) == pamqp.frame.marshal(b, channel)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(5))
async def test_frames_split_anywhere_decode_as_sent(seed: int) -> None:
    data, sent = _wire()
    reader = asyncio.StreamReader()
    rnd = random.Random(seed)
    at = 0
    while at < len(data):  # chunks of 1 byte to 5 KiB: frames cut at every kind of place
        step = rnd.choice((1, 2, 7, 8, 13, 500, 5000))
        reader.feed_data(data[at : at + step])
        at += step
    reader.feed_eof()
    receiver = frames.BufferedFrameReceiver(reader)
    got = [(channel, frame) async for _, channel, frame in receiver]
    assert [c for c, _ in got] == [c for c, _ in sent]
    assert all(_same(g, s, c) for (c, g), (_, s) in zip(got, sent, strict=True))


async def test_a_connection_closed_mid_frame_is_a_connection_error() -> None:
    data, _ = _wire()
    reader = asyncio.StreamReader()
    reader.feed_data(data[:-3])
    reader.feed_eof()
    receiver = frames.BufferedFrameReceiver(reader)
    with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="unexpectedly closed"):
        async for _ in receiver:
            pass


async def test_a_broken_frame_end_is_an_invalid_frame() -> None:
    data = bytearray(pamqp.frame.marshal(spec.Basic.Ack(7), 1))
    data[-1] = 0
    reader = asyncio.StreamReader()
    reader.feed_data(bytes(data))
    reader.feed_eof()
    with pytest.raises(aiormq.exceptions.InvalidFrameError):
        await frames.BufferedFrameReceiver(reader).get_frame()


async def test_direct_deliveries_arrive_whole_and_a_closing_channel_says_so(broker: Broker) -> None:
    """On the real broker: bodies of several frames (larger than frame_max) reach a direct
    consumer intact and in order, and closing the channel calls ``on_close`` once."""
    frames.install()
    queue = unique("frames")
    bodies = [bytes([i]) * size for i, size in enumerate((0, 1, 4095, 131_073, 400_000))]
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, auto_delete=True)
        for body in bodies:
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
        transport = connection.transport
        assert transport is not None
        raw = await transport.connection.channel()
        closed: list[int] = []
        direct = frames.deliver_directly(raw, lambda: closed.append(1))
        assert direct is not None
        got: list[bytes] = []
        direct["direct-1"] = lambda m: got.append(m.body)  # a plain callback, no task

        async def wrapped(message: object) -> None:  # aiormq's path: must not be taken
            raise AssertionError("the direct consumer's delivery went through aiormq's task")

        await raw.basic_consume(queue, wrapped, no_ack=True, consumer_tag="direct-1")
        await wait_for(lambda: len(got) == len(bodies), 10, "every delivery")
        assert got == bodies
        await raw.close()
        await wait_for(lambda: closed == [1], 5, "on_close")
    finally:
        await connection.close()
