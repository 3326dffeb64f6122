"""``leveret worker APP --processes N``: one supervisor, N worker processes, one endpoint.

One worker process is bounded by one core (the AMQP client, JSON and the handlers' Python all
run on its loop), so a machine with cores to spare runs several. The supervisor runs no jobs:

* it starts N children, each ``python -m leveret worker APP …`` (a fresh interpreter, not a
  fork: nothing of the supervisor's state, sockets or loop leaks into a child), marked with
  ``LEVERET_SUPERVISED`` so a child never supervises in turn;
* a child that dies is started again, with a growing delay while it keeps dying soon after its
  start (an app that fails at import would otherwise be a crash loop at 100 % CPU); each
  restart is logged with its count;
* SIGTERM or SIGINT: forwards one SIGTERM to every child (each then drains like a lone worker
  within ``LEVERET_SHUTDOWN_GRACE``), waits for them (grace + a margin, then SIGKILL) and exits
  0. The children are in their own session, so a Ctrl-C on the terminal reaches them once,
  through the supervisor, not twice (a second signal makes a worker give up its jobs); and
  ``PR_SET_PDEATHSIG`` stops them if the supervisor itself is killed;
* one ``/metrics`` for all: the children write their metrics to files in a private
  ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and the supervisor's
  endpoint reads them all with ``MultiProcessCollector``; counters add up over the children,
  living and dead, gauges combine as ``consumer/runtime/metrics.py`` says;
* one ``/readyz``: 200 only while every child is running and its own ``/readyz`` (on
  127.0.0.1, a port the supervisor picked) answers 200, i.e. all N are connected and
  consuming. Polled every ``POLL_S``; ``/healthz`` is the supervisor's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from leveret.consumer.runtime.health import HealthServer
from leveret.consumer.settings import WorkerSettings

log = structlog.get_logger("leveret.supervisor")

SUPERVISED_ENV = "LEVERET_SUPERVISED"
POLL_S = 1.0
# A child that lived less than this before dying counts as failing at start: its next start
# waits longer (RESTART_MIN_S doubling up to RESTART_MAX_S); one that ran longer restarts at once.
STABLE_AFTER_S = 10.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
# After the grace period, how long children get to send their last acks and close.
STOP_MARGIN_S = 15.0
PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    """A port free on 127.0.0.1 right now, for one child's own health endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the supervisor dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _child_ready(port: int) -> bool:
    """GET the child's ``/readyz``: True on 200, False on anything else or no answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 2)
        return status.split()[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False
    finally:
        writer.close()


@dataclass(eq=False)
class Child:
    """One slot of N: the process in it now, and how its recent starts went."""

    slot: int
    process: asyncio.subprocess.Process | None = None
    port: int = 0
    started_at: float = 0.0
    restarts: int = 0
    quick_failures: int = 0  # deaths in a row soon after a start
    ready: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    """Runs ``argv`` (the worker command line without ``--processes``) in N processes."""

    def __init__(self, argv: list[str], processes: int, settings: WorkerSettings) -> None:
        self.argv = argv
        self.processes = processes
        self.settings = settings
        self.children = [Child(slot) for slot in range(processes)]
        self.stopping = asyncio.Event()
        self.metrics_dir = tempfile.mkdtemp(prefix="leveret-metrics-")
        self.registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(self.registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        self.health_port: int | None = None
        self.killed = 0  # children that had to be SIGKILLed at shutdown

    @property
    def ready(self) -> bool:
        return not self.stopping.is_set() and all(
            c.ready and c.process is not None and c.process.returncode is None
            for c in self.children
        )

    def _env(self, child: Child) -> dict[str, str]:
        env = dict(os.environ)
        env[SUPERVISED_ENV] = str(child.slot)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        if self.settings.metrics_port:
            env["LEVERET_METRICS_HOST"] = "127.0.0.1"
            env["LEVERET_METRICS_PORT"] = str(child.port)
        else:
            env["LEVERET_METRICS_PORT"] = "0"
        return env

    async def _start(self, child: Child) -> None:
        child.port = _free_port() if self.settings.metrics_port else 0
        child.ready = False
        child.exited = asyncio.Event()
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "leveret",
            *self.argv,
            env=self._env(child),
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        child.started_at = time.monotonic()
        log.info(
            "worker_process_started",
            slot=child.slot,
            pid=child.process.pid,
            restarts=child.restarts,
        )

    async def _watch(self, child: Child) -> None:
        """Keep the slot filled until stopping: wait for the child to exit, restart it."""
        while True:
            await self._start(child)
            assert child.process is not None
            pid = child.process.pid
            if self.stopping.is_set():  # stopped while it was starting: _stop_children missed it
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
            code = await child.process.wait()
            child.ready = False
            mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            child.exited.set()
            if self.stopping.is_set():
                log.info("worker_process_stopped", slot=child.slot, pid=pid, exit_code=code)
                return
            lived = time.monotonic() - child.started_at
            child.quick_failures = child.quick_failures + 1 if lived < STABLE_AFTER_S else 0
            delay = (
                min(RESTART_MAX_S, RESTART_MIN_S * 2 ** (child.quick_failures - 1))
                if child.quick_failures
                else 0.0
            )
            child.restarts += 1
            log.warning(
                "worker_process_died",
                slot=child.slot,
                pid=pid,
                exit_code=code,
                lived_s=round(lived, 1),
                restarts=child.restarts,
                failures_in_a_row=child.quick_failures,
                restart_in_s=delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return

    async def _poll(self) -> None:
        """Each child's readiness, every ``POLL_S``: what the supervisor's ``/readyz`` says."""
        while not self.stopping.is_set():
            for child in self.children:
                alive = child.process is not None and child.process.returncode is None
                child.ready = alive and child.port > 0 and await _child_ready(child.port)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), POLL_S)

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info(
                "supervisor_stopping",
                processes=self.processes,
                grace_s=self.settings.shutdown_grace,
            )
            self.stopping.set()

    async def _stop_children(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = self.settings.shutdown_grace + STOP_MARGIN_S
        running = [c for c in self.children if c.process and c.process.returncode is None]
        waits = [asyncio.ensure_future(c.process.wait()) for c in running if c.process]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=deadline)
            for child in running:
                if child.process is not None and child.process.returncode is None:
                    log.error(
                        "worker_process_killed",
                        slot=child.slot,
                        pid=child.process.pid,
                        after_s=deadline,
                    )
                    self.killed += 1
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
            if pending:
                await asyncio.wait(pending, timeout=10)

    async def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; the exit code (0 unless a child had to be killed)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        log.info("supervisor_starting", processes=self.processes, pid=os.getpid())
        health: HealthServer | None = None
        try:
            if self.settings.metrics_port:
                health = HealthServer(
                    self.settings.metrics_host,
                    self.settings.metrics_port,
                    self.registry,
                    lambda: self.ready,
                )
                await health.start()
                self.health_port = health.port
            watchers = [asyncio.create_task(self._watch(c)) for c in self.children]
            poller = asyncio.create_task(self._poll())
            await self.stopping.wait()
            poller.cancel()
            await self._stop_children()
            await asyncio.gather(*watchers, poller, return_exceptions=True)
        finally:
            if health is not None:
                await health.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info(
            "supervisor_stopped",
            restarts=sum(c.restarts for c in self.children),
            killed=self.killed,
        )
        return 1 if self.killed else 0
