"""Celery 5 on RabbitMQ (py-amqp), its worker embedded as ``celery worker`` would run it.

Best documented settings: ``acks_late`` (ack after the task), results ignored, the solo pool with
``worker_prefetch_multiplier=1000`` for no-op throughput, the threads pool with concurrency 100
for I/O-bound jobs, ``--without-gossip --without-mingle --without-heartbeat``, and
``confirm_publish`` for publishing. Retries use ``self.retry(countdown=1)``.

The ``celery-results`` row (``results_url`` in the spec): the same best settings, plus a Redis
result backend (results stored, ``task_track_started=True`` so a STARTED state is written before
the task runs) and task events (``worker_send_task_events``, what ``-E`` sets: task-received,
-started and -succeeded events published to RabbitMQ). The harness counts a job once its
SUCCESS result is readable in Redis.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any

from bench.runners.common import Tally, load_spec, say, wait_go
from bench.wire import payload


def main() -> None:
    spec = load_spec()
    from celery import Celery
    from kombu import Exchange, Queue

    concurrency = spec.get("concurrency", 1)
    prefetch = spec.get("prefetch", 1000)
    app = Celery("bench", broker=spec["url"].replace("amqp://", "pyamqp://", 1))
    results = bool(spec.get("results_url"))
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=not results,
        task_serializer="json",
        accept_content=["json"],
        # Confirms are for publishing jobs (and retries). The results row's worker publishes only
        # its task events, which Celery sends fire-and-forget: waiting for a confirm per event
        # is not its best configuration, so that row runs without.
        broker_transport_options={"confirm_publish": not results},
        worker_prefetch_multiplier=max(1, prefetch // concurrency),
        worker_hijack_root_logger=False,
        worker_send_task_events=results,
        task_track_started=results,
        **({"result_backend": spec["results_url"], "result_expires": 600} if results else {}),
        broker_connection_retry_on_startup=True,
        task_default_queue=spec["queue"],
    )
    queue = Queue(spec["queue"], Exchange(spec["queue"]), routing_key=spec["queue"])
    app.conf.task_queues = [queue]
    consuming = not spec["workload"].startswith("publish")
    tally = Tally(spec, lambda: threading.Thread(target=stop_later, daemon=True).start())
    io_s = float(spec.get("io_s", 0.0))

    def stop_later() -> None:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown

    @app.task(name=spec["job"], bind=True, acks_late=True, max_retries=3)
    def handle(self: Any, data: dict[str, Any]) -> None:
        if tally.start(data):
            raise self.retry(countdown=spec.get("backoff_s", 1.0))
        if io_s:
            time.sleep(io_s)
        tally.end()

    with app.connection_for_write() as conn:
        queue(conn.default_channel).declare()
    say("READY")
    wait_go()
    if not consuming:
        started = time.perf_counter()
        for i in range(spec["n"]):
            handle.apply_async(args=[payload(i)], queue=spec["queue"])
        elapsed = time.perf_counter() - started
        say("RESULT", elapsed=elapsed, n=spec["n"])
        return
    tally.go()
    worker = app.Worker(
        pool="solo" if concurrency == 1 else "threads",
        concurrency=concurrency,
        queues=[spec["queue"]],
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        task_events=results,
        loglevel="WARNING",
        quiet=True,
    )
    from celery.signals import worker_ready

    @worker_ready.connect
    def consuming(**_: Any) -> None:
        say("CONSUMING")
        if spec["workload"] == "consume_2proc":
            tally.watch_idle()

    with contextlib.suppress(SystemExit):  # its warm shutdown may exit
        worker.start()
    say("RESULT", **tally.result())


if __name__ == "__main__":
    main()
