"""One scrubber: the configured URL's ``user:password@`` is masked, nothing else is touched."""

from __future__ import annotations

import pytest

from leveret.consumer.ops.management import ManagementTarget
from leveret.producers import ConnectionSettings
from leveret.producers.broker.connection import explain, mask_secrets, mask_url


def test_a_short_password_does_not_mangle_other_words() -> None:
    """Password ``p``: the URL's userinfo is masked, ``wait_exponential`` stays whole."""
    url = "amqp://guest:p@rabbit:5672/"
    text = "retry=wait_exponential failed connecting to amqp://guest:p@rabbit:5672/ (topology)"
    masked = mask_secrets(text, url)
    assert masked == (
        "retry=wait_exponential failed connecting to amqp://guest:******@rabbit:5672/ (topology)"
    )
    assert mask_url(url) == "amqp://guest:******@rabbit:5672/"


def test_encoded_and_decoded_userinfo_are_both_masked() -> None:
    """A client may echo the URL percent-encoded or decoded: both spellings go."""
    url = "amqp://us%40er:Zebra-S3cret-pw%2F42@rabbit/vh"
    text = "a amqp://us%40er:Zebra-S3cret-pw%2F42@rabbit/vh b amqp://us@er:Zebra-S3cret-pw/42@x"
    masked = mask_secrets(text, url)
    assert "S3cret" not in masked
    assert masked == "a amqp://us%40er:******@rabbit/vh b amqp://us@er:******@x"


@pytest.mark.parametrize("url", ["amqp://rabbit/", "amqp://guest@rabbit/", "not a url"])
def test_urls_without_a_password_change_nothing(url: str) -> None:
    assert mask_secrets("guest: nothing@ to hide in wait_exponential", url) == (
        "guest: nothing@ to hide in wait_exponential"
    )


def test_connection_errors_keep_their_words() -> None:
    """``explain`` masks the URL an error echoes, not the letters of the password."""
    url = "amqp://guest:p@127.0.0.1:1/"
    error = explain(OSError(f"wait_exponential gave up on {url}"), url)
    assert "wait_exponential gave up on amqp://guest:******@127.0.0.1:1/" in str(error)
    assert "guest:p@" not in str(error)


def test_management_defaults_to_the_tls_listener_for_amqps() -> None:
    """amqps:// brokers serve the management API over https on 15671, not 15672."""
    tls = ManagementTarget.from_settings(
        ConnectionSettings(amqp_url="amqps://u:pw@rabbit.example:5671/vh")
    )
    assert tls.base == "https://rabbit.example:15671"
    plain = ManagementTarget.from_settings(ConnectionSettings(amqp_url="amqp://u:pw@rabbit/vh"))
    assert plain.base == "http://rabbit:15672"
