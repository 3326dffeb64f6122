"""What every runner shares: the spec, the stdout protocol and the per-job tally.

Kept to the standard library so a runner's memory is the library's, not the harness's.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any


def load_spec() -> dict[str, Any]:
    return json.loads(sys.argv[1])


def run_on_loop(spec: dict[str, Any], coro: Coroutine[Any, Any, None]) -> None:
    """Run the runner's coroutine on the loop its row names: uvloop for ``*-uvloop`` rows.

    The peers that run on asyncio get their uvloop row the same way a user gets it, by running
    their code under ``uvloop.run`` (aio-pika, FastStream and taskiq have no loop option).
    """
    if spec.get("uvloop"):
        import uvloop

        uvloop.run(coro)
    else:
        import asyncio

        asyncio.run(coro)


def shares_queue(spec: dict[str, Any]) -> bool:
    """More than one consumer process on the run's queue (``consume_2proc``, or a row such as
    ``aiopika-uvloop-4p``): none can tell from its own count that the queue is drained, so each
    stops once jobs stopped coming (``Tally.watch_idle``) and the harness adds up their counts."""
    return spec["workload"] == "consume_2proc" or int(spec.get("processes", 1)) > 1


def say(tag: str, **data: Any) -> None:
    """One protocol line on stdout (the only thing a runner writes there)."""
    sys.__stdout__.write(f"{tag} {json.dumps(data)}\n")
    sys.__stdout__.flush()


def wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "GO":
        raise SystemExit(f"runner: expected GO, got {line!r}")


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Tally:
    """Counts handler runs and keeps the times the harness turns into figures.

    Thread-safe, since Dramatiq and Celery run handlers on threads. Times are ``time.time()``
    so that two processes' tallies can be put on one axis.
    """

    def __init__(self, spec: dict[str, Any], on_done: Callable[[], None]) -> None:
        self.n = int(spec["n"])
        self.mode = spec["workload"]
        self.io_s = float(spec.get("io_s", 0.0))
        self.backoff_s = float(spec.get("backoff_s", 1.0))
        self.count = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.latencies: list[float] = []
        self.lateness: list[float] = []
        self.failed_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._on_done = on_done
        self.done = False
        self.cpu_at_go = 0.0

    def go(self) -> None:
        self.cpu_at_go = cpu_s()

    def start(self, payload: dict[str, Any]) -> bool:
        """Called when a handler starts; returns True when this run must fail (retry workload)."""
        now = time.time()
        with self._lock:
            if not self.t_first:
                self.t_first = now
                self.cpu_at_go = cpu_s()  # CPU from the first job on: start-up not counted
            ts = payload.get("ts")
            if ts and self.mode == "latency":
                self.latencies.append(now - ts)
            if self.mode == "retry":
                i = payload["i"]
                failed = self.failed_at.get(i)
                if failed is None:
                    self.failed_at[i] = now
                    return True
                self.lateness.append(now - failed - self.backoff_s)
        return False

    def end(self) -> None:
        now = time.time()
        with self._lock:
            self.count += 1
            self.t_last = now
            finished = self.count == self.n and not self.done
            if finished:
                self.done = True
        if finished:
            self._on_done()

    def watch_idle(self, idle_s: float = 1.0) -> None:
        """Finish once jobs stopped coming for ``idle_s`` (when processes share one queue)."""

        watching = time.time()

        def watch() -> None:
            # A process that got no job at all (the other took the whole queue) stops too.
            while True:
                time.sleep(0.05)
                with self._lock:
                    quiet = time.time() - max(self.t_last, watching)
                    idle = quiet > (idle_s if self.count else 3 * idle_s) and not self.done
                    if idle:
                        self.done = True
                if idle:
                    self._on_done()
                    return

        threading.Thread(target=watch, daemon=True).start()

    def result(self, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "handled": self.count,
            "t_first": self.t_first,
            "t_last": self.t_last,
            "cpu_s": cpu_s() - self.cpu_at_go,
            "rss_hwm_kib": proc_status_kib("VmHWM"),
        }
        if self.latencies:
            out["latencies"] = self.latencies
        if self.lateness:
            out["lateness"] = self.lateness
        out.update(extra)
        return out


def io_sleep_s(spec: dict[str, Any]) -> float:
    return float(spec.get("io_s", 0.0))


def pid() -> int:
    return os.getpid()
