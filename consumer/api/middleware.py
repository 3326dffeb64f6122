"""Pure ASGI middleware for the API: request metrics, bearer auth, the body limit.

Pure ASGI (not Starlette's ``BaseHTTPMiddleware``) because the body limit has to sit *on* the
``receive`` channel: it counts bytes as the server hands them over and stops the request at the
first byte over the limit, so a 2 GB body is never read, let alone held. The order, outermost
first, is metrics → auth → body limit → the app: every answer is counted (401 and 413 too), and
an unauthenticated client cannot make the server read a byte of its body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leveret.producers import per_registry

# Requests answer in milliseconds; a slow broker confirm can take seconds.
REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
UNMATCHED = "unmatched"  # the route label of a path no route serves (never the raw path)
OPEN_PATHS = frozenset({"/healthz"})


class ApiMetrics:
    """``leveret_api_requests_total{route,method,status}`` and the duration histogram."""

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> ApiMetrics:
        return per_registry(registry, cls)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "leveret_api_requests_total",
            "HTTP API requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "leveret_api_request_duration_seconds",
            "HTTP API request time, by route template and method.",
            ["route", "method"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class MetricsMiddleware:
    """Counts every answer under its route *template* (``/jobs/{job_id}``), so labels stay
    bounded whatever paths clients send."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routes: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's router routes, matched here before auth runs

    def _template(self, scope: Scope) -> str:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(route.path)
            if match is Match.PARTIAL and partial is None:
                partial = str(route.path)
        return partial or UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers if the app raises before it starts a response
        start = time.perf_counter()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route, method = self._template(scope), scope["method"]
            self.metrics.requests.labels(route=route, method=method, status=str(status)).inc()
            self.metrics.duration.labels(route=route, method=method).observe(
                time.perf_counter() - start
            )


class AuthMiddleware:
    """``Authorization: Bearer <token>`` on everything but ``OPEN_PATHS``.

    The comparison is of SHA-256 digests with ``hmac.compare_digest``: constant time, and no
    length leak either. A 401 says only that the request is not authorized: never which part
    was wrong (missing header, wrong scheme, wrong token), never the token.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self._digest = hashlib.sha256(token.encode()).digest() if token is not None else None

    def _authorized(self, scope: Scope) -> bool:
        if self._digest is None:
            return True  # --insecure-no-auth
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        ok_scheme = scheme.lower() == b"bearer"
        match = hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self._digest)
        return ok_scheme and match

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await _send_json(
            send, 401, {"detail": "not authorized"}, [(b"www-authenticate", b"Bearer")]
        )


class BodyTooLarge(Exception):
    """Raised out of ``receive`` once the body passed the limit; turned into a 413 here."""


class BodyLimitMiddleware:
    """A request body over ``limit`` bytes answers 413 without being read.

    A ``Content-Length`` over the limit answers at once. Otherwise (chunked, or a client that
    lies) the bytes are counted as they arrive and the request is cut at the first chunk that
    passes the limit. The 413 carries ``Connection: close``, so the server drops the rest of
    the body instead of reading it to find the next request.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _too_large(self, send: Send) -> None:
        await _send_json(
            send,
            413,
            {"detail": f"request body over the limit of {self.limit} bytes"},
            [(b"connection", b"close")],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await self._too_large(send)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:  # pragma: no cover - our endpoints read the body before answering
                raise
            await self._too_large(send)
