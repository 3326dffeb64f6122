"""Opening connections: TLS, masked URLs, several nodes, and errors that say what to do.

Every connection error passes through ``connect`` so that no caller ever formats the raw URL
(with its password) into a message.

``LEVERET_AMQP_URL`` may name a cluster's nodes, comma-separated (a comma inside a password must
be percent-encoded, ``%2C``). ``connect`` tries them in turn from a random node, so that the
workers of a deployment spread over the cluster instead of all piling onto the first node, and
returns the first that answers; its error names every node it tried. A robust connection (the
publisher's) fails over by itself too: each reconnect attempt goes to the next node
(``FailoverRobustConnection``). ``connected_url`` tells which node a process last reached: the
default management URL follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from typing import Literal, overload
from urllib.parse import quote

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.connection import make_url
from yarl import URL

from leveret.producers.broker import frames
from leveret.producers.broker.adapter import ReconnectHook
from leveret.producers.errors import BrokerUnavailable
from leveret.producers.settings import ConnectionSettings

# Errors that mean "the broker went away"; callers retry on these (aio-pika's own list).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)

# What a failed first connect may raise: the above, a TLS failure, a URL aio-pika refuses, or
# the broker closing the connection where aiormq waits for ``Connection.OpenOk`` (a vhost that
# does not exist or that the user may not open: aiormq 7 raises InvalidFrameError for that).
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    ssl.SSLError,
    ValueError,
    aiormq.exceptions.InvalidFrameError,
)

MASK = "******"
# Seconds between a robust connection's reconnect attempts when it has other nodes to try.
MULTI_NODE_RECONNECT_S = 1.0

log = structlog.get_logger("leveret.connection")

SCHEMES = ("amqp", "amqps")


def split_urls(value: str) -> list[str]:
    """The URLs of a comma-separated ``LEVERET_AMQP_URL`` (one URL is a list of one).

    Blank entries (a trailing comma) are dropped; an empty value gives an empty list, which
    ``node_urls`` refuses.
    """
    return [part.strip() for part in value.split(",") if part.strip()]


def node_urls(value: str) -> list[str]:
    """The nodes of ``value``, each checked: an ``amqp://`` or ``amqps://`` URL with a host, all
    on one vhost (one cluster, one vhost: a list that mixes them is a typo, not a failover).

    Raises ``BrokerUnavailable`` naming the bad entry, masked.
    """
    urls = split_urls(value)
    if not urls:
        raise BrokerUnavailable(
            "<empty>", "LEVERET_AMQP_URL is empty", "set it to amqp://user:password@host:5672/"
        )
    vhosts: set[str] = set()
    for i, url in enumerate(urls, 1):
        where = f"entry {i} of {len(urls)}" if len(urls) > 1 else "the URL"
        try:
            parsed = URL(url)
        except (TypeError, ValueError):
            parsed = None
        if parsed is None or parsed.scheme not in SCHEMES or not parsed.host:
            raise BrokerUnavailable(
                mask_url(url),
                f"LEVERET_AMQP_URL {where} is not an amqp:// or amqps:// URL with a host",
                "write each node as amqp://user:password@host:5672/vhost, comma-separated",
            )
        vhosts.add(parsed.path or "/")
    if len(vhosts) > 1:
        raise BrokerUnavailable(
            mask_url(value),
            f"the nodes in LEVERET_AMQP_URL name different vhosts ({', '.join(sorted(vhosts))})",
            "list the nodes of one cluster with the same vhost",
        )
    return urls


# The node each configured URL list last connected to, so that what follows the connection (the
# default management URL, log lines) can name the same node. Keyed by the whole list.
_connected: dict[str, str] = {}


def connected_url(value: str) -> str:
    """The node of ``value`` this process last connected to; the first one before any connect."""
    return _connected.get(value) or (split_urls(value) or [value])[0]


def mask_url(url: str) -> str:
    """The URL (or each URL of a comma-separated list) with its password replaced, safe for logs
    and errors."""
    if "," in url:
        return ",".join(mask_url(part) for part in split_urls(url))
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return "<unparseable URL>"
    if parsed.password is not None:
        parsed = parsed.with_password(MASK)
    return str(parsed)


def _userinfo_spellings(url: str) -> set[tuple[str, str]]:
    """``(user, password)`` as the URL may appear in text: as configured, percent-encoded and
    decoded (a client echoing the URL may print either); for every URL of a list."""
    if "," in url:
        return {up for part in split_urls(url) for up in _userinfo_spellings(part)}
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
    if _vhost_refused(exc):
        vhost, user = _vhost_and_user(url)
        return BrokerUnavailable(
            masked,
            f"the broker refused to open vhost {vhost!r} for user {user!r}",
            "check that the vhost in LEVERET_AMQP_URL exists and that the user has permissions "
            "on it",
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


def _vhost_refused(exc: BaseException) -> bool:
    """The broker answered ``Connection.Open`` with ``Connection.Close``: it will not open the
    vhost (530 NOT_ALLOWED: absent, or no permission for this user). aiormq raises that as an
    InvalidFrameError whose text holds only the frames' names; the reply text is lost."""
    text = str(exc)
    return (
        isinstance(exc, aiormq.exceptions.InvalidFrameError)
        and "Connection.OpenOk" in text
        and "Connection.Close" in text
    )


def _vhost_and_user(url: str) -> tuple[str, str]:
    """The vhost and user name a URL opens (never its password); aio-pika's defaults apply."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return "?", "?"
    return parsed.path[1:] or "/", parsed.user or "guest"


class FailoverRobustConnection(ReconnectHook):
    """aio-pika's robust connection, reconnecting to the next node of a list each attempt.

    aio-pika reconnects to the one URL it was given (its issue #141; a multi-host class was
    proposed in its PR #680 and not merged), so a publisher whose node is stopped would retry
    that node until it came back. Here every transport attempt after the first moves ``url`` on
    to the next node, round robin: after a drop the first retry already goes elsewhere. The
    per-attempt hook reaches into aio-pika, so it lives in ``producers.amqp``;
    ``tests/producers/test_multi_url.py`` fails if a new aio-pika loses it.
    """

    def __init__(self, urls: list[str], start: int, key: str, **kwargs: object) -> None:
        super().__init__(make_url(urls[start]), **kwargs)  # type: ignore[arg-type]
        self._urls = urls
        self._index = start
        self._key = key
        self._attempts = 0

    def before_attempt(self) -> None:
        if self._attempts:
            self._index = (self._index + 1) % len(self._urls)
            self.url = make_url(self._urls[self._index])
        self._attempts += 1

    def after_attempt(self) -> None:
        _connected[self._key] = self._urls[self._index]
        if self._attempts > 1:
            log.info("broker_reconnected", node=mask_url(self._urls[self._index]))


def _order(count: int) -> list[int]:
    """Indexes of the nodes to try: all of them, from a random one on (spreads the load)."""
    start = random.randrange(count) if count > 1 else 0
    return [(start + i) % count for i in range(count)]


@overload
async def connect(
    settings: ConnectionSettings, *, robust: Literal[True] = True
) -> AbstractRobustConnection: ...


@overload
async def connect(
    settings: ConnectionSettings, *, robust: Literal[False]
) -> AbstractConnection: ...


async def connect(settings: ConnectionSettings, *, robust: bool = True) -> AbstractConnection:
    """Connect to the first node that answers (raising ``BrokerUnavailable``, naming every node
    tried, when none does); robust connections then reconnect by themselves after a drop, to the
    next node each attempt.

    The connection object is built here rather than by ``aio_pika.connect*`` so that a failed
    attempt is closed at once: a worker retrying for hours would otherwise leave one unclosed
    connection object per attempt for the garbage collector to finalise.
    """
    frames.install()  # aiormq reads frames in bulk from here on (``frames``)
    value = settings.amqp_url.get_secret_value()
    urls = node_urls(value)
    failures: list[BrokerUnavailable] = []
    for index in _order(len(urls)):
        try:
            connection = await _connect_one(settings, urls, index, value, robust=robust)
        except BrokerUnavailable as exc:
            failures.append(exc)
            continue
        _connected[value] = urls[index]
        return connection
    if len(failures) == 1:
        raise failures[0]
    tried = "; ".join(f"{f.url}: {f.reason}" for f in failures)
    raise BrokerUnavailable(
        mask_url(value),
        f"none of the {len(urls)} nodes answered ({tried})",
        "check that RabbitMQ is running on at least one of them and LEVERET_AMQP_URL is right",
    )


async def _connect_one(
    settings: ConnectionSettings, urls: list[str], index: int, key: str, *, robust: bool
) -> AbstractConnection:
    url = urls[index]
    ssl_context = _ssl_context(settings) if url.startswith("amqps://") else None
    connection: aio_pika.Connection
    try:
        if robust:
            # With several nodes the next attempt goes to another node, so it need not wait
            # aio-pika's 5 s (meant for one node coming back).
            interval = None if len(urls) == 1 else MULTI_NODE_RECONNECT_S
            connection = FailoverRobustConnection(
                urls, index, key, ssl_context=ssl_context, reconnect_interval=interval
            )
        else:
            connection = aio_pika.Connection(make_url(url), ssl_context=ssl_context)
    except ValueError as exc:
        raise explain(exc, url) from None
    try:
        await connection.connect(timeout=settings.connect_timeout)
    except _CONNECT_ERRORS as exc:
        with contextlib.suppress(Exception):
            await connection.close()
        raise explain(exc, url) from None
    return connection
