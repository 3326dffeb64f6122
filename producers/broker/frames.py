"""The reading side below aiormq's public API: frames off the socket in bulk, deliveries
handed to the consumer without a wrapper task (``producers.broker.adapter`` is the writing side).

aiormq's frame reader makes three ``readexactly`` calls per frame (type, header, payload),
each through a ``BytesIO`` and an ``asyncio.Lock``; a delivery is three frames (method,
content header, body), so a worker draining small jobs spends a large share of its CPU on
that bookkeeping rather than on the frames. ``BufferedFrameReceiver`` reads what the socket
has (up to ``CHUNK`` bytes at once) and cuts every whole frame out of it without awaiting
again; decoding stays pamqp's (``pamqp.frame.unmarshal``), and every error is raised as the
same aiormq exception the stock reader raises, so connection handling above is unchanged.

It replaces ``aiormq.connection.FrameReceiver`` (the one name aiormq's ``Connection.connect``
looks up) when ``install()`` finds aiormq's reader with the expected shape; otherwise the stock
reader stays.

``deliver_directly`` is the consuming channel's other per-delivery cost: aiormq reads a
delivery's body through a ``BytesIO`` and runs every consumer callback as a task wrapped in its
``TaskWrapper`` and ``FutureStore`` (two closures and several done callbacks per delivery). On
a channel where it is installed, a consumer registered as *direct* is a plain callback that
makes its own task (the worker's ``Pipeline.start``), and the channel's close is reported to
``on_close`` (which cancels those tasks, as aiormq's store would have) as soon as aiormq
marks the channel closed. Any other consumer still runs as aiormq runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import aiormq.connection
import pamqp.frame
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

CHUNK: Final = 256 * 1024
# type (1), channel (2), payload size (4); a frame then ends with 0xCE after its payload.
_HEADER: Final = 7
_STOCK: Final = aiormq.connection.FrameReceiver


class BufferedFrameReceiver(_STOCK):  # type: ignore[misc, valid-type]
    """aiormq's ``FrameReceiver`` contract (``get_frame`` / async iteration of ``(weight,
    channel, frame)``) over one buffer: a frame already read is returned without a read."""

    started: bool

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = b""
        self._at = 0

    async def get_frame(self) -> Any:
        while True:
            frame = self._cut()
            if frame is not None:
                return frame
            await self._fill()

    def _cut(self) -> Any:
        """The next whole frame in the buffer, decoded; ``None`` if it is not all here."""
        buffer, at = self._buffer, self._at
        available = len(buffer) - at
        if available < _HEADER:
            return None
        if not self.started:
            if buffer.startswith(b"AMQP", at):
                raise aiormq.exceptions.ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        size = int.from_bytes(buffer[at + 3 : at + 7], "big")
        end = at + _HEADER + size + 1
        if end > len(buffer):
            return None
        self._at = end
        try:
            return pamqp.frame.unmarshal(buffer[at:end])
        except PAMQPException as exc:
            raise InvalidFrameError(str(exc)) from exc

    async def _fill(self) -> None:
        """Read what the socket has; keep the unread tail of the buffer in front of it."""
        reader = self.reader
        if reader is None:
            raise AMQPConnectionError()
        try:
            data = await reader.read(CHUNK)
        except ConnectionRefusedError as exc:
            raise AMQPConnectionError(f"Server connection refused: {exc!r}") from exc
        except ConnectionResetError as exc:
            raise AMQPConnectionError(f"Server connection reset: {exc!r}") from exc
        except ConnectionError as exc:
            raise AMQPConnectionError(f"Server connection error: {exc!r}") from exc
        except OSError as exc:
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
        tail = self._buffer[self._at :]
        if not data:
            if tail:
                raise AMQPConnectionError(
                    "Server connection unexpectedly closed. "
                    f"Read {len(tail)} bytes of an unfinished frame"
                )
            del self.reader
            raise StopAsyncIteration
        self._buffer = tail + data if tail else data
        self._at = 0


def _has_started() -> bool:
    try:
        probe = _STOCK(asyncio.StreamReader())
    except Exception:
        return False
    return hasattr(probe, "started") and hasattr(probe, "reader")


def install() -> bool:
    """Use the buffered reader for every connection opened from now on; false if aiormq's
    reader does not have the shape this relies on (the stock one stays)."""
    if aiormq.connection.FrameReceiver is BufferedFrameReceiver:
        return True
    if not _has_started():
        return False
    aiormq.connection.FrameReceiver = BufferedFrameReceiver  # type: ignore[misc]
    return True


def deliver_directly(
    channel: Any, on_close: Callable[[], None]
) -> dict[str, Callable[[DeliveredMessage], None]] | None:
    """Deliveries on ``channel`` reach their consumers without aiormq's task wrapper (see the
    module docstring); ``on_close`` runs as soon as the channel closes, before aiormq would
    have cancelled consumer tasks.

    Returns the map to put a consumer tag's *plain* callback in (it makes its own task) before
    ``basic_consume(..., consumer_tag=tag)`` is called with a coroutine callback for the same
    tag: aiormq keeps that one (it wraps every callback into a coroutine function) and it runs
    only for a tag missing from the map. ``None`` (nothing changed) if the channel lacks what
    this relies on: the caller then consumes as usual."""
    get_frame = getattr(channel, "_get_frame", None)
    closing = getattr(channel, "_closing", None)
    if (
        not callable(get_frame)
        or not asyncio.isfuture(closing)
        or not isinstance(getattr(channel, "consumers", None), dict)
        or not callable(getattr(channel, "_on_deliver_frame", None))
        or not callable(getattr(channel, "create_task", None))
    ):
        return None
    consumers: dict[str, Any] = channel.consumers
    direct: dict[str, Callable[[DeliveredMessage], None]] = {}

    async def on_deliver(frame: Any) -> None:
        header = await get_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"Unexpected frame {header!r} instead of ContentHeader", header)
        size = header.body_size or 0
        body = b""
        while len(body) < size:
            content = await get_frame()
            if not isinstance(content, ContentBody):
                raise ValueError(f"Unexpected frame {content!r} instead of ContentBody", content)
            body += content.value
        tag = frame.consumer_tag
        message = DeliveredMessage(delivery=frame, header=header, body=body, channel=channel)
        plain = direct.get(tag)
        if plain is not None:
            plain(message)
        elif (consumer := consumers.get(tag)) is not None:  # run it the way aiormq does
            channel.create_task(consumer(message))

    channel._on_deliver_frame = on_deliver
    closing.add_done_callback(lambda _: on_close())
    return direct
