"""``leveret worker APP --processes N``: both children run jobs, one ``/metrics`` adds them up,
``/readyz`` is 200 only while every child is ready, a killed child is restarted, and SIGTERM
stops all with exit 0 and no job lost. Real processes, real broker."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from leveret.producers import Publisher
from leveret.producers.publisher import Job
from tests.processes.apps import (
    JOB,
    Runs,
    WorkerProcess,
    metric_sum,
    readyz,
    wait_status,
    write_app,
)
from tests.support import Broker, unique, wait_for

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _publish(broker: Broker, payloads: list[dict[str, object]]) -> list[str]:
    async with Publisher(broker.url) as pub:
        return await pub.publish_many([Job(job=JOB, payload=p) for p in payloads])


def _start(tmp_path: Path, broker: Broker, *args: str) -> tuple[WorkerProcess, int, str, Path]:
    queue = unique("proc")
    write_app(tmp_path, queue)
    port = _free_port()
    out = tmp_path / "runs.txt"
    env = {
        "LEVERET_AMQP_URL": broker.url,
        "LEVERET_METRICS_PORT": str(port),
        "LEVERET_TEST_OUT": str(out),
        "LEVERET_SHUTDOWN_GRACE": "20",
    }
    return WorkerProcess(tmp_path, env, *args), port, queue, out


def _child_pids(w: WorkerProcess) -> list[int]:
    """The pids of the children running now, from the supervisor's log."""
    started = {int(e["slot"]): int(e["pid"]) for e in w.events("worker_process_started")}  # type: ignore[call-overload]
    return list(started.values())


async def test_two_processes_share_the_work_one_metrics_one_readyz_and_survive_a_kill(
    tmp_path: Path, broker: Broker
) -> None:
    w, port, queue, out = _start(tmp_path, broker, "--processes", "2", "--prefetch", "5")
    try:
        w.wait_event("worker_process_started", 2)
        await asyncio.to_thread(wait_status, port, 200, 40)
        # Two children, each with its own log line saying which node it consumes from.
        w.wait_event("consuming", 2)
        pids = _child_pids(w)
        assert len(set(pids)) == 2 and os.getpid() not in pids

        ids = await _publish(broker, [{"n": i, "sleep": 0.02} for i in range(200)])
        await wait_for(lambda: len(Runs.read(out).ids("ok")) == 200, 60, "200 jobs run")
        runs = Runs.read(out)
        assert runs.ids("ok") == set(ids)
        assert runs.pids() == set(pids), "both processes ran jobs"
        # One endpoint, both children's counters added up.
        assert (
            metric_sum(port, "leveret_jobs_completed_total", job_name=JOB, outcome="succeeded")
            == 200
        )
        assert metric_sum(port, "leveret_worker_prefetch", queue=queue) == 10  # 5 + 5

        # kill -9 one child: not ready at once, restarted, ready again, jobs flow on both.
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        await asyncio.to_thread(wait_status, port, 503, 10)
        died = w.wait_event("worker_process_died", 1)
        assert died[0]["pid"] == victim and died[0]["restarts"] == 1
        await asyncio.to_thread(wait_status, port, 200, 40)
        recovered_s = time.monotonic() - t0
        new_pids = _child_pids(w)
        assert victim not in new_pids and len(set(new_pids)) == 2
        more = await _publish(broker, [{"n": i, "sleep": 0.02} for i in range(200)])
        await wait_for(lambda: set(more) <= Runs.read(out).ids("ok"), 60, "200 more jobs run")
        late = Runs.read(out).lines[-150:]
        assert {r[1] for r in late} == set(new_pids), "the restarted child takes jobs too"
        # The dead child's counts stay in the sum (its counter files remain).
        assert (
            metric_sum(port, "leveret_jobs_completed_total", job_name=JOB, outcome="succeeded")
            == 400
        )
        print(f"kill -9 of one child: ready again after {recovered_s:.1f} s")
    finally:
        code = w.stop()
    assert code == 0, w.tail()


async def test_sigterm_stops_all_with_exit_0_and_no_job_lost(
    tmp_path: Path, broker: Broker
) -> None:
    """Jobs in flight when SIGTERM comes finish (grace); the rest stay queued: each confirmed
    job either ran once or is still in the queue, none both, none neither."""
    w, port, queue, out = _start(tmp_path, broker, "--processes", "2", "--prefetch", "10")
    try:
        await asyncio.to_thread(wait_status, port, 200, 40)
        ids = await _publish(broker, [{"n": i, "sleep": 0.2} for i in range(600)])
        await wait_for(lambda: len(Runs.read(out).lines) >= 60, 60, "some jobs run")
        w.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(w.proc.wait, 60)
    finally:
        w.stop()
    assert code == 0, w.tail()
    assert len(w.events("worker_process_stopped")) == 2
    assert not w.events("worker_process_killed")
    runs = Runs.read(out)
    finals = runs.finals()
    assert max(finals.values()) == 1, "a job ran twice"
    left = await broker.depth(queue)
    assert 0 < left < 600, "SIGTERM came mid-run"
    assert len(runs.ids("ok")) + left == len(ids), (len(runs.ids("ok")), left)


def test_a_child_that_dies_at_start_is_restarted_with_growing_delays(tmp_path: Path) -> None:
    """An app that cannot start in a child (here: its out file setting is missing, so the
    import fails): the children die again and again, restarted with a growing delay and a
    count, never at 100 % CPU; SIGTERM still ends it all with 0."""
    queue = unique("proc")
    write_app(tmp_path, queue)
    port = _free_port()
    env = {"LEVERET_METRICS_PORT": str(port), "LEVERET_TEST_OUT": str(tmp_path / "x")}
    # The supervisor imports the app (fine, LEVERET_TEST_OUT is set); the children's import
    # fails: a "sitecustomize" only they see removes the variable.
    site = tmp_path / "childsite"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('LEVERET_SUPERVISED'):\n"
        "    os.environ.pop('LEVERET_TEST_OUT', None)\n"
    )
    env["PYTHONPATH"] = str(site)
    w = WorkerProcess(tmp_path, env, "--processes", "2")
    try:
        died = w.wait_event("worker_process_died", 6, timeout=30)
        slot0 = [e for e in died if e["slot"] == 0]
        delays = [float(e["restart_in_s"]) for e in slot0]  # type: ignore[arg-type]
        assert delays == sorted(delays) and delays[-1] > delays[0], delays
        assert [e["restarts"] for e in slot0] == list(range(1, len(slot0) + 1))
        assert readyz(port) == 503
    finally:
        code = w.stop()
    assert code == 0, w.tail()
