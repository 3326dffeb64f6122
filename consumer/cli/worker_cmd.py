"""``leveret worker APP``: one worker, or N under a supervisor (``--processes``)."""

from __future__ import annotations

import asyncio
import gc
import sys

import click
import structlog

from leveret.consumer.cli.common import (
    command_setup,
    fail,
    load_app,
    load_settings,
    loop_option,
    run_async,
)
from leveret.consumer.worker import Worker
from leveret.producers import LoopUnavailable, install_loop, loop_name

log = structlog.get_logger("leveret.worker")


@click.command(
    epilog="""\b
Example:
  LEVERET_AMQP_URL=amqp://user:pass@rabbit:5672/ leveret worker myapp.tasks:worker --queue email
  LEVERET_AMQP_URL=amqp://u:p@rabbit-1/,amqp://u:p@rabbit-2/ leveret worker app:w --processes 4

SIGTERM or SIGINT stops taking jobs, lets in-flight jobs finish within
LEVERET_SHUTDOWN_GRACE seconds, returns the rest to their queue and exits 0.
Metrics and health: http://HOST:LEVERET_METRICS_PORT/{metrics,healthz,readyz}
(with --processes, one endpoint for all the processes)."""
)
@click.argument("app")
@click.option(
    "--queue", "-q", "queues", multiple=True, help="Consume only this queue (repeatable)."
)
@click.option("--prefetch", type=click.IntRange(1, 65535), help="Jobs held at once (concurrency).")
@click.option(
    "--processes",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Worker processes under one supervisor that runs no jobs (each with --prefetch).",
)
@loop_option
@command_setup
def worker(
    app: str, queues: tuple[str, ...], prefetch: int | None, processes: int, loop: str
) -> None:
    """Run the jobs of APP (module:attribute naming a consumer.Worker)."""
    try:
        loop_kind = install_loop(loop)
    except LoopUnavailable as exc:
        fail(str(exc))
    if processes > 1:
        _supervise(app, queues, prefetch, processes, loop)
        return
    app_worker = load_app(app)
    log.debug("event_loop_installed", loop=loop_kind)
    # Everything imported and built so far (modules, the app, its models and settings) lives
    # as long as the process: moved out of the collector's generations, it is no longer
    # traversed by every full collection, which a worker otherwise runs often (each job's
    # objects promote). Measured with the status store: ~10 % less CPU per job.
    gc.collect()
    gc.freeze()
    run_async(_run(app_worker, list(queues) or None, prefetch, loop))


async def _run(
    app_worker: Worker, queues: list[str] | None, prefetch: int | None, asked: str
) -> None:
    # What the running loop really is, not what was asked for: the line to trust.
    log.info("event_loop", loop=loop_name(asyncio.get_running_loop()), asked=asked)
    await app_worker.run(queues, prefetch=prefetch, handle_signals=True)


def _supervise(
    app: str, queues: tuple[str, ...], prefetch: int | None, processes: int, loop: str
) -> None:
    from leveret.consumer.runtime.supervisor import Supervisor

    load_app(app)  # a bad APP is one clear line here, not N children failing in a loop
    argv = ["worker", app, "--loop", loop]
    for q in queues:
        argv += ["--queue", q]
    if prefetch is not None:
        argv += ["--prefetch", str(prefetch)]
    sys.exit(run_async(Supervisor(argv, processes, load_settings()).run()))
