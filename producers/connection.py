"""Opening connections: TLS, masked URLs, and errors that say what to do.

Every connection error passes through ``connect`` so that no caller ever formats the raw URL
(with its password) into a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from yarl import URL

from .errors import BrokerUnavailable
from .settings import ConnectionSettings

# Errors that mean "the broker went away"; callers retry on these (aio-pika's own list).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)


def mask_url(url: str) -> str:
    """The URL with its password replaced, safe for logs and errors."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return "<unparseable URL>"
    if parsed.password is not None:
        parsed = parsed.with_password("******")
    return str(parsed)


def _ssl_context(settings: ConnectionSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
    )
    if settings.tls_cert_file:
        context.load_cert_chain(
            str(settings.tls_cert_file),
            str(settings.tls_key_file) if settings.tls_key_file else None,
        )
    return context


def explain(exc: BaseException, url: str) -> BrokerUnavailable:
    """Turn a low-level connection failure into one clear, password-free error."""
    masked = mask_url(url)
    password = URL(url).password if "://" in url else None
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if password:
        reason = reason.replace(password, "******")
    if isinstance(
        exc,
        aiormq.exceptions.AuthenticationError | aiormq.exceptions.ProbableAuthenticationError,
    ):
        return BrokerUnavailable(
            masked, "login refused", "check the user and password in LEVERET_AMQP_URL"
        )
    client_cert_advice = (
        "the broker refused this client's TLS handshake: if it requires a client certificate, "
        "set LEVERET_TLS_CERT_FILE and LEVERET_TLS_KEY_FILE (signed by a CA the broker trusts)"
    )
    lowered = reason.lower()
    # aiormq wraps ssl.SSLError in AMQPConnectionError, so the text is what tells.
    if isinstance(exc, ssl.SSLError) or "[ssl" in lowered or "certificate" in lowered:
        if "alert" in lowered:  # the broker rejected *our* certificate (or its absence)
            return BrokerUnavailable(masked, reason, client_cert_advice)
        if "hostname mismatch" in lowered or "ip address mismatch" in lowered:
            return BrokerUnavailable(
                masked, reason, "connect by a host name that the broker's certificate lists"
            )
        return BrokerUnavailable(
            masked,
            reason,
            "check LEVERET_TLS_CA_FILE (the CA that signed the broker's certificate)",
        )
    if url.startswith("amqps://") and ("reset" in lowered or "eof" in lowered):
        # A broker that demands a client certificate just drops the connection without one.
        return BrokerUnavailable(masked, reason, client_cert_advice)
    if "access_refused" in reason.lower() or "not_allowed" in reason.lower():
        return BrokerUnavailable(
            masked, reason, "check that the vhost exists and the user has permissions on it"
        )
    return BrokerUnavailable(
        masked, reason, "check that RabbitMQ is running and LEVERET_AMQP_URL is right"
    )


async def connect(settings: ConnectionSettings, *, robust: bool = True) -> AbstractRobustConnection:
    """Connect once (raising ``BrokerUnavailable`` on failure); robust connections then reconnect
    by themselves after a drop.

    The connection object is built here rather than by ``aio_pika.connect*`` so that a failed
    attempt is closed at once: a worker retrying for hours would otherwise leave one unclosed
    connection object per attempt for the garbage collector to finalise.
    """
    url = settings.amqp_url.get_secret_value()
    ssl_context = _ssl_context(settings) if url.startswith("amqps://") else None
    factory = aio_pika.RobustConnection if robust else aio_pika.Connection
    try:
        connection = factory(make_url(url), ssl_context=ssl_context)
    except ValueError as exc:
        raise explain(exc, url) from None
    try:
        await connection.connect(timeout=settings.connect_timeout)
    except (*CONNECTION_ERRORS, ssl.SSLError, ValueError) as exc:
        with contextlib.suppress(Exception):
            await connection.close()
        raise explain(exc, url) from None
    return connection  # type: ignore[return-value]
