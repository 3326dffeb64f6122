"""Wire format v1 in one place: what a job looks like on the broker.

A job is a UTF-8 JSON object body with ``content_type`` ``application/json``, ``type`` = the job
name, ``message_id`` = the job id, optional ``priority`` and ``delivery_mode`` 2. Dead-lettered
copies add the ``x-reason``/``x-error``/``x-attempts`` headers; ``x-attempts`` also rides on
retries so the next worker knows which attempt it runs.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from pamqp.commands import Basic
from pydantic import BaseModel

from leveret.topology.model import job_from_routing_key

from .errors import InvalidPayloadError, InvalidPriorityError

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
# Headers Leveret (or the broker's dead-lettering) manages; never carried to the next attempt.
OWN_HEADERS = frozenset({HEADER_ATTEMPTS, HEADER_REASON, HEADER_ERROR, HEADER_DIED_AT,
                         HEADER_QUEUE, HEADER_REDELIVERIES, HEADER_DELIVERY_COUNT, "x-death",
                         "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                         "x-last-death-exchange", "x-last-death-queue",
                         "x-last-death-reason"})  # fmt: skip
# What a job's body may be declared as: a missing encoding, or one that means "as is".
_PLAIN_ENCODINGS = frozenset({None, "", "identity", "utf-8", "UTF-8"})

REASONS = ("exhausted", "rejected", "invalid", "unknown_job")

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def new_job_id() -> str:
    return str(uuid.uuid4())


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


def job_properties(
    job: str, job_id: str, priority: int | None = None, headers: dict[str, Any] | None = None
) -> Basic.Properties:
    return Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        message_id=job_id,
        message_type=job,
        priority=priority,
        headers=headers,
    )


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
    return envelope


def header_count(headers: dict[str, Any] | None, name: str) -> int | None:
    """An integer header's value (``bool`` is no integer here), else ``None``."""
    value = headers.get(name) if headers else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
