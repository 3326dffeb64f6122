"""Opening connections: TLS, masked URLs, and errors that say what to do.

Every connection error passes through ``connect`` so that no caller ever formats the raw URL
(with its password) into a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Literal, overload
from urllib.parse import quote

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
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

# What a failed first connect may raise: the above, a TLS failure, or a URL aio-pika refuses.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, ssl.SSLError, ValueError)

MASK = "******"


def mask_url(url: str) -> str:
    """The URL with its password replaced, safe for logs and errors."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return "<unparseable URL>"
    if parsed.password is not None:
        parsed = parsed.with_password(MASK)
    return str(parsed)


def _userinfo_spellings(url: str) -> set[tuple[str, str]]:
    """``(user, password)`` as the URL may appear in text: as configured, percent-encoded and
    decoded (a client echoing the URL may print either)."""
    if "://" not in url:
        return set()
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return set()
    if not parsed.password:
        return set()
    spellings = {
        (parsed.user or "", parsed.password),
        (parsed.raw_user or "", parsed.raw_password or ""),
        (quote(parsed.user or "", safe=""), quote(parsed.password, safe="")),
    }
    # The configured text itself, whatever its encoding: between "://" and the last "@".
    authority = url.split("://", 1)[1].split("/", 1)[0]
    if "@" in authority:
        user, sep, password = authority.rsplit("@", 1)[0].partition(":")
        if sep:
            spellings.add((user, password))
    return {(u, p) for u, p in spellings if p}


def mask_secrets(text: str, url: str) -> str:
    """``text`` with the configured URL's ``user:password@`` userinfo masked, nothing else.

    Only the userinfo is replaced, never every occurrence of the password as a bare string: a
    short password (``p``) would otherwise turn ``wait_exponential`` into
    ``wait_ex******onential``. A broker or client message only ever contains the password as
    part of a URL it echoes, which is exactly what this masks (raw and percent-encoded).
    """
    for user, password in sorted(
        _userinfo_spellings(url), key=lambda up: len(up[0]) + len(up[1]), reverse=True
    ):
        text = text.replace(f"{user}:{password}@", f"{user}:{MASK}@")
    return text


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
    reason = mask_secrets(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, url)
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


@overload
async def connect(
    settings: ConnectionSettings, *, robust: Literal[True] = True
) -> AbstractRobustConnection: ...


@overload
async def connect(
    settings: ConnectionSettings, *, robust: Literal[False]
) -> AbstractConnection: ...


async def connect(settings: ConnectionSettings, *, robust: bool = True) -> AbstractConnection:
    """Connect once (raising ``BrokerUnavailable`` on failure); robust connections then reconnect
    by themselves after a drop.

    The connection object is built here rather than by ``aio_pika.connect*`` so that a failed
    attempt is closed at once: a worker retrying for hours would otherwise leave one unclosed
    connection object per attempt for the garbage collector to finalise.
    """
    url = settings.amqp_url.get_secret_value()
    ssl_context = _ssl_context(settings) if url.startswith("amqps://") else None
    factory: type[aio_pika.Connection] = (
        aio_pika.RobustConnection if robust else aio_pika.Connection
    )
    try:
        connection = factory(make_url(url), ssl_context=ssl_context)
    except ValueError as exc:
        raise explain(exc, url) from None
    try:
        await connection.connect(timeout=settings.connect_timeout)
    except _CONNECT_ERRORS as exc:
        with contextlib.suppress(Exception):
            await connection.close()
        raise explain(exc, url) from None
    return connection
