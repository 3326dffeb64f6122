"""Wire format v1 in one place: what a job looks like on the broker.

A job is a UTF-8 JSON object body with ``content_type`` ``application/json``, ``type`` = the job
name, ``message_id`` = the job id, optional ``priority`` and ``delivery_mode`` 2. Dead-lettered
copies add the ``x-reason``/``x-error``/``x-attempts`` headers; ``x-attempts`` also rides on
retries so the next worker knows which attempt it runs.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pamqp import encode as pamqp_encode
from pamqp.commands import Basic
from pydantic import BaseModel

from leveret.producers.errors import (
    InvalidMaxAttemptsError,
    InvalidMessageError,
    InvalidPayloadError,
    InvalidPriorityError,
)
from leveret.topology.delay import job_from_routing_key
from leveret.topology.errors import InvalidValueError

CONTENT_TYPE = "application/json"
PERSISTENT = 2
MAX_PRIORITY = 9

HEADER_REASON = "x-reason"
HEADER_ERROR = "x-error"
HEADER_ATTEMPTS = "x-attempts"
HEADER_DIED_AT = "x-died-at"
HEADER_QUEUE = "x-queue"
# Broker redeliveries the worker counted itself (classic queues keep no count).
HEADER_REDELIVERIES = "x-redeliveries"
# The count quorum queues keep for us.
HEADER_DELIVERY_COUNT = "x-delivery-count"
# ``publish(..., max_attempts=N)``: this one job's attempts, instead of the registered number.
HEADER_MAX_ATTEMPTS = "x-max-attempts"
# When the job was published, in integer milliseconds since the epoch: the AMQP ``timestamp``
# property (also set) has whole seconds only, too coarse for a queue wait of a few ms.
HEADER_PUBLISHED_AT = "x-published-at"
# ``publish(..., expires=)``: a job not started by then (integer ms since the epoch) is not run;
# it is dead-lettered ``expired``. Carried on retries and postponements.
HEADER_EXPIRES_AT = "x-expires-at"
# Headers Leveret (or the broker's dead-lettering) manages; never carried to the next attempt.
OWN_HEADERS = frozenset({HEADER_ATTEMPTS, HEADER_REASON, HEADER_ERROR, HEADER_DIED_AT,
                         HEADER_QUEUE, HEADER_REDELIVERIES, HEADER_DELIVERY_COUNT, "x-death",
                         "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                         "x-last-death-exchange", "x-last-death-queue",
                         "x-last-death-reason"})  # fmt: skip
# What a job's body may be declared as: a missing encoding, or one that means "as is".
_PLAIN_ENCODINGS = frozenset({None, "", "identity", "utf-8", "UTF-8"})

REASONS = ("exhausted", "rejected", "invalid", "unknown_job", "expired")

# AMQP 0-9-1 limits: a short string (message_id, type, the other string properties) is at most
# 255 bytes; a table's field name at most 128 (pamqp truncates a longer one, with a warning).
MAX_SHORT_STRING = 255
MAX_FIELD_NAME = 128
# The string properties, each a short string, by the name an error gives them.
_SHORT_STRINGS = (
    ("message_id", "job id"),
    ("message_type", "job name"),
    ("content_type", "content_type"),
    ("content_encoding", "content_encoding"),
    ("correlation_id", "correlation_id"),
    ("reply_to", "reply_to"),
    ("expiration", "expiration"),
    ("user_id", "user_id"),
    ("app_id", "app_id"),
    ("cluster_id", "cluster_id"),
)
# What pamqp raises for a value it cannot encode.
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, AttributeError, struct.error)
_CARRIED = (
    "str, int (64-bit), float, bool, Decimal, datetime, bytearray, None, and lists and dicts "
    "of these"
)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def new_job_id() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())`` gives it, made in half the
    time (no ``UUID`` object: a job id is only ever used as text)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def encode_payload(payload: BaseModel | dict[str, Any]) -> bytes:
    """The body bytes for a payload; anything but a JSON object is refused before publishing."""
    if isinstance(payload, BaseModel):
        return payload.model_dump_json().encode()
    if isinstance(payload, dict):
        return _dumps(payload).encode()
    raise InvalidPayloadError(payload)


def check_priority(priority: int | None) -> int | None:
    if priority is None:
        return None
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise InvalidPriorityError(priority, MAX_PRIORITY)
    return priority


def check_max_attempts(max_attempts: int | None) -> int | None:
    """``publish(..., max_attempts=N)``: a positive integer or nothing."""
    if max_attempts is None:
        return None
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise InvalidMaxAttemptsError(max_attempts)
    return max_attempts


def _utf8_size(text: str) -> int:
    """Its size in UTF-8 (ASCII, the common case, never encodes); -1: not encodable (a lone
    surrogate), which pamqp would refuse too."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def _too_long(what: str, text: str, size: int, limit: int) -> str:
    if size < 0:
        return f"{what} {text[:40]!r} is not valid UTF-8 text (a lone surrogate)"
    shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
    return f"{what} {shown} is {size} bytes; AMQP carries at most {limit} bytes (UTF-8) there"


def _check_keys(table: dict[Any, Any] | list[Any], job: str, job_id: str | None) -> None:
    """Every field name in a (nested) table: text of at most 128 bytes."""
    values = table.values() if isinstance(table, dict) else table
    if isinstance(table, dict):
        for key in table:
            if not isinstance(key, str):
                raise InvalidMessageError(job, job_id, f"header keys must be str, got {key!r:.80}")
            size = _utf8_size(key)
            if not 0 <= size <= MAX_FIELD_NAME:
                raise InvalidMessageError(
                    job, job_id, _too_long("header key", key, size, MAX_FIELD_NAME)
                )
    for value in values:
        if isinstance(value, dict | list):
            _check_keys(value, job, job_id)


def check_message(props: Basic.Properties, job: str | None = None) -> None:
    """Raise ``InvalidMessageError`` (a ``ValueError``) if AMQP cannot carry these properties.

    The one check of what a message's properties must be for the broker to take them: every
    string property (``message_id`` the job id, ``type`` the job name, ...) at most 255 UTF-8
    bytes, header keys text of at most 128 bytes (in nested tables too), header values of a
    type AMQP has (str, int within 64 bits, float, bool, Decimal, datetime, bytearray, None,
    lists and dicts of these). ``job`` names the job in the error (default: ``type``).
    Cheap: no marshalling, except each header value on its own.
    """
    job_id = props.message_id
    name = job if job is not None else (props.message_type or "?")
    for field, label in _SHORT_STRINGS:
        value = getattr(props, field)
        if value is not None:
            _check_short(label, value, name, job_id)
    _check_headers(props.headers, name, job_id)


def _check_short(label: str, value: object, job: str, job_id: str | None) -> None:
    if not isinstance(value, str):
        raise InvalidMessageError(job, job_id, f"{label} must be a str, got {type(value).__name__}")
    size = _utf8_size(value)
    if not 0 <= size <= MAX_SHORT_STRING:
        raise InvalidMessageError(job, job_id, _too_long(label, value, size, MAX_SHORT_STRING))


def _check_headers(headers: object, job: str, job_id: str | None) -> None:
    if not headers:
        return
    if not isinstance(headers, dict):
        raise InvalidMessageError(
            job, job_id, f"headers must be a dict, got {type(headers).__name__}"
        )
    _check_keys(headers, job, job_id)
    for key, value in headers.items():
        try:
            pamqp_encode.encode_table_value(value)
        except _ENCODE_ERRORS as exc:
            raise InvalidMessageError(
                job,
                job_id,
                f"header {key!r}: AMQP cannot carry {value!r:.80} ({exc}); a header value "
                f"may be {_CARRIED}",
            ) from None


def job_properties(
    job: str,
    job_id: str,
    priority: int | None = None,
    headers: Mapping[str, Any] | None = None,
    *,
    max_attempts: int | None = None,
) -> Basic.Properties:
    """A new job's properties: the wire format above, plus when it was published (the AMQP
    ``timestamp`` in seconds for every tool, ``x-published-at`` in ms for the queue-wait
    histogram) and, when given, its own ``x-max-attempts``. Raises ``InvalidMessageError``
    for what AMQP cannot carry (``check_message``)."""
    now = time.time()
    # check_message's checks, of the fields that vary (the others are constants).
    _check_short("job id", job_id, job, job_id)
    _check_short("job name", job, job, job_id)
    if headers or max_attempts is not None:
        carried = dict(headers) if headers else {}
        carried[HEADER_PUBLISHED_AT] = int(now * 1000)
        if max_attempts is not None:
            carried[HEADER_MAX_ATTEMPTS] = max_attempts
        _check_headers(carried, job, job_id)
    else:  # the common case: only our own integer, which AMQP always carries
        carried = {HEADER_PUBLISHED_AT: int(now * 1000)}
    return Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        message_id=job_id,
        message_type=job,
        priority=priority,
        headers=carried,
        timestamp=_second(now),
    )


class _Second:
    """The ``timestamp`` property of the current second, made once a second (a datetime is
    immutable, so every job of that second shares it)."""

    __slots__ = ("at", "stamp")

    def __init__(self) -> None:
        self.at = 0
        self.stamp = datetime.fromtimestamp(0, UTC)

    def __call__(self, now: float) -> datetime:
        second = int(now)
        if second != self.at:
            self.stamp = datetime.fromtimestamp(second, UTC)
            self.at = second
        return self.stamp


_second = _Second()


def expires_header(
    headers: Mapping[str, Any] | None, expires: float | timedelta | datetime | None
) -> Mapping[str, Any] | None:
    """``headers`` with ``x-expires-at`` for ``publish(..., expires=)``: seconds from now (a
    number or ``timedelta``, more than 0) or an aware ``datetime``; ``InvalidValueError``
    otherwise."""
    if expires is None:
        return headers
    if isinstance(expires, datetime):
        if expires.tzinfo is None or expires.utcoffset() is None:
            raise InvalidValueError(f"expires={expires.isoformat()} needs a time zone")
        at = expires.timestamp()
    else:
        ahead = expires.total_seconds() if isinstance(expires, timedelta) else expires
        if isinstance(ahead, bool) or not isinstance(ahead, int | float) or not 0 < ahead < 1e10:
            raise InvalidValueError(
                f"expires= must be seconds (more than 0) or a datetime: {expires!r}"
            )
        at = time.time() + ahead
    return {**(headers or {}), HEADER_EXPIRES_AT: int(at * 1000)}


def carried_headers(props: Basic.Properties) -> dict[str, Any]:
    """The headers a copy of this message keeps: the user's own, none of ``OWN_HEADERS``."""
    headers = props.headers
    if not headers:
        return {}
    return {k: v for k, v in headers.items() if k not in OWN_HEADERS}


def copy_properties(
    props: Basic.Properties, job: str | None, job_id: str, headers: dict[str, Any]
) -> Basic.Properties:
    """The original's properties for a new copy, minus what would break or mislead it.

    ``expiration`` would fight the retry queues' TTL; ``user_id`` must name the publishing
    connection's user, which is ours now.
    """
    return Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers or None,
        delivery_mode=PERSISTENT,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        message_id=job_id,
        timestamp=props.timestamp,
        message_type=job,
        app_id=props.app_id,
    )


def one_line(text: str, limit: int = 500) -> str:
    """Header-safe error text: one line, bounded, so a huge traceback never bloats a message."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclass(slots=True)
class Envelope:
    """What the properties of a delivered job say, read once (the inverse of ``job_properties``).

    ``problem`` is why the message cannot run as it is (it is dead-lettered as ``invalid``);
    ``job_id`` is ``None`` when the publisher sent no ``message_id``.
    """

    name: str
    job_id: str | None
    attempts: int
    problem: str | None = None
    max_attempts: int | None = None  # ``x-max-attempts``: this job's own limit, if published so


def read_envelope(
    props: Basic.Properties, routing_key: str | None, body_size: int, max_body: int
) -> Envelope:
    """Parse a delivered job's envelope; a malformed one comes back with its ``problem``.

    The name is ``type``, else the routing key (a delayed publish's key names its job after
    the delay words: ``job_from_routing_key``).
    """
    name = props.message_type or job_from_routing_key(routing_key or "")
    envelope = Envelope(name, props.message_id or None, 0)
    if props.content_encoding not in _PLAIN_ENCODINGS:
        envelope.problem = f"unsupported content-encoding {props.content_encoding!r}"
    elif (ctype := props.content_type) and ctype.split(";")[0].strip().lower() != CONTENT_TYPE:
        envelope.problem = f"content type {ctype!r} is not {CONTENT_TYPE}"
    elif body_size > max_body:
        envelope.problem = f"body of {body_size} bytes exceeds LEVERET_MAX_BODY_BYTES ({max_body})"
    else:
        raw = props.headers.get(HEADER_ATTEMPTS, 0) if props.headers else 0
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            envelope.problem = (
                f"header {HEADER_ATTEMPTS} must be a non-negative integer, got {raw!r}"
            )
        else:
            envelope.attempts = raw
            limit = props.headers.get(HEADER_MAX_ATTEMPTS) if props.headers else None
            if limit is not None:
                if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                    envelope.problem = (
                        f"header {HEADER_MAX_ATTEMPTS} must be an integer of 1 or more, "
                        f"got {limit!r}"
                    )
                else:
                    envelope.max_attempts = limit
    return envelope


def header_count(headers: dict[str, Any] | None, name: str) -> int | None:
    """An integer header's value (``bool`` is no integer here), else ``None``."""
    value = headers.get(name) if headers else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
