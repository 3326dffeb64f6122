"""``Readiness``: what ``/readyz`` and ``leveret_worker_ready`` report for one worker.

Ready means connected and consuming *and* able to start a plain ``def`` job: when every job
thread is stuck in a ``def`` handler that timed out (Python cannot stop a thread, see
``JobThreads``), the worker takes deliveries it cannot run, so it says so rather than look
healthy. And nothing it depends on to settle a job is stalled (``stall``): the status store
unreachable for longer than ``LEVERET_STATUS_TIMEOUT`` holds every ack, so the worker says so.
"""

from __future__ import annotations

from leveret.consumer.runtime.metrics import WorkerMetrics
from leveret.consumer.runtime.threads import JobThreads


class Readiness:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics
        self.connected = False
        self._threads: JobThreads | None = None
        self._stalled: set[str] = set()

    @property
    def ready(self) -> bool:
        return (
            self.connected
            and not self._stalled
            and not (self._threads is not None and self._threads.exhausted)
        )

    def stall(self, what: str, stalled: bool) -> None:
        """``what`` (e.g. ``status_store``) cannot serve the worker right now: not ready."""
        if stalled:
            self._stalled.add(what)
        else:
            self._stalled.discard(what)
        self.set_connected(self.connected)

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._metrics.connected.set(1 if self.ready else 0)

    def watch(self, threads: JobThreads) -> None:
        """Follow ``threads`` running out (and recovering): logged, counted, not ready."""
        self._threads = threads
        threads.on_exhausted_change = self._on_exhausted

    def _on_exhausted(self, exhausted: bool) -> None:
        assert self._threads is not None
        self._metrics.threads_stuck.set(self._threads.stuck)
        self._threads.log_exhausted(exhausted)
        self.set_connected(self.connected)
