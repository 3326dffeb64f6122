"""The pytest plugin of ``leveret.testing`` (entry point ``pytest11``: ``leveret =
"leveret.testing.pytest_plugin"``). It lives here, outside ``consumer/``, because it imports pytest:
only pytest ever loads it, so pytest is no dependency of the worker.

``leveret_amqp_url``: a fresh vhost on the broker ``LEVERET_AMQP_URL`` names (default
``amqp://guest:guest@localhost:5672/``), created through its management API before the test and
deleted after it, whatever the test did: a test's queues, retries and DLQs never meet another's.
The management API is ``LEVERET_MANAGEMENT_URL`` if set, else ``http(s)://<host>:15672`` (15671
for ``amqps``) with the AMQP URL's credentials. Only the standard library is used, so the plugin
costs a test run nothing unless a test asks for the fixture.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"


def _management(amqp_url: str) -> tuple[str, str, str]:
    """``(management base URL, user, password)`` for the broker of ``amqp_url``."""
    parts = urlsplit(amqp_url)
    user = unquote(parts.username or "guest")
    password = unquote(parts.password or "guest")
    explicit = os.environ.get("LEVERET_MANAGEMENT_URL")
    if explicit:
        m = urlsplit(explicit)
        user = unquote(m.username) if m.username else user
        password = unquote(m.password) if m.password else password
        netloc = m.hostname or "localhost"
        if m.port:
            netloc += f":{m.port}"
        return urlunsplit((m.scheme, netloc, m.path.rstrip("/"), "", "")), user, password
    tls = parts.scheme == "amqps"
    host = parts.hostname or "localhost"
    return f"{'https' if tls else 'http'}://{host}:{15671 if tls else 15672}", user, password


def _call(base: str, user: str, password: str, method: str, path: str, body: object = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/api{path}", data=data, method=method)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30):
        pass


@pytest.fixture
def leveret_amqp_url() -> Iterator[str]:
    """An AMQP URL for a vhost made for this test alone (deleted after it)."""
    configured = os.environ.get("LEVERET_AMQP_URL") or DEFAULT_AMQP_URL
    amqp_url = configured.split(",")[0].strip()  # a cluster's first node
    base, user, password = _management(amqp_url)
    vhost = f"leveret-test-{uuid.uuid4().hex[:12]}"
    qvhost = quote(vhost, safe="")
    _call(base, user, password, "PUT", f"/vhosts/{qvhost}")
    try:
        _call(
            base,
            user,
            password,
            "PUT",
            f"/permissions/{qvhost}/{quote(user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        parts = urlsplit(amqp_url)
        yield urlunsplit((parts.scheme, parts.netloc, "/" + qvhost, parts.query, ""))
    finally:
        _call(base, user, password, "DELETE", f"/vhosts/{qvhost}")
