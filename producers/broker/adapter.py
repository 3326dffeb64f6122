"""The one module that reaches below aio-pika's and aiormq's public API, and what it relies on.

Two things need more than those libraries offer:

* **Writing confirmed batches as bytes** (``producers.broker.batch`` says why it pays). aiormq
  has no public call for "these frames, these delivery tags": its ``basic_publish`` marshals
  three frames, takes the channel lock and makes a future per message. So the ``Outbox`` (the
  batches of one loop turn in one write) uses five of an ``aiormq.Channel``'s internals, all
  here: ``delivery_tag`` (the last tag taken; the broker numbers publishes in the order their
  frames arrive), ``confirmations`` (tag → what the reader settles on an ack, nack or return),
  ``message_id_delivery_tag`` (how the reader finds the tag of a returned message),
  ``write_queue`` (the connection's writer) and the lock behind ``channel.lock``
  (``_Channel__lock``, name-mangled). Tags are taken exactly as aiormq's own publish takes them,
  so a ``basic_publish`` on the same channel gets the next ones.
* **Failing over to the next node on every reconnect attempt**: aio-pika's ``RobustConnection``
  has no hook for it; its private ``__connect_transport`` (``_RobustConnection__connect_transport``)
  is the one place every attempt passes through.

When an internal is missing or of another type (a new aiormq renamed it), ``frames_supported``
says no and the batch publishes each message through the public ``channel.basic_publish``
(``publish_each``): slower, with the same outcomes and errors. That is logged once per process,
at warning level, as is a missing reconnect hook (the connection then reconnects to the same
node, as plain aio-pika does). Both are run against the floor and the newest aiormq
(``tests/producers/test_amqp_adapter.py``, also in ``scripts/floors.sh``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, TypeGuard

import aiormq
import aiormq.abc
import aiormq.exceptions
import structlog
from aio_pika.robust_connection import RobustConnection
from pamqp.commands import Basic

log = structlog.get_logger("leveret.amqp")

ACK: Final = "ack"
"""A message's outcome once the broker acked it (else the aiormq error, or the returned
message on a channel without ``on_return_raises``)."""

_LOCK = "_Channel__lock"
# The internals a frames write needs, with the type each must have.
_INTERNALS: Final = (
    ("write_queue", asyncio.Queue),
    ("delivery_tag", int),
    ("confirmations", dict),
    ("message_id_delivery_tag", dict),
    (_LOCK, asyncio.Lock),
)
_TRANSPORT_HOOK = "_RobustConnection__connect_transport"
_warned: set[str] = set()


def _warn_once(event: str, **fields: object) -> None:
    if event not in _warned:
        _warned.add(event)
        log.warning(event, **fields)


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:  # pragma: no cover - a vendored copy
        return "unknown"


# -- confirms ------------------------------------------------------------------------------------


class Confirms:
    """The outcome of each message of one ``publish_batch`` call, and the one future its caller
    waits on.

    ``outcome[i]`` is ``None`` until message ``i`` is settled, then ``ACK``, the aiormq error
    (``DeliveryError``: nacked; ``PublishError``: returned) or the returned message. The future
    is a plain one of the loop: what a closing channel does to it is the ``Outbox``'s business
    (one channel future per channel instead of one per call), and ``expire`` is the caller's
    timer. ``first_tag`` is the delivery tag of message 0 once the messages were handed to the
    writer (0 until then); ``sent`` says whether they may have been (``False``: none was).
    """

    __slots__ = ("abandoned", "first_tag", "future", "outcome", "pending", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.outcome: list[Any] = [None] * size
        self.pending = size
        self.future: asyncio.Future[None] = loop.create_future()
        self.abandoned = False
        self.first_tag = 0
        self.sent = False

    def settle(self, index: int, result: Any) -> None:
        if self.outcome[index] is not None:
            return
        self.outcome[index] = result
        self.pending -= 1
        if not self.pending and not self.future.done():
            self.future.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """Stop the wait with ``exc`` (the channel closed, or the time ran out)."""
        if not self.future.done() and not self.abandoned:
            self.future.set_exception(exc)

    def expire(self) -> None:
        """The caller's deadline passed (``loop.call_at``): its wait ends with a TimeoutError."""
        self.fail(TimeoutError())

    def all_acked(self) -> bool:
        return self.pending == 0 and all(o is ACK for o in self.outcome)


class _Slot:
    """One message's entry in aiormq's ``confirmations``: the part of the future API its reader
    calls (``done``, ``cancelled``: a confirm nobody waits for is logged at debug level;
    ``set_result`` with the ack frame or the returned message; ``set_exception`` with
    ``DeliveryError`` or ``PublishError``). One future per batch instead of one per message."""

    __slots__ = ("confirms", "index")

    def __init__(self, confirms: Confirms, index: int) -> None:
        self.confirms = confirms
        self.index = index

    def done(self) -> bool:
        return self.confirms.abandoned or self.confirms.outcome[self.index] is not None

    def cancelled(self) -> bool:
        return self.confirms.abandoned

    def set_result(self, result: Any) -> None:
        self.confirms.settle(self.index, ACK if isinstance(result, Basic.Ack) else result)

    def set_exception(self, exc: BaseException) -> None:
        self.confirms.settle(self.index, exc)


# -- what a channel is --------------------------------------------------------------------------

# A content body frame's largest payload when the channel does not say (AMQP's 131,072-byte
# frame_max, RabbitMQ's default, less the 8 bytes of a body frame's framing).
_DEFAULT_CONTENT_SIZE = 131_064


def confirming(channel: aiormq.abc.AbstractChannel) -> bool:
    """Whether ``channel`` was opened with publisher confirms."""
    return bool(getattr(channel, "publisher_confirms", False))


def content_size(channel: aiormq.abc.AbstractChannel) -> int:
    """The largest body frame payload on ``channel`` (a bigger body is split)."""
    size = getattr(channel, "max_content_size", None)
    return size if isinstance(size, int) and size > 0 else _DEFAULT_CONTENT_SIZE


# -- the frames path -----------------------------------------------------------------------------


def frames_supported(channel: aiormq.abc.AbstractChannel) -> TypeGuard[aiormq.Channel]:
    """Whether ``channel`` has the aiormq internals the ``Outbox`` relies on; if not, publish
    through ``publish_each`` (warned once per process)."""
    if isinstance(channel, aiormq.Channel) and all(
        isinstance(getattr(channel, name, None), kind) for name, kind in _INTERNALS
    ):
        return True
    missing = [n for n, k in _INTERNALS if not isinstance(getattr(channel, n, None), k)]
    _warn_once(
        "amqp_frames_path_unavailable",
        channel=type(channel).__qualname__,
        aiormq=_version("aiormq"),
        missing=missing,
        action="publishing one basic_publish per message (correct, slower); report this "
        "aiormq version to Leveret",
    )
    return False


# One batch handed to the outbox: its frames, its messages' ids, its confirms.
_Entry = tuple[list[bytes], Sequence[str], Confirms]


class Outbox:
    """A channel's batches handed over during one loop turn, written to the socket as one.

    ``add`` only queues a batch's frames; a callback at the end of the loop turn (``call_soon``)
    takes the delivery tags of every batch still wanted, in order, and hands all their frames to
    aiormq's writer as one ``ChannelFrame``, with no await in between, so no other publish's tags
    or frames come between (what aiormq's channel lock guarantees, and all it guarantees). When
    somebody holds that lock or the writer's queue is full, the same is done under the lock by a
    task. A thousand concurrent ``publish`` calls thus cost one socket write per loop turn
    instead of one each, and no lock round trip each.

    One channel future (``watch``) per channel stands for all the waits: when the channel closes
    aiormq rejects it, and every batch still waiting fails with that error. A batch its caller
    gave up on before the write (``abandoned``: timed out, cancelled) is never sent.

    Holds no reference to its channel (it is the value of a weak mapping keyed by the channel).
    """

    __slots__ = ("_entries", "_loop", "_scheduled", "_tasks", "_waiting", "_watch")

    def __init__(self, channel: aiormq.Channel) -> None:
        self._loop = channel.loop
        self._entries: list[_Entry] = []
        self._scheduled = False
        self._waiting: dict[Confirms, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Future[None] = channel.create_future()
        self._watch.add_done_callback(self._closed)

    def add(
        self, channel: aiormq.Channel, parts: list[bytes], ids: Sequence[str], confirms: Confirms
    ) -> None:
        """Queue a batch's frames for this loop turn's write; ``confirms`` settles as its
        messages are confirmed, or fails (the channel closed: with that error)."""
        self._waiting[confirms] = None
        if self._watch.done():
            confirms.fail(_closed_error(self._watch))
            return
        self._entries.append((parts, ids, confirms))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush, channel)

    def release(self, channel: aiormq.Channel, ids: Sequence[str], confirms: Confirms) -> None:
        """The caller stopped waiting (settled, failed or gave up): forget its batch.

        ``message_id_delivery_tag`` entries still pointing at its tags are dropped; its
        ``confirmations`` stay (a late ack pops its own entry, and aiormq logs an error for an
        ack of a tag it does not know)."""
        del self._waiting[confirms]
        first_tag = confirms.first_tag
        if first_tag:
            by_id = channel.message_id_delivery_tag
            for index, message_id in enumerate(ids):
                if by_id.get(message_id) == first_tag + index:
                    del by_id[message_id]

    def _flush(self, channel: aiormq.Channel) -> None:
        self._scheduled = False
        entries = [entry for entry in self._entries if not entry[2].abandoned]
        self._entries = []
        if not entries:
            return
        if channel.is_closed:  # as `channel.lock` refuses a closed channel
            error = aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
            for _, _, confirms in entries:
                confirms.fail(error)
            return
        queue: asyncio.Queue[Any] = channel.write_queue
        if getattr(channel, _LOCK).locked() or queue.full():
            task = self._loop.create_task(self._write_locked(channel, entries))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        queue.put_nowait(_frame(channel, entries))

    async def _write_locked(self, channel: aiormq.Channel, entries: list[_Entry]) -> None:
        """``_flush`` under the channel lock, as aiormq's publish does."""
        try:
            async with channel.lock:
                entries = [entry for entry in entries if not entry[2].abandoned]
                if not entries:
                    return
                before = channel.delivery_tag
                frame = _frame(channel, entries)
                try:
                    await channel.write_queue.put(frame)
                except BaseException:
                    # Not handed to the writer: the broker never saw these tags; give them back
                    # while still holding the lock, as aiormq does for its publishes.
                    by_id = channel.message_id_delivery_tag
                    for _, ids, confirms in entries:
                        for index, message_id in enumerate(ids):
                            tag = confirms.first_tag + index
                            channel.confirmations.pop(tag, None)
                            if by_id.get(message_id) == tag:
                                del by_id[message_id]
                        confirms.first_tag = 0
                        confirms.sent = False
                    channel.delivery_tag = before
                    raise
        except Exception as exc:  # the channel closed while we waited for its lock
            for _, _, confirms in entries:
                confirms.fail(exc)
        except BaseException:
            error = ConnectionResetError("the channel closed")
            for _, _, confirms in entries:
                confirms.fail(error)
            raise

    def _closed(self, watch: asyncio.Future[None]) -> None:
        error = _closed_error(watch)
        for confirms in list(self._waiting):
            confirms.fail(error)


def _closed_error(watch: asyncio.Future[None]) -> BaseException:
    """What a closed channel's waits fail with: the error aiormq rejected its futures with."""
    exc = None if watch.cancelled() else watch.exception()
    return exc if isinstance(exc, Exception) else ConnectionResetError("the channel closed")


def _frame(channel: aiormq.Channel, entries: list[_Entry]) -> aiormq.abc.ChannelFrame:
    """Take the entries' delivery tags as aiormq would (a slot per tag) and make their frames
    one ``ChannelFrame``; the caller hands it to the writer with no await in between."""
    confirmations = channel.confirmations
    by_id = channel.message_id_delivery_tag
    tag = channel.delivery_tag
    payload: list[bytes] = []
    for parts, ids, confirms in entries:
        confirms.first_tag = tag + 1
        confirms.sent = True
        for index, message_id in enumerate(ids):
            tag += 1
            confirmations[tag] = _Slot(confirms, index)  # type: ignore[assignment]
            by_id[message_id] = tag
        payload += parts
    channel.delivery_tag = tag
    return aiormq.abc.ChannelFrame(payload=b"".join(payload), should_close=False)


# -- the public-API path -------------------------------------------------------------------------


def publish_each(
    channel: aiormq.abc.AbstractChannel,
    messages: Sequence[tuple[bytes, str, str, Basic.Properties, bool]],
    confirms: Confirms,
) -> list[asyncio.Task[None]]:
    """Publish each ``(body, exchange, routing_key, properties, mandatory)`` through aiormq's
    public ``basic_publish``, in order, settling ``confirms`` as each one's confirm arrives.

    Returns the tasks (one per message; cancel those still running when the caller stops
    waiting). The fallback when ``frames_supported`` is false.
    """

    async def one(index: int, message: tuple[bytes, str, str, Basic.Properties, bool]) -> None:
        body, exchange, routing_key, properties, mandatory = message
        try:
            result = await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                # The confirm comes after the frame anyway; waiting for the drain would hold
                # aiormq's channel lock through it and serialise the publishes.
                wait=False,
            )  # type: ignore[call-arg]  # aiormq's AbstractChannel omits the Channel's `wait`
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            confirms.settle(index, exc)
            return
        confirms.settle(index, ACK if isinstance(result, Basic.Ack) else result)

    confirms.sent = True  # as good as: the tasks start at once
    loop = asyncio.get_running_loop()
    # Tasks start in creation order, so the publishes take aiormq's lock (and tags) in order.
    return [loop.create_task(one(i, m)) for i, m in enumerate(messages)]


# -- failover ------------------------------------------------------------------------------------


def transport_hook_supported() -> bool:
    """Whether aio-pika's robust connection has the per-attempt hook ``ReconnectHook`` uses."""
    return callable(getattr(RobustConnection, _TRANSPORT_HOOK, None))


class ReconnectHook(RobustConnection):
    """aio-pika's robust connection calling ``before_attempt`` before every transport attempt
    (the first and each reconnect) and ``after_attempt`` after each that connected.

    Without the hook in the installed aio-pika (``transport_hook_supported``) neither is called
    and a warning is logged once at connect: reconnects then go to the same URL, as plain
    aio-pika's do (``tests/producers/test_multi_url.py`` fails first).
    """

    def before_attempt(self) -> None:
        """Called before each transport attempt; may change ``self.url``."""

    def after_attempt(self) -> None:
        """Called after each transport attempt that connected."""

    async def connect(self, timeout: aiormq.abc.TimeoutType = None) -> None:
        if not transport_hook_supported():
            _warn_once(
                "amqp_reconnect_hook_unavailable",
                aio_pika=_version("aio-pika"),
                action="reconnects go to the same node; report this aio-pika version to Leveret",
            )
        await super().connect(timeout)

    async def _RobustConnection__connect_transport(self) -> None:
        self.before_attempt()
        await _connect_transport(self)
        self.after_attempt()


async def _no_hook(connection: RobustConnection) -> None:  # pragma: no cover - never called
    raise RuntimeError("aio-pika's robust connection has no transport hook")


# aio-pika's own attempt, which the override above wraps (only called when it exists).
_connect_transport: Callable[[RobustConnection], Awaitable[None]] = getattr(
    RobustConnection, _TRANSPORT_HOOK, _no_hook
)
