"""``publish_batch``: the one confirmed publish. A batch's confirms are tracked by delivery tag;
a single publish (``confirm.publish_confirmed``, ``Publisher.publish``) is a batch of one, with
the same error mapping, and the batches handed over in one loop turn share one socket write.

Why this goes below aiormq's ``basic_publish``: per message, that call validates and marshals
three frames through pamqp (the content header alone ~25 µs: every property is checked and
encoded again, though a batch's jobs differ only in ``message_id``), takes the channel lock,
creates a confirmation future and a queue entry for the writer, and the writer makes one socket
write of it. For pipelined publishes that is most of the publisher's CPU. Here:

* Frames are marshalled from templates. ``basic.publish`` is marshalled once per route. The
  content header is marshalled once per set of properties *other than* what varies per job
  (``message_id``, the body size, a ``datetime`` ``timestamp`` and every 64-bit integer header
  value, such as ``x-published-at``; and per id length), with a placeholder in each of those
  holes; each job then splices its own values into the template's bytes. The first job of each
  template is checked byte for byte against pamqp's own marshalling, and a template that does
  not match is never used (pamqp marshals that group per job): a template can only ever be a
  cheaper way to the same bytes. Templates are kept per channel across batches (a worker
  settling a few jobs per loop turn sends many small batches, and building a template costs
  three pamqp marshals), a bounded number of them.
* A batch's frames go to the channel's outbox (``adapter.Outbox``): at the end of the loop
  turn, every batch handed over in it takes its delivery tags, in order, and all their frames
  go to aiormq's writer as one write. One future per *call* wakes its caller instead of one per
  job, and a closing channel fails them all through one channel future. How that is done with
  aiormq's channel (its internals) is ``producers.broker.adapter``'s business and no one
  else's; when the installed aiormq lacks what it relies on, each job goes through the public
  ``basic_publish`` instead, slower, with the same outcomes.
* Timeouts are kept per channel on a 10 ms grid (``_Deadlines``): one loop timer per 10 ms of
  deadlines instead of one per call; a wait ends at most 10 ms after its deadline.

The guarantee, per job: every job is confirmed, or ``BatchPublishError`` names it, with the typed
error of each job that was not confirmed (``UnroutableError``, ``RefusedError``,
``PublishTimeout``, ``ConnectionLost``, and ``InvalidMessageError`` for a message AMQP cannot
carry, which fails only itself) and the ids that did land.
"""

from __future__ import annotations

import asyncio
import math
import struct
import weakref
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import aiormq
import aiormq.abc
import aiormq.exceptions
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from leveret.producers.broker import adapter as amqp
from leveret.producers.broker.connection import CONNECTION_ERRORS
from leveret.producers.errors import (
    ConnectionLost,
    InvalidMessageError,
    PublishError,
    PublishTimeout,
    RefusedError,
    UnroutableError,
)
from leveret.producers.wire.message import check_message

_FRAME_END = b"\xce"
_BODY_FRAME = struct.Struct(">BHI")  # type 3, channel, size
_BODY_SIZE = struct.Struct(">Q")
_HEADER_SIZE_AT = 11  # frame type 1 + channel 2 + size 4 + class id 2 + weight 2
# Per channel, at most this many routes and header templates are kept (then forgotten at once and
# rebuilt as needed): a worker's copies have a few routes and property sets per queue and job.
_KEPT = 512
# What a closing channel or connection raises at a waiting batch.
_FAILURES: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError)


class Outgoing(Protocol):
    """One job ready to send (``Publisher``'s prepared job has these attributes)."""

    @property
    def job(self) -> str: ...
    @property
    def job_id(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def properties(self) -> Basic.Properties: ...
    @property
    def exchange(self) -> str: ...
    @property
    def routing_key(self) -> str: ...


class BatchPublishError(PublishError):
    """Some jobs of a batch were not confirmed; ``errors`` names each, ``landed`` the others.

    ``errors`` maps each job id that was not confirmed to its own typed error (an
    ``UnroutableError``, ``RefusedError``, ``PublishTimeout`` or ``ConnectionLost``), in batch
    order; the ids in ``landed`` were confirmed by the broker and are queued. A
    ``PublishTimeout`` or ``ConnectionLost`` job may or may not be queued: publish it again
    (with the same id if the handler must not run twice).
    """

    def __init__(self, landed: list[str], errors: dict[str, PublishError]) -> None:
        self.landed = landed
        self.errors = errors
        first_id, first = next(iter(errors.items()))
        ids = list(errors)
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(
            first.job,
            f"{len(ids)} of {len(ids) + len(landed)} jobs in the batch were not confirmed "
            f"({shown}); the first, {first_id}: {first}. The other {len(landed)} are queued "
            f"(`landed`); each failed id's error is in `errors`",
        )


class _Marshaller:
    """The batch's frames as bytes, from templates kept per channel (see the module docstring);
    also what the batch needs to know of its channel, found once per channel."""

    def __init__(
        self,
        channel_number: int,
        max_content_size: int,
        channel: aiormq.abc.AbstractChannel | None = None,
    ) -> None:
        self.channel_number = channel_number
        self.max_content_size = max_content_size
        self.publish_frames: dict[tuple[str, str, bool], bytes] = {}
        # (properties but the spliced fields, id length) -> template, or None: no template
        self.templates: dict[Hashable, _Template | None] = {}
        self.confirming = channel is not None and amqp.confirming(channel)
        self.deadlines = _Deadlines()
        # The channel's outbox when it has what the frames path needs, else None (publish_each).
        self.outbox: amqp.Outbox | None = None
        if channel is not None and self.confirming and amqp.frames_supported(channel):
            self.outbox = amqp.Outbox(channel)

    @classmethod
    def of(cls, channel: aiormq.abc.AbstractChannel) -> _Marshaller:
        """The channel's marshaller, kept across batches (its templates are the point)."""
        found = _MARSHALLERS.get(channel)
        if found is None or found.channel_number != channel.number:
            found = _MARSHALLERS[channel] = cls(channel.number, amqp.content_size(channel), channel)
        return found

    def frames(self, item: Outgoing, parts: list[bytes]) -> None:
        # Jobs are mandatory (a job no queue takes is an error); an item may say otherwise
        # (the worker's lifecycle events: nobody need be bound to the events exchange).
        mandatory: bool = getattr(item, "mandatory", True)
        route = (item.exchange, item.routing_key, mandatory)
        publish = self.publish_frames.get(route)
        if publish is None:
            if len(self.publish_frames) >= _KEPT:
                self.publish_frames.clear()
            publish = self.publish_frames[route] = pamqp_frame.marshal(
                Basic.Publish(
                    exchange=item.exchange, routing_key=item.routing_key, mandatory=mandatory
                ),
                self.channel_number,
            )
        parts.append(publish)
        body = item.body
        self.header_into(parts, item.properties, len(body))
        if not body:
            return
        step = self.max_content_size
        if len(body) <= step:
            parts += (_BODY_FRAME.pack(3, self.channel_number, len(body)), body, _FRAME_END)
            return
        for start in range(0, len(body), step):
            chunk = body[start : start + step]
            parts += (_BODY_FRAME.pack(3, self.channel_number, len(chunk)), chunk, _FRAME_END)

    def header(self, props: Basic.Properties, body_size: int) -> bytes:
        """The content header frame's bytes (what ``frames`` writes)."""
        parts: list[bytes] = []
        self.header_into(parts, props, body_size)
        return b"".join(parts)

    def header_into(self, parts: list[bytes], props: Basic.Properties, body_size: int) -> None:
        message_id = props.message_id
        assert message_id is not None  # checked by publish_batch
        id_bytes = message_id.encode()
        key = _template_key(props, len(id_bytes))
        if key is None:
            parts.append(self._marshal(props, body_size))
            return
        template = self.templates.get(key, _UNKNOWN)
        if template is _UNKNOWN:
            if len(self.templates) >= _KEPT:
                self.templates.clear()
            template = _Template.build(self._marshal, props, len(id_bytes))
            if template is not None:
                made: list[bytes] = []
                template.fill(made, props, body_size, id_bytes)
                if b"".join(made) != self._marshal(props, body_size):
                    template = None  # never trusted unless it gives pamqp's bytes exactly
            self.templates[key] = template
        if template is None:
            parts.append(self._marshal(props, body_size))
            return
        template.fill(parts, props, body_size, id_bytes)

    def _marshal(self, props: Basic.Properties, body_size: int) -> bytes:
        return pamqp_frame.marshal(ContentHeader(0, body_size, props), self.channel_number)


_MARSHALLERS: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, _Marshaller] = (
    weakref.WeakKeyDictionary()
)

# The holes of a template besides the header values (those are named by their header key).
_SIZE_HOLE = 0
_ID_HOLE = 1
_STAMP_HOLE = 2
# Placeholders a template is marshalled with, to find where each value goes (each must occur
# once in the marshalled bytes; the first job's bytes are then compared with pamqp's anyway).
_STAMP_MARK = 0x7E5A3C1D
_LONG_MARK = 0x7E5A3C1D2B190000
_LONG = struct.Struct(">q")
_STAMP = struct.Struct(">Q")
# The integers pamqp marshals as a 64-bit table value ('l'): outside both 32-bit ranges.
_INT32_MIN, _UINT32_MAX = -(2**31), 2**32 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UNKNOWN: Any = object()


def _is_long(value: object) -> bool:
    """Whether pamqp marshals this header value as a 64-bit integer (then its bytes are
    spliced: a per-job timestamp such as ``x-published-at`` does not make a template each)."""
    return (
        value.__class__ is int
        and (value > _UINT32_MAX or value < _INT32_MIN)
        and _INT64_MIN <= value <= _INT64_MAX
    )


def _stamp(value: datetime) -> int:
    """The ``timestamp`` property's seconds, as pamqp computes them (a naive time is UTC)."""
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())


class _Template:
    """A content header's bytes with holes: ``pieces[0]``, then each hole's bytes followed by
    the next piece. The holes: the body size, the message id, the ``timestamp`` (a datetime)
    and every 64-bit integer header value; everything else is in the template's key."""

    __slots__ = ("holes", "pieces")

    def __init__(self, pieces: list[bytes], holes: list[int | str]) -> None:
        self.pieces = pieces
        self.holes = holes

    @classmethod
    def build(
        cls, marshal: Callable[[Basic.Properties, int], bytes], props: Basic.Properties, id_len: int
    ) -> _Template | None:
        """From the properties marshalled with a placeholder in each hole; ``None`` when a
        placeholder cannot be found exactly once."""
        fields = _props_dict(props)
        fields["message_id"] = "\x7f" * id_len
        needles: list[tuple[bytes, int | str]] = [
            (bytes([id_len]) + fields["message_id"].encode(), _ID_HOLE)
        ]
        if isinstance(props.timestamp, datetime):
            fields["timestamp"] = datetime.fromtimestamp(_STAMP_MARK, UTC)
            needles.append((_STAMP.pack(_STAMP_MARK), _STAMP_HOLE))
        if props.headers:
            headers = dict(props.headers)
            for n, (name, value) in enumerate(props.headers.items()):
                if _is_long(value):
                    headers[name] = _LONG_MARK + n
                    needles.append((b"l" + _LONG.pack(_LONG_MARK + n), name))
            fields["headers"] = headers
        raw = marshal(Basic.Properties(**fields), 0)
        cuts: list[tuple[int, int, int | str]] = [
            (_HEADER_SIZE_AT, _HEADER_SIZE_AT + _BODY_SIZE.size, _SIZE_HOLE)
        ]
        for needle, hole in needles:
            at = raw.find(needle)
            if at < 0 or raw.find(needle, at + 1) >= 0:
                return None
            skip = 0 if hole == _STAMP_HOLE else 1  # the id's length, a value's type
            cuts.append((at + skip, at + len(needle), hole))
        cuts.sort()
        pieces: list[bytes] = []
        holes: list[int | str] = []
        last = 0
        for begin, end, hole in cuts:
            if begin < last:
                return None
            pieces.append(raw[last:begin])
            holes.append(hole)
            last = end
        pieces.append(raw[last:])
        return cls(pieces, holes)

    def fill(
        self, parts: list[bytes], props: Basic.Properties, body_size: int, id_bytes: bytes
    ) -> None:
        """Append the header's bytes for these properties (of this template's key) to
        ``parts``, piece by piece."""
        pieces = self.pieces
        parts.append(pieces[0])
        for n, hole in enumerate(self.holes, 1):
            if hole == _SIZE_HOLE:
                parts.append(_BODY_SIZE.pack(body_size))
            elif hole == _ID_HOLE:
                parts.append(id_bytes)
            elif hole == _STAMP_HOLE:
                parts.append(_STAMP.pack(_stamp(props.timestamp)))  # type: ignore[arg-type]
            else:
                parts.append(_LONG.pack(props.headers[hole]))  # type: ignore[index]
            parts.append(pieces[n])


_FIELDS = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
)


def _props_dict(props: Basic.Properties) -> dict[str, Any]:
    return {name: getattr(props, name) for name in _FIELDS}


def _template_key(props: Basic.Properties, id_len: int) -> Hashable | None:
    """Everything but the holes (``_Template``) that decides the header's bytes; ``None``: no
    template.

    Header values carry their type (``True`` and ``1`` are equal but marshal differently);
    a 64-bit integer value is a hole, so only its name and type are in the key; a header
    holding a nested table or array is not hashable and gets no template.
    """
    headers = props.headers
    timestamp = props.timestamp
    try:
        key = (
            id_len,
            props.content_type,
            props.content_encoding,
            tuple(
                (k, int, None) if _is_long(v) else (k, v.__class__, v) for k, v in headers.items()
            )
            if headers
            else None,
            props.delivery_mode,
            props.priority,
            props.correlation_id,
            props.reply_to,
            props.expiration,
            # A datetime is a hole; whether it is naive changes nothing (pamqp takes it as UTC).
            datetime if isinstance(timestamp, datetime) else timestamp,
            props.message_type,
            props.user_id,
            props.app_id,
            props.cluster_id,
        )
        hash(key)
    except TypeError:
        return None
    return key


async def publish_batch(
    channel: aiormq.abc.AbstractChannel, items: Sequence[Outgoing], *, timeout: float | None
) -> None:
    """Send ``items`` on ``channel`` and return once every one is confirmed.

    ``channel`` is an aiormq channel with publisher confirms on (``on_return_raises`` too, or a
    returned job is still reported, as unroutable). Every item needs a ``message_id`` unique
    within the batch and among other publishes in flight on the channel (a ``basic.return`` is
    matched to its job by it). Raises ``BatchPublishError`` naming each job that was not
    confirmed (see the module docstring); ``timeout`` bounds the wait for the whole batch. An
    item AMQP cannot carry (no ``message_id``, a string property over 255 bytes, a header value
    with no AMQP type) is not sent and is named with an ``InvalidMessageError``; the rest of
    the batch goes out as usual. On a channel without confirms nothing is sent: each job is a
    ``RefusedError`` (success could only be guessed).

    The frames of every batch handed over in one loop turn on one channel go out in one socket
    write (``adapter.Outbox``): concurrent single publishes are pipelined at the cost of one.
    """
    if not items:
        return
    marshaller = _Marshaller.of(channel)
    if not marshaller.confirming:
        raise BatchPublishError([], {item.job_id: _no_confirms(item) for item in items})
    # Each item is marshalled on its own: one AMQP cannot carry (an id over 255 bytes, a
    # header value with no AMQP type) fails only itself, and the others still go out. The
    # public path marshals again (its own way): the check is the same either way.
    outbox = marshaller.outbox  # None: the public path
    parts: list[bytes] = []
    sent: list[Outgoing] = []
    ids: list[str] = []
    refused: dict[int, PublishError] | None = None
    for index, item in enumerate(items):
        mark = len(parts)
        try:
            message_id = item.properties.message_id
            if not message_id:
                raise ValueError("it has no message_id (a return names its job by one)")
            marshaller.frames(item, parts)
        except Exception as exc:
            del parts[mark:]
            if refused is None:
                refused = {}
            refused[index] = _unencodable(item, exc)
            continue
        sent.append(item)
        ids.append(message_id)
    if not sent:
        assert refused is not None
        raise BatchPublishError([], {items[i].job_id: e for i, e in refused.items()})
    loop = asyncio.get_running_loop()
    confirms = amqp.Confirms(loop, len(sent))
    # The timeout bounds handing the batch to the writer and its confirms: it ends the wait
    # with a TimeoutError (``_Deadlines``: one timer per 10 ms, not a timeout context each).
    deadlines = marshaller.deadlines
    tick = None if timeout is None else deadlines.add(loop, confirms, loop.time() + timeout)
    each: list[asyncio.Task[None]] = []
    failure: BaseException | None = None
    try:
        if outbox is not None:
            outbox.add(channel, parts, ids, confirms)  # type: ignore[arg-type]
        else:
            each = amqp.publish_each(channel, [_message(i) for i in sent], confirms)
        await confirms.future
    except TimeoutError as exc:
        failure = exc
    except _FAILURES as exc:
        failure = exc
    finally:
        if tick is not None:
            deadlines.remove(confirms, tick)
        confirms.abandoned = confirms.pending > 0
        if outbox is not None:
            outbox.release(channel, ids, confirms)  # type: ignore[arg-type]
        for task in each:
            task.cancel()
    if refused is None and confirms.all_acked():
        return
    raise _unconfirmed(items, sent, refused or {}, confirms, failure, timeout)


# The timeouts of a channel's waits end on a 10 ms grid (never before their deadline).
_TICK_S = 0.01


class _Deadlines:
    """The timeouts of the waits on one channel, by the 10 ms tick they end on: one timer per
    tick instead of one per call (a loop timer costs more than the rest of a publish's wait).
    A wait ends at most ``_TICK_S`` after its deadline; one that ended is taken out at once."""

    __slots__ = ("ticks",)

    def __init__(self) -> None:
        self.ticks: dict[int, dict[amqp.Confirms, None]] = {}

    def add(
        self, loop: asyncio.AbstractEventLoop, confirms: amqp.Confirms, deadline: float
    ) -> int | None:
        """Fail ``confirms`` with a TimeoutError once ``deadline`` passed; the tick to
        ``remove`` it from (``None``: the deadline has passed, the wait ends at once)."""
        if deadline <= loop.time():  # not even the confirm of a write handed over now is in time
            loop.call_soon(confirms.expire)
            return None
        tick = math.ceil(deadline / _TICK_S)
        waits = self.ticks.get(tick)
        if waits is None:
            waits = self.ticks[tick] = {}
            loop.call_at(tick * _TICK_S, self._expire, tick)
        waits[confirms] = None
        return tick

    def remove(self, confirms: amqp.Confirms, tick: int) -> None:
        waits = self.ticks.get(tick)
        if waits is not None:
            waits.pop(confirms, None)

    def _expire(self, tick: int) -> None:
        for confirms in self.ticks.pop(tick, {}):
            confirms.expire()


def _message(item: Outgoing) -> tuple[bytes, str, str, Basic.Properties, bool]:
    mandatory: bool = getattr(item, "mandatory", True)
    return item.body, item.exchange, item.routing_key, item.properties, mandatory


def _no_confirms(item: Outgoing) -> PublishError:
    return RefusedError(
        item.job,
        "not sent: the channel has no publisher confirms (open it with "
        "publisher_confirms=True, on_return_raises=True)",
    )


def _unencodable(item: Outgoing, exc: Exception) -> PublishError:
    """The error of one item that could not be marshalled (nothing of it was sent)."""
    if isinstance(exc, InvalidMessageError):
        return exc
    try:  # the check every edge uses says which field, in its words
        check_message(item.properties, item.job)
    except InvalidMessageError as named:
        return named
    return InvalidMessageError(
        item.job,
        item.job_id,
        f"job {item.job!r} (id {item.job_id[:80]!r}) cannot be sent: AMQP cannot carry its "
        f"message ({type(exc).__name__}: {exc})",
    )


def _unconfirmed(
    items: Sequence[Outgoing],
    sent: Sequence[Outgoing],
    refused: dict[int, PublishError],
    confirms: amqp.Confirms,
    failure: BaseException | None,
    timeout: float | None,
) -> BatchPublishError:
    """The error naming each job not confirmed with its typed error (those that could not be
    marshalled included), and the ids that landed, in batch order."""
    landed: list[str] = []
    errors: dict[str, PublishError] = {}
    outcomes = iter(zip(sent, confirms.outcome, strict=True))
    for index, item in enumerate(items):
        if index in refused:
            errors[item.job_id] = refused[index]
            continue
        _, outcome = next(outcomes)
        if outcome is amqp.ACK:
            landed.append(item.job_id)
        else:
            errors[item.job_id] = _job_error(item, outcome, failure, timeout, sent=confirms.sent)
    return BatchPublishError(landed, errors)


def _job_error(
    item: Outgoing,
    outcome: Any,
    failure: BaseException | None,
    timeout: float | None,
    *,
    sent: bool = True,
) -> PublishError:
    """One job's typed error: the one mapping, for a batch and a single publish alike.
    ``sent=False``: its frames never reached the writer (a timeout then says it is not queued)."""
    if isinstance(outcome, aiormq.exceptions.PublishError) or (
        outcome is not None and not isinstance(outcome, BaseException)
    ):  # returned (an exception, or the message itself without on_return_raises)
        return UnroutableError(item.job, item.exchange, item.routing_key)
    if isinstance(outcome, aiormq.exceptions.DeliveryError):
        return RefusedError(item.job, str(outcome.frame) if outcome.frame else "nacked")
    cause = outcome if outcome is not None else failure
    if isinstance(cause, aiormq.exceptions.ChannelNotFoundEntity):
        return PublishError(
            item.job,
            f"exchange {item.exchange!r} does not exist; run `leveret topology declare APP` "
            f"or start a worker first",
        )
    if isinstance(cause, TimeoutError) and not isinstance(
        cause, aiormq.exceptions.AMQPConnectionError
    ):
        return PublishTimeout(item.job, timeout if timeout is not None else 0.0, sent=sent)
    return ConnectionLost(item.job, type(cause).__name__ if cause is not None else "closed")
