"""The envelope both sides read and write: wire format v1 (``message``) and lifecycle events
(``events``). Public to the worker (``leveret.consumer`` imports these names, nothing deeper).

The names load on first use (PEP 562), so a worker pays only for the modules it uses (the
stores import Redis-only code that a worker without ``LEVERET_STATUS_URL`` never loads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leveret.producers.lazy import load

if TYPE_CHECKING:
    from leveret.producers.wire.events import (
        CANCELLED,
        DEAD,
        EVENTS_CONTENT_TYPE,
        PROGRESS,
        RETRYING,
        STARTED,
        SUCCEEDED,
        EventsMode,
        EventState,
        InvalidEvent,
        JobEvent,
        build_event,
        encode_result,
        events_exchange,
        parse_event,
        publishes,
        rfc3339_ns,
    )
    from leveret.producers.wire.message import (
        CONTENT_TYPE,
        HEADER_ATTEMPTS,
        HEADER_DELIVERY_COUNT,
        HEADER_DIED_AT,
        HEADER_ERROR,
        HEADER_EXPIRES_AT,
        HEADER_PUBLISHED_AT,
        HEADER_QUEUE,
        HEADER_REASON,
        HEADER_REDELIVERIES,
        OWN_HEADERS,
        PERSISTENT,
        carried_headers,
        check_max_attempts,
        check_priority,
        copy_properties,
        encode_payload,
        expires_header,
        header_count,
        job_properties,
        new_job_id,
        one_line,
        read_envelope,
    )

_HOME = {
    "CANCELLED": "leveret.producers.wire.events",
    "DEAD": "leveret.producers.wire.events",
    "EVENTS_CONTENT_TYPE": "leveret.producers.wire.events",
    "EventState": "leveret.producers.wire.events",
    "EventsMode": "leveret.producers.wire.events",
    "InvalidEvent": "leveret.producers.wire.events",
    "JobEvent": "leveret.producers.wire.events",
    "PROGRESS": "leveret.producers.wire.events",
    "RETRYING": "leveret.producers.wire.events",
    "STARTED": "leveret.producers.wire.events",
    "SUCCEEDED": "leveret.producers.wire.events",
    "build_event": "leveret.producers.wire.events",
    "encode_result": "leveret.producers.wire.events",
    "events_exchange": "leveret.producers.wire.events",
    "parse_event": "leveret.producers.wire.events",
    "publishes": "leveret.producers.wire.events",
    "rfc3339_ns": "leveret.producers.wire.events",
    "CONTENT_TYPE": "leveret.producers.wire.message",
    "HEADER_ATTEMPTS": "leveret.producers.wire.message",
    "HEADER_DELIVERY_COUNT": "leveret.producers.wire.message",
    "HEADER_DIED_AT": "leveret.producers.wire.message",
    "HEADER_ERROR": "leveret.producers.wire.message",
    "HEADER_EXPIRES_AT": "leveret.producers.wire.message",
    "HEADER_PUBLISHED_AT": "leveret.producers.wire.message",
    "HEADER_QUEUE": "leveret.producers.wire.message",
    "HEADER_REASON": "leveret.producers.wire.message",
    "HEADER_REDELIVERIES": "leveret.producers.wire.message",
    "OWN_HEADERS": "leveret.producers.wire.message",
    "PERSISTENT": "leveret.producers.wire.message",
    "carried_headers": "leveret.producers.wire.message",
    "check_max_attempts": "leveret.producers.wire.message",
    "check_priority": "leveret.producers.wire.message",
    "copy_properties": "leveret.producers.wire.message",
    "encode_payload": "leveret.producers.wire.message",
    "expires_header": "leveret.producers.wire.message",
    "header_count": "leveret.producers.wire.message",
    "job_properties": "leveret.producers.wire.message",
    "new_job_id": "leveret.producers.wire.message",
    "one_line": "leveret.producers.wire.message",
    "read_envelope": "leveret.producers.wire.message",
}

__all__ = [
    "CANCELLED",
    "CONTENT_TYPE",
    "DEAD",
    "EVENTS_CONTENT_TYPE",
    "HEADER_ATTEMPTS",
    "HEADER_DELIVERY_COUNT",
    "HEADER_DIED_AT",
    "HEADER_ERROR",
    "HEADER_EXPIRES_AT",
    "HEADER_PUBLISHED_AT",
    "HEADER_QUEUE",
    "HEADER_REASON",
    "HEADER_REDELIVERIES",
    "OWN_HEADERS",
    "PERSISTENT",
    "PROGRESS",
    "RETRYING",
    "STARTED",
    "SUCCEEDED",
    "EventState",
    "EventsMode",
    "InvalidEvent",
    "JobEvent",
    "build_event",
    "carried_headers",
    "check_max_attempts",
    "check_priority",
    "copy_properties",
    "encode_payload",
    "encode_result",
    "events_exchange",
    "expires_header",
    "header_count",
    "job_properties",
    "new_job_id",
    "one_line",
    "parse_event",
    "publishes",
    "read_envelope",
    "rfc3339_ns",
]


def __getattr__(name: str) -> object:
    return load(__name__, _HOME, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
