"""Wire format v1 in one place: what a job looks like on the broker.

A job is a UTF-8 JSON object body with ``content_type`` ``application/json``, ``type`` = the job
name, ``message_id`` = the job id, optional ``priority`` and ``delivery_mode`` 2. Dead-lettered
copies add the ``x-reason``/``x-error``/``x-attempts`` headers; ``x-attempts`` also rides on
retries so the next worker knows which attempt it runs.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pamqp.commands import Basic
from pydantic import BaseModel

from .errors import InvalidPayloadError, InvalidPriorityError

CONTENT_TYPE = "application/json"
PERSISTENT = 2
MAX_PRIORITY = 9

HEADER_REASON = "x-reason"
HEADER_ERROR = "x-error"
HEADER_ATTEMPTS = "x-attempts"
HEADER_DIED_AT = "x-died-at"
HEADER_QUEUE = "x-queue"

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


def one_line(text: str, limit: int = 500) -> str:
    """Header-safe error text: one line, bounded, so a huge traceback never bloats a message."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
