"""A token read from a file (a Kubernetes secret mounted or passed through ``valueFrom``, ``echo
tok > file``) ends in a newline. The token is stripped once where it is loaded, so the client
that sends the token itself (clients and proxies strip the header's whitespace) is let in."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry

from leveret.consumer.api import ApiSettings
from tests.support import Broker

from .conftest import TOKEN, build, serve


def test_a_token_loaded_with_a_trailing_newline_authenticates(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEVERET_API_TOKEN", TOKEN + "\n")
    settings = ApiSettings()
    app = build(broker, None, CollectorRegistry(), settings=settings)
    with serve(app) as served:
        with served.client(TOKEN) as client:
            assert client.get("/openapi.json").status_code == 200
        with served.client(TOKEN + "x") as client:
            assert client.get("/openapi.json").status_code == 401
        with httpx.Client(base_url=served.url) as client:
            assert client.get("/openapi.json").status_code == 401


def test_a_token_of_whitespace_only_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEVERET_API_TOKEN", " \n")
    token = ApiSettings().api_token
    assert token is not None and token.get_secret_value() == ""
