"""Schedules in the product: three `leveret worker` processes of one app, a 1 s schedule.

Unlike ``test_scheduler.py`` (the ``Scheduler`` alone), this runs what a user runs: the CLI
loads the app, every worker process takes part in the election beside its consume loop, and
the ticks are counted where they end up: each run of the scheduled job's handler appends its
job id to a file of its process. The leader is read from each worker's JSON log
(``scheduler_leader``) and from its ``/metrics`` (``leveret_scheduler_leader``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from leveret.consumer.features.schedules.spec import parse_tick
from tests.support import Broker, assert_queue_types, unique
from tests.time.test_scheduler import _consecutive
from tests.time.test_scheduler import _until as _until_bare

pytestmark = pytest.mark.slow

APP = """
import os, time
from leveret.consumer import JobContext, Worker

worker = Worker()
worker.schedule("{job}", every=1, name="tick")  # before its job: checked once loaded

@worker.job("{job}", queue="{queue}", max_attempts=1)
async def tick(payload: dict, ctx: JobContext) -> None:
    with open(os.path.join("{records}", f"ran-{{os.getpid()}}.txt"), "a") as f:
        f.write(f"{{ctx.job_id}} {{time.time()}}\\n")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class WorkerProc:
    proc: subprocess.Popen[str]
    port: int
    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def led_at(self) -> float | None:
        """When this process logged that it leads (the test's clock)."""
        for t, e in self.lines:
            if e.get("event") == "scheduler_leader" and e.get("leader"):
                return t
        return None

    def leader_gauge(self) -> float | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith("leveret_scheduler_leader "):
                return float(line.split()[1])
        return None


@dataclass
class Fleet:
    broker: Broker
    path: Path
    records: Path
    exchange: str
    workers: list[WorkerProc] = field(default_factory=list)

    def start(self, n: int) -> None:
        for _ in range(n):
            port = _free_port()
            env = {**os.environ, "LEVERET_AMQP_URL": self.broker.url,
                   "LEVERET_EXCHANGE": self.exchange, "LEVERET_METRICS_PORT": str(port),
                   "LEVERET_METRICS_HOST": "127.0.0.1"}  # fmt: skip
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "leveret"), "worker", "schedapp:worker"],
                cwd=self.path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            worker = WorkerProc(proc, port)
            threading.Thread(target=self._read, args=(worker,), daemon=True).start()
            self.workers.append(worker)

    @staticmethod
    def _read(worker: WorkerProc) -> None:
        assert worker.proc.stderr is not None
        for line in worker.proc.stderr:
            with contextlib.suppress(ValueError):
                worker.lines.append((time.time(), json.loads(line)))

    def alive(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.proc.poll() is None]

    def leader(self) -> WorkerProc | None:
        leading = [w for w in self.alive() if w.led_at() is not None]
        return max(leading, key=lambda w: w.led_at() or 0.0) if leading else None

    def runs(self) -> list[tuple[str, float]]:
        """Every run of the scheduled job in every process: (job id, when it ran)."""
        out = []
        for file in self.records.glob("ran-*.txt"):
            for line in file.read_text().splitlines():
                job_id, at = line.split()
                out.append((job_id, float(at)))
        return sorted(out, key=lambda r: r[1])

    def stop_all(self) -> list[int]:
        for w in self.alive():
            w.proc.send_signal(signal.SIGTERM)
        codes = []
        for w in self.workers:
            try:
                codes.append(w.proc.wait(20))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                codes.append(w.proc.wait())
        return codes


async def _until(fleet: Fleet, predicate: Any, timeout: float, what: str) -> None:
    """``_until``, saying on failure what each worker last logged."""
    try:
        await _until_bare(predicate, timeout, what)
    except AssertionError as exc:
        tails = [(w.proc.poll(), [e.get("event") for _, e in w.lines[-6:]]) for w in fleet.workers]
        raise AssertionError(f"{exc}; workers (exit code, last events): {tails}") from None


def _ids(runs: list[tuple[str, float]]) -> list[str]:
    return [job_id for job_id, _ in runs]


async def test_three_workers_run_each_tick_once_and_survive_a_sigkilled_leader(
    broker: Broker, tmp_path: Path, queue_type: str
) -> None:
    """On both queue types: the tick job's queue is ``LEVERET_QUEUE_TYPE``'s (the workers inherit
    it); the election queue is the scheduler's own."""
    records = tmp_path / "records"
    records.mkdir()
    job, queue = unique("tickjob"), unique("ticks")
    (tmp_path / "schedapp.py").write_text(
        textwrap.dedent(APP).format(job=job, queue=queue, records=records)
    )
    fleet = Fleet(broker, tmp_path, records, unique("wsx"))
    fleet.start(3)
    try:
        await _until(fleet, lambda: fleet.leader() is not None, 30, "a leader")
        await _until(fleet, lambda: broker.queue_exists(f"{queue}.dlq"), 30, "the tick queue")
        assert_queue_types(broker, queue, queue_type)
        # Phase 1: ~20 ticks with three replicas, each run exactly once.
        await _until(fleet, lambda: len(fleet.runs()) >= 20, 40, "20 ticks")
        leader = fleet.leader()
        assert leader is not None
        gauges = {w.port: w.leader_gauge() for w in fleet.workers}
        assert gauges[leader.port] == 1.0, gauges  # visible in its metrics
        assert sorted(g or 0.0 for g in gauges.values()) == [0.0, 0.0, 1.0], gauges
        assert [w for w in fleet.workers if w.led_at() is not None] == [leader]
        runs = fleet.runs()
        ids = _ids(runs)
        assert all(i.startswith("tick@") and i.endswith("Z") for i in ids), ids
        assert not [i for i, n in Counter(ids).items() if n > 1], ids  # no tick twice
        ticks = [parse_tick(i.split("@", 1)[1]) for i in ids]
        assert _consecutive(ticks), ids  # none missing
        for job_id, ran in runs:  # never early; published within 1 s, run soon after
            late = ran - parse_tick(job_id.split("@", 1)[1]).timestamp()
            assert 0 <= late < 1.5, (job_id, late)

        # Phase 2: SIGKILL the leader mid-run.
        os.kill(leader.proc.pid, signal.SIGKILL)
        killed_at = time.time()
        leader.proc.wait()
        await _until(fleet, lambda: fleet.leader() not in (None, leader), 10, "a new leader")
        new = fleet.leader()
        assert new is not None
        assert (new.led_at() or 0.0) - killed_at < 5.0
        count = len(fleet.runs())
        await _until(fleet, lambda: len(fleet.runs()) >= count + 6, 20, "6 ticks after the kill")
        assert new.leader_gauge() == 1.0
    finally:
        codes = fleet.stop_all()
    ids = _ids(fleet.runs())
    doubles = {i: n for i, n in Counter(ids).items() if n > 1}
    assert len(doubles) <= 1 and all(n == 2 for n in doubles.values()), doubles
    assert _consecutive([parse_tick(i.split("@", 1)[1]) for i in ids]), ids  # none missing
    survivors = [c for w, c in zip(fleet.workers, codes, strict=True) if w is not leader]
    assert survivors == [0, 0], codes  # SIGTERM still exits 0 with a scheduler beside
