"""The CLI masks the URL's credentials, not every occurrence of the password's letters."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import pytest
from yarl import URL

from tests.support import Broker, leveret_cli, unique


@pytest.fixture
def short_password_url(broker: Broker) -> Iterator[str]:
    """A real user whose password is the single letter ``p``, allowed on the test vhost."""
    user = unique("shortpw")
    broker.api("PUT", f"/users/{user}", json={"password": "p", "tags": ""}).raise_for_status()
    broker.api(
        "PUT",
        f"/permissions/{broker.qvhost}/{quote(user, safe='')}",
        json={"configure": ".*", "write": ".*", "read": ".*"},
    ).raise_for_status()
    try:
        yield str(URL(broker.url).with_user(user).with_password("p"))
    finally:
        broker.api("DELETE", f"/users/{user}")


def test_a_short_password_leaves_error_messages_readable(short_password_url: str) -> None:
    """An unroutable publish (no exchange yet) reads as written: "topology", "publish"."""
    result = leveret_cli(
        "publish", "wait_exponential", "{}", env={"LEVERET_AMQP_URL": short_password_url}
    )
    assert result.returncode != 0
    assert "******" not in result.stderr, result.stderr
    assert "leveret topology declare APP" in result.stderr, result.stderr
