"""``leveret worker APP``."""

from __future__ import annotations

import click

from .common import command_setup, load_app, run_async


@click.command(
    epilog="""\b
Example:
  LEVERET_AMQP_URL=amqp://user:pass@rabbit:5672/ leveret worker myapp.tasks:worker --queue email

SIGTERM or SIGINT stops taking jobs, lets in-flight jobs finish within
LEVERET_SHUTDOWN_GRACE seconds, returns the rest to their queue and exits 0.
Metrics and health: http://HOST:LEVERET_METRICS_PORT/{metrics,healthz,readyz}."""
)
@click.argument("app")
@click.option(
    "--queue", "-q", "queues", multiple=True, help="Consume only this queue (repeatable)."
)
@click.option("--prefetch", type=click.IntRange(1, 65535), help="Jobs held at once (concurrency).")
@command_setup
def worker(app: str, queues: tuple[str, ...], prefetch: int | None) -> None:
    """Run the jobs of APP (module:attribute naming a consumer.Worker)."""
    app_worker = load_app(app)
    run_async(app_worker.run(list(queues) or None, prefetch=prefetch, handle_signals=True))
