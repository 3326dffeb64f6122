"""A small client for RabbitMQ's management HTTP API, as the operator tools need it.

Where it points: ``LEVERET_MANAGEMENT_URL`` when set, otherwise the AMQP URL's host (of a list of
nodes, the one last connected to) on port
15672 (``https`` on 15671, the TLS listener, for ``amqps://``), with the AMQP URL's user and
password unless the management URL carries its own. The vhost is always the AMQP URL's, decoded
the way the AMQP client decodes it, so ``status`` and ``doctor`` look at the same vhost the
worker uses.

The password never leaves this module in text: ``repr`` and every error show the URL masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from yarl import URL

from leveret.consumer.settings import WorkerSettings
from leveret.producers import ConnectionSettings
from leveret.producers.broker import connected_url, mask_secrets, mask_url, split_urls
from leveret.topology.errors import LeveretError

MANAGEMENT_PORT = 15672
# The management plugin's TLS listener (https), the one to use beside an amqps:// broker.
MANAGEMENT_TLS_PORT = 15671
DEFAULT_TIMEOUT_S = 10.0


class ManagementError(LeveretError):
    """The management API could not be used; ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


def amqp_vhost(amqp_url: str) -> str:
    """The vhost an AMQP URL names, decoded like aiormq does (``/`` or empty path is ``/``); of
    a comma-separated list, the first node's (``connect`` refuses a list that mixes vhosts)."""
    url = URL((split_urls(amqp_url) or [amqp_url])[0])
    if url.path in ("", "/"):
        return "/"
    return url.raw_path[1:].replace("%2F", "/").replace("%2f", "/")


@dataclass(frozen=True)
class ManagementTarget:
    """Where the API lives and who we are there; ``base`` never carries credentials."""

    base: str
    user: str
    password: str
    vhost: str

    @classmethod
    def from_settings(cls, settings: ConnectionSettings) -> ManagementTarget:
        # Of a cluster's nodes, the one this process last connected to (``connect``): the
        # management API to ask is the one beside the node that answers.
        amqp = connected_url(settings.amqp_url.get_secret_value())
        amqp_url = URL(amqp)
        # Only a worker's settings name a management URL; a publisher's fall back to the AMQP one.
        explicit = settings.management_url if isinstance(settings, WorkerSettings) else None
        if explicit is not None and explicit.get_secret_value():
            mgmt = URL(explicit.get_secret_value())
        else:
            tls = amqp_url.scheme == "amqps"
            mgmt = URL.build(
                scheme="https" if tls else "http",
                host=amqp_url.host or "localhost",
                port=MANAGEMENT_TLS_PORT if tls else MANAGEMENT_PORT,
            )
        user = mgmt.user if mgmt.user is not None else (amqp_url.user or "guest")
        password = mgmt.password if mgmt.password is not None else (amqp_url.password or "guest")
        base = str(mgmt.with_user(None).with_query(None).with_fragment(None)).rstrip("/")
        # Accept both http://host:15672 and http://host:15672/api.
        if base.endswith("/api"):
            base = base[: -len("/api")]
        return cls(base=base, user=user, password=password, vhost=amqp_vhost(amqp))

    @property
    def display(self) -> str:
        """The base URL with the user and a masked password: safe to print."""
        return mask_url(str(URL(self.base).with_user(self.user).with_password(self.password)))


class Management:
    """GETs against one broker's management API, async only: every caller runs in a loop."""

    def __init__(self, target: ManagementTarget, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.target = target
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(
        cls, settings: ConnectionSettings, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> Management:
        return cls(ManagementTarget.from_settings(settings), timeout_s)

    def __repr__(self) -> str:
        return f"Management({self.target.display!r})"

    @property
    def qvhost(self) -> str:
        return quote(self.target.vhost, safe="")

    @property
    def _secret_base(self) -> str:
        """The base URL with the real credentials: what ``mask_secrets`` looks for in text."""
        return str(
            URL(self.target.base).with_user(self.target.user).with_password(self.target.password)
        )

    def _url(self, path: str) -> str:
        return f"{self.target.base}/api{path}"

    def _explain(self, exc: Exception | None, response: httpx.Response | None) -> ManagementError:
        where = self.target.display
        if response is not None:
            status = response.status_code
            if status == 401:
                return ManagementError(
                    f"the management API at {where} refused the login; check the user and "
                    f"password (LEVERET_MANAGEMENT_URL or LEVERET_AMQP_URL) and that the user "
                    f"has the 'management' or 'monitoring' tag",
                    status,
                )
            if status == 404:
                return ManagementError(f"not found at {where}: {response.request.url.path}", 404)
            return ManagementError(
                f"the management API at {where} answered {status}: {response.text[:200]}",
                status,
            )
        reason = f"{type(exc).__name__}: {exc}" if exc is not None and str(exc) else repr(exc)
        reason = mask_secrets(reason, self._secret_base)
        return ManagementError(
            f"the management API at {where} is not reachable ({reason}); enable it with "
            f"`rabbitmq-plugins enable rabbitmq_management` or set LEVERET_MANAGEMENT_URL"
        )

    @property
    def _verify(self) -> bool:
        """Plain http:// has no TLS to verify: skip building a CA-loaded SSL context, which
        costs megabytes of RSS and milliseconds per client in every worker. https:// verifies."""
        return self._url("").startswith("https://")

    async def get(self, path: str, **params: str) -> Any:
        """``GET /api{path}``: the decoded JSON (``Any``: this is the wire boundary)."""
        try:
            async with httpx.AsyncClient(
                auth=(self.target.user, self.target.password),
                timeout=self.timeout_s,
                verify=self._verify,
            ) as client:
                response = await client.get(self._url(path), params=params or None)
        except httpx.HTTPError as exc:
            raise self._explain(exc, None) from None
        if response.status_code >= 400:
            raise self._explain(None, response)
        return response.json() if response.content else None

    # -- what the tools ask -----------------------------------------------------------------

    async def overview(self) -> dict[str, Any]:
        """``/api/overview``: broker version, cluster name, listeners."""
        return dict(await self.get("/overview") or {})

    async def queues(self) -> list[dict[str, Any]]:
        """Every queue of the vhost, with counts and message rates."""
        return list(await self.get(f"/queues/{self.qvhost}") or [])

    async def bindings_from(self, exchange: str) -> list[dict[str, Any]]:
        """Every binding whose source is ``exchange`` in the vhost."""
        path = f"/exchanges/{self.qvhost}/{quote(exchange, safe='')}/bindings/source"
        return list(await self.get(path) or [])

    async def permissions(self, user: str) -> dict[str, Any]:
        """``user``'s configure/write/read patterns on the vhost (404 when it has none)."""
        return dict(await self.get(f"/permissions/{self.qvhost}/{quote(user, safe='')}") or {})
