"""`leveret status` talks to the management API with httpx; its per-request INFO line
(``HTTP Request: GET …``) stays out of the log stream unless LEVERET_LOG_LEVEL=debug."""

from __future__ import annotations

import pytest

from tests.support import Broker, leveret_cli


@pytest.mark.parametrize("level", ["info", "warning"])
def test_status_logs_no_http_request_lines(broker: Broker, level: str) -> None:
    result = leveret_cli("status", env={"LEVERET_AMQP_URL": broker.url, "LEVERET_LOG_LEVEL": level})
    assert result.returncode == 0, result.stderr
    assert "HTTP Request" not in result.stderr, result.stderr
    assert '"logger": "httpx"' not in result.stderr


def test_status_at_debug_still_shows_them(broker: Broker) -> None:
    result = leveret_cli(
        "status", env={"LEVERET_AMQP_URL": broker.url, "LEVERET_LOG_LEVEL": "debug"}
    )
    assert result.returncode == 0, result.stderr
    assert "HTTP Request: GET" in result.stderr
