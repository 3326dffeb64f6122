"""The console's readers, without a broker: workers grouped by connection, history rows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from leveret.consumer.console.data import Consumer, _workers, as_row, iso, open_history


def test_workers_are_connections_consuming_the_apps_queues() -> None:
    consumers = [
        Consumer("email", "w1", "10.0.0.1:5000", "a", 10, True),
        Consumer("images", "w1", "10.0.0.1:5000", "b", 5, True),
        Consumer("email", "w2", "10.0.0.2:6000", "c", 10, True),
        Consumer("jobs.scheduler.default", "w3", "10.0.0.3:1", "d", 1, True),  # not a work queue
    ]
    rows = _workers(consumers, ["email", "images"])
    assert rows == [
        {
            "connection": "w1",
            "peer": "10.0.0.1:5000",
            "queues": ["email", "images"],
            "prefetch": 15,
        },
        {"connection": "w2", "peer": "10.0.0.2:6000", "queues": ["email"], "prefetch": 10},
    ]


def test_history_rows_and_times() -> None:
    at = datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC)
    row = as_row({"id": "x", "job": "j", "state": "dead", "attempts": 3, "created_at": at})
    assert row["created_at"] == "2027-01-02T03:04:05Z" and row["attempts"] == 3
    assert iso(0) == "1970-01-01T00:00:00Z"


def test_no_history_url_says_how_to_turn_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEVERET_HISTORY_URL", raising=False)
    history = open_history()
    assert history.store is None and history.why_not == "LEVERET_HISTORY_URL is not set"
