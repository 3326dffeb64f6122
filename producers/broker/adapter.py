"""The one module that reaches below aio-pika's and aiormq's public API, and what it relies on.

Two things need more than those libraries offer:

* **Writing a confirmed batch as bytes** (``producers.batch`` says why it pays). aiormq has no
  public call for "these frames, these delivery tags": its ``basic_publish`` marshals three
  frames, takes the channel lock and makes a future per message. So a batch uses five of an
  ``aiormq.Channel``'s internals, all here: ``delivery_tag`` (the last tag taken; the broker
  numbers publishes in the order their frames arrive), ``confirmations`` (tag → what the reader
  settles on an ack, nack or return), ``message_id_delivery_tag`` (how the reader finds the tag
  of a returned message), ``write_queue`` (the connection's writer) and the lock behind
  ``channel.lock`` (``_Channel__lock``, name-mangled). Tags are taken exactly as aiormq's own
  publish takes them, so a ``basic_publish`` on the same channel gets the next ones.
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
    """The outcome of each message of one write, and the one future its caller waits on.

    ``outcome[i]`` is ``None`` until message ``i`` is settled, then ``ACK``, the aiormq error
    (``DeliveryError``: nacked; ``PublishError``: returned) or the returned message. The future
    is the channel's, so a closing channel rejects it.
    """

    __slots__ = ("abandoned", "future", "outcome", "pending")

    def __init__(self, channel: aiormq.abc.AbstractChannel, size: int) -> None:
        self.outcome: list[Any] = [None] * size
        self.pending = size
        self.future: asyncio.Future[None] = channel.create_future()
        self.abandoned = False

    def settle(self, index: int, result: Any) -> None:
        if self.outcome[index] is not None:
            return
        self.outcome[index] = result
        self.pending -= 1
        if not self.pending and not self.future.done():
            self.future.set_result(None)

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
    """Whether ``channel`` has the aiormq internals ``send_now``/``send`` rely on; if not,
    publish through ``publish_each`` (warned once per process)."""
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


def send_now(
    channel: aiormq.Channel, payload: bytes, ids: Sequence[str], confirms: Confirms
) -> int:
    """Take the batch's delivery tags and hand ``payload`` to the writer without the channel
    lock when that is safe: the first tag, or 0 if it is not (then ``await send``).

    Safe when nobody holds the lock and the writer's queue has room: tags taken and frames
    queued with no await between them is all the lock guarantees (no other publish's tags or
    frames between ours). The common case; the lock costs a coroutine a batch.
    """
    queue: asyncio.Queue[Any] = channel.write_queue
    bare_lock: asyncio.Lock = getattr(channel, _LOCK)
    if bare_lock.locked() or queue.full():
        return 0
    if channel.is_closed:  # as `channel.lock` refuses a closed channel
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    first_tag = _reserve(channel, ids, confirms)
    queue.put_nowait(aiormq.abc.ChannelFrame(payload=payload, should_close=False))
    return first_tag


async def send(
    channel: aiormq.Channel, payload: bytes, ids: Sequence[str], confirms: Confirms
) -> int:
    """``send_now`` under the channel lock, as aiormq's publish does: the first tag."""
    async with channel.lock:
        first_tag = _reserve(channel, ids, confirms)
        try:
            await channel.write_queue.put(
                aiormq.abc.ChannelFrame(payload=payload, should_close=False)
            )
        except BaseException:
            # Not handed to the writer: the broker never saw these tags; give them back while
            # still holding the lock, as aiormq does for its publishes.
            channel.delivery_tag -= len(ids)
            release(channel, ids, first_tag, confirmations_too=True)
            raise
    return first_tag


def _reserve(channel: aiormq.Channel, ids: Sequence[str], confirms: Confirms) -> int:
    """Take ``len(ids)`` tags as aiormq would and register a slot per tag; the first tag."""
    first_tag: int = channel.delivery_tag + 1
    confirmations = channel.confirmations
    by_id = channel.message_id_delivery_tag
    for index, message_id in enumerate(ids):
        confirmations[first_tag + index] = _Slot(confirms, index)  # type: ignore[assignment]
        by_id[message_id] = first_tag + index
    channel.delivery_tag += len(ids)
    return first_tag


def release(
    channel: aiormq.Channel, ids: Sequence[str], first_tag: int, *, confirmations_too: bool = False
) -> None:
    """Drop the batch's entries from aiormq's maps (those still pointing at our tags).

    Confirmations stay once the batch was sent: a late ack pops its own entry, and an entry must
    be there for aiormq to accept an ack (it logs an error for an unknown tag).
    """
    by_id = channel.message_id_delivery_tag
    for index, message_id in enumerate(ids):
        tag = first_tag + index
        if by_id.get(message_id) == tag:
            del by_id[message_id]
        if confirmations_too:
            channel.confirmations.pop(tag, None)


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
