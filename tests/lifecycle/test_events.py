"""The event vocabulary: names, bodies exactly as the contract gives them, the result rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel

from leveret.producers.stores.settings import LifecycleSettings
from leveret.producers.wire.events import (
    OUTCOME_STATES,
    TERMINAL_STATES,
    InvalidEvent,
    build_event,
    default_events_mode,
    encode_result,
    events_exchange,
    is_outcome,
    parse_event,
    publishes,
    routing_key,
)
from leveret.topology.errors import LeveretError

BASE: dict[str, Any] = {"job_id": "id-1", "job": "send_email", "queue": "mail"}


def test_names() -> None:
    assert events_exchange("jobs") == "jobs.events"
    assert events_exchange("acme") == "acme.events"
    assert routing_key("send_email", "succeeded") == "send_email.succeeded"
    assert {"succeeded", "retrying", "dead", "cancelled"} == OUTCOME_STATES
    assert {"succeeded", "dead", "cancelled"} == TERMINAL_STATES
    assert is_outcome("retrying") and not is_outcome("started") and not is_outcome("progress")


def test_modes() -> None:
    assert not any(publishes("off", s) for s in ("started", "progress", "succeeded", "dead"))
    assert publishes("outcomes", "progress") and publishes("outcomes", "dead")
    assert not publishes("outcomes", "started")
    assert publishes("all", "started") and publishes("all", "succeeded")
    # v3: off by default; outcomes where a job history is kept (it reads them).
    assert default_events_mode(None) == "off"
    assert default_events_mode("postgresql://x") == "outcomes"


def test_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EVENTS", "STATUS_URL", "STATUS_TTL", "RESULT_MAX_BYTES", "HISTORY_URL"):
        monkeypatch.delenv(f"LEVERET_{name}", raising=False)
    default = LifecycleSettings()
    assert (
        default.events_mode,
        default.status_ttl,
        default.result_max_bytes,
        default.status_timeout,
    ) == ("off", 604800, 65536, 10.0)
    monkeypatch.setenv("LEVERET_STATUS_URL", "redis://localhost/0")
    assert LifecycleSettings().events_mode == "off"  # the status store needs no events
    monkeypatch.setenv("LEVERET_HISTORY_URL", "postgresql://localhost/jobs")
    assert LifecycleSettings().events_mode == "outcomes"
    monkeypatch.setenv("LEVERET_EVENTS", "off")
    assert LifecycleSettings().events_mode == "off"


def test_body_has_exactly_the_contract_fields() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone(timedelta(hours=2)))
    started = json.loads(build_event(**BASE, state="started", attempt=1, at=at))
    assert started == {**BASE, "state": "started", "attempt": 1, "at": "2026-01-02T01:04:05.678Z"}

    succeeded = json.loads(
        build_event(**BASE, state="succeeded", attempt=2, duration_s=1.25, result={"n": 1})
    )
    assert set(succeeded) == {*BASE, "state", "attempt", "at", "duration_s", "result"}
    assert succeeded["result"] == {"n": 1} and succeeded["duration_s"] == 1.25
    assert succeeded["at"].endswith("Z")
    # A handler that returned nothing still has a result: null.
    assert json.loads(build_event(**BASE, state="succeeded", attempt=1))["result"] is None

    dead = json.loads(
        build_event(**BASE, state="dead", attempt=3, duration_s=0.1, error="ValueError: a\nb")
    )
    assert dead["error"] == "ValueError: a b"  # one line
    assert "result" not in dead

    progress = json.loads(
        build_event(**BASE, state="progress", attempt=1, progress=0.4, message="4 of 10")
    )
    assert (progress["progress"], progress["message"]) == (0.4, "4 of 10")


def test_build_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="unknown event state"):
        build_event(**BASE, state="queued", attempt=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone-aware"):
        build_event(**BASE, state="started", attempt=1, at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="finite"):
        build_event(**BASE, state="progress", attempt=1, progress=float("nan"))


def test_parse_round_trip() -> None:
    event = parse_event(build_event(**BASE, state="retrying", attempt=2, error="boom"))
    assert (event.job_id, event.state, event.attempt) == ("id-1", "retrying", 2)
    assert event.error == "boom"
    assert event.at.tzinfo is not None and not event.terminal
    # Fields a newer version may add are ignored, not refused.
    body = json.loads(build_event(**BASE, state="dead", attempt=1))
    assert parse_event(json.dumps({**body, "trace_id": "x"})).terminal


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"\x00 nothing", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'{"job_id": "a"}', "job:"),
        (
            b'{"job_id":"a","job":"j","queue":"q","state":"exploded","attempt":1,'
            b'"at":"2026-01-01T00:00:00Z"}',
            "state:",
        ),
        (
            b'{"job_id":"a","job":"j","queue":"q","state":"started","attempt":-1,'
            b'"at":"2026-01-01T00:00:00Z"}',
            "attempt:",
        ),
        (
            b'{"job_id":"a","job":"j","queue":"q","state":"started","attempt":1,'
            b'"at":"2026-01-01T00:00:00"}',
            "at:",
        ),
        (
            b'{"job_id":"a","job":"j","queue":"q","state":"progress","attempt":1,'
            b'"at":"2026-01-01T00:00:00Z","progress":NaN}',
            "not JSON",
        ),
    ],
)
def test_parse_refuses_bad_bodies_with_a_clear_error(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason) as info:
        parse_event(body)
    assert isinstance(info.value, LeveretError)


class Invoice(BaseModel):
    number: int
    issued: datetime


def test_result_rule() -> None:
    assert encode_result({"a": [1, 2]}).value == {"a": [1, 2]}
    assert encode_result(None).value is None and encode_result(None).dropped is None
    when = datetime(2026, 1, 1, tzinfo=UTC)
    dumped = encode_result(Invoice(number=7, issued=when))
    assert dumped.value == {"number": 7, "issued": "2026-01-01T00:00:00Z"}
    assert encode_result([Invoice(number=1, issued=when)]).value == [
        {"number": 1, "issued": "2026-01-01T00:00:00Z"}
    ]

    big = "x" * 100
    assert encode_result(big, max_bytes=102).value == big  # 100 chars + 2 quotes
    over = encode_result(big, max_bytes=101)
    assert (over.value, over.dropped, over.size) == (None, "too_large", 102)
    # The default limit is the contract's 65536 bytes, counted as UTF-8.
    assert encode_result("é" * 32766).dropped is None  # 65532 + 2 bytes
    assert encode_result("é" * 32768).dropped == "too_large"

    assert encode_result(object()).dropped == "not_json"
    assert encode_result(float("inf")).dropped == "not_json"
