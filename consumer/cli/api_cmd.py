"""``leveret api APP``: the HTTP service API under uvicorn.

``--loop`` is the worker's (``leveret.producers.eventloop``: ``auto`` is uvloop when it is
installed): the choice is resolved once by that shared helper and handed to uvicorn as its own
``loop`` setting, so uvicorn creates the loop the way it always does. The line ``event_loop``
names the loop the server really runs on, read from inside it, like the worker's.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from types import FrameType
from typing import Any

import click
import structlog
from pydantic import ValidationError

from leveret.consumer.cli.common import command_setup, fail, load_app, loop_option
from leveret.consumer.errors import ConfigError
from leveret.producers import LoopUnavailable, loop_name, resolve_loop

log = structlog.get_logger("leveret.api")


@click.command(
    epilog="""\b
Example:
  LEVERET_API_TOKEN=s3cret leveret api myapp.tasks:worker --host 0.0.0.0 --port 8000
  curl -H 'Authorization: Bearer s3cret' -H 'Content-Type: application/json' \\
       -d '{"to": "a@b.c", "subject": "hi"}' http://localhost:8000/jobs/send_email

Every route but /healthz needs the bearer token. Metrics: http://HOST:LEVERET_METRICS_PORT/metrics.
Needs the api extra: pip install 'leveret[api]'."""
)
@click.argument("app")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Run without LEVERET_API_TOKEN: anyone who reaches the port can publish and cancel.",
)
@click.option("--no-ui", is_flag=True, help="Do not serve the web console at /ui.")
@loop_option
@command_setup
def api(app: str, host: str, port: int, insecure_no_auth: bool, no_ui: bool, loop: str) -> None:
    """Serve APP's jobs over HTTP (module:attribute naming a Worker)."""
    try:
        loop_kind = resolve_loop(loop)  # before anything slow: a missing uvloop is one clear line
    except LoopUnavailable as exc:
        fail(str(exc))
    try:
        import uvicorn

        from leveret.consumer.api import ApiSettings, create_app
    except ImportError as exc:
        fail(
            f"the HTTP API needs the api extra ({exc.name} is missing): pip install 'leveret[api]'"
        )
    worker = load_app(app)
    try:
        settings = ApiSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"setting LEVERET_{str(first['loc'][0]).upper()} is invalid: {first['msg']}")
    try:
        asgi = create_app(worker, settings, insecure_no_auth=insecure_no_auth, ui=not no_ui)
    except ConfigError as exc:
        fail(str(exc))
    # Logging is structlog's (configured by command_setup); uvicorn's access log would print
    # every request again, unstructured.
    config = uvicorn.Config(
        asgi,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        loop=loop_kind,
    )
    server = _graceful_server(config)
    server.asked_loop = loop
    server.run()


def _graceful_server_class() -> type[Any]:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """Like the worker: SIGTERM/SIGINT finish in-flight requests, then exit 0.

        uvicorn re-raises the signal it caught once it has shut down (so the process dies by
        it, status -15); an orchestrator or a supervisor then sees a crash, not a clean stop.
        """

        asked_loop = "auto"

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            # What the running loop really is, not what was asked for: the line to trust.
            log.info(
                "event_loop", loop=loop_name(asyncio.get_running_loop()), asked=self.asked_loop
            )
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for requests
            else:
                self.should_exit = True

    return GracefulServer


def _graceful_server(config: Any) -> Any:
    """A ``GracefulServer``; the class is built on first use (uvicorn is an optional extra)."""
    return _graceful_server_class()(config)
