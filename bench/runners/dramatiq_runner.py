"""Dramatiq with its RabbitMQ broker, run in-process the way ``dramatiq`` runs a worker.

Best documented settings for throughput: one worker thread and a queue prefetch of 1,000
(``dramatiq_queue_prefetch``) for no-op jobs; 100 threads for the I/O-bound workload (its
documented concurrency model). Acks come after the actor returns (Dramatiq always works that
way); ``confirm_delivery=True`` for publishing. Its Retries middleware always adds jitter: with
``min_backoff=500, max_backoff=2000`` the first retry waits 1–2 s, the closest it gets to a
1 s backoff that never runs early.

The ``dramatiq-results`` row (``results_url`` in the spec): the same, plus the ``Results``
middleware on a ``RedisBackend`` and ``store_results=True`` on the actor, so every job's return
value is stored in Redis before its ack; the harness counts a job once its result is readable.
Keys are namespaced per run (``use_namespace_prefix_keys``: ``<namespace>:<queue>:<actor>:<id>``
rather than an md5 of it) so the harness can read and delete them.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from bench.runners.common import Tally, load_spec, say, wait_go
from bench.wire import payload


def main() -> None:
    spec = load_spec()
    # Dramatiq reads its prefetch from this (lower-case) variable at import.
    os.environ["dramatiq_queue_prefetch"] = str(spec.get("prefetch", 1000))  # noqa: SIM112
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=spec["url"], confirm_delivery=True)
    results = bool(spec.get("results_url"))
    if results:
        from dramatiq.results import Results
        from dramatiq.results.backends import RedisBackend

        backend = RedisBackend(
            url=spec["results_url"],
            namespace=spec["results_ns"],
            use_namespace_prefix_keys=True,
        )
        broker.add_middleware(Results(backend=backend, result_ttl=600_000))
    dramatiq.set_broker(broker)
    finished = threading.Event()
    tally = Tally(spec, finished.set) if not spec["workload"].startswith("publish") else None
    io_s = float(spec.get("io_s", 0.0))

    @dramatiq.actor(
        actor_name=spec["job"],
        queue_name=spec["queue"],
        max_retries=3,
        min_backoff=500,
        max_backoff=2000,
        **({"store_results": True} if results else {}),
    )
    def handle(data: dict[str, Any]) -> None:
        assert tally is not None
        if tally.start(data):
            raise RuntimeError("first attempt fails on purpose")
        if io_s:
            time.sleep(io_s)
        tally.end()

    broker.declare_queue(spec["queue"], ensure=True)
    say("READY")
    wait_go()
    if spec["workload"].startswith("publish"):
        started = time.perf_counter()
        for i in range(spec["n"]):
            handle.send(payload(i))
        elapsed = time.perf_counter() - started
        broker.close()
        say("RESULT", elapsed=elapsed, n=spec["n"])
        return
    assert tally is not None
    tally.go()
    worker = dramatiq.Worker(broker, worker_threads=spec.get("concurrency", 1))
    worker.start()
    say("CONSUMING")
    if spec["workload"] == "consume_2proc":
        tally.watch_idle()
    finished.wait()
    time.sleep(0.2)
    worker.stop()
    broker.close()
    say("RESULT", **tally.result())


if __name__ == "__main__":
    main()
