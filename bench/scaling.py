# ruff: noqa: ASYNC212, ASYNC220, ASYNC221  (a driver: blocking calls happen between measurements)
"""Scaling: jobs/s of ``leveret worker --processes N`` and of N lone workers, on one node and
on a 3-node cluster, with where the time goes (broker CPU, worker CPU).

    python -m bench.scaling [--jobs 20000] [--processes 1,2,4] [--no-cluster] [--out FILE]

Method, per configuration: a fresh queue is filled with ``--jobs`` no-op jobs (``publish_many``
with confirms) *before* any worker starts; then the workers start and the queue's depth
(ready messages, by passive declare) is sampled every 0.25 s. The rate is taken between 10 %
and 90 % drained, so process start-up and the tail are left out. Over the same window the CPU
time of the broker's Erlang VM(s) and of every worker process (supervisor and children, or the
lone workers) is read from ``/proc``: ``cpu %`` is CPU seconds per wall second (100 % = one
core). The handler is ``async def`` doing nothing; settings are the defaults (prefetch 50,
outcome events on, so each job is also an event published with confirms). Single node: the
machine's broker, classic queue, a vhost of its own. Cluster: ``tests/cluster/cluster.py``'s
three nodes on this machine, quorum queues, ``LEVERET_AMQP_URL`` naming all three.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import httpx
from yarl import URL

ROOT = Path(__file__).resolve().parents[1]
LEVERET = str(Path(sys.executable).parent / "leveret")
TICKS = os.sysconf("SC_CLK_TCK")
SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/"


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (its threads included), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def listening_pid(port: int) -> int | None:
    """The pid listening on 127.0.0.1:``port`` (the broker node's Erlang VM)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if re.search(rf"[:.]{port}\s", line):
            m = re.search(r"pid=(\d+)", line)
            if m:
                return int(m.group(1))
    return None


def write_app(directory: Path, queue: str) -> None:
    (directory / "scaleapp.py").write_text(
        textwrap.dedent(
            f"""
            from leveret.consumer import Worker

            worker = Worker()

            @worker.job("scale_job", queue="{queue}")
            async def scale_job(p: dict) -> None:
                return None
            """
        )
    )


class Depth:
    """Ready messages of one queue by passive declare, on one connection kept for the run (to
    the first node of a list: a quorum queue answers from any member)."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url.split(",", maxsplit=1)[0]
        self.queue = queue
        self.conn: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def __call__(self) -> int:
        if self.conn is None:
            self.conn = await aio_pika.connect(self.url)
            self.channel = await self.conn.channel()
        assert self.channel is not None
        q = await self.channel.declare_queue(self.queue, passive=True)
        return int(q.declaration_result.message_count or 0)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def fill(url: str, jobs: int) -> None:
    from leveret.producers import ConnectionSettings, Publisher
    from leveret.producers.publisher import Job

    async with Publisher(settings=ConnectionSettings(amqp_url=url)) as pub:
        for start in range(0, jobs, 1000):
            await pub.publish_many(
                [
                    Job(job="scale_job", payload={"n": i})
                    for i in range(start, min(jobs, start + 1000))
                ]
            )


@dataclass
class Result:
    where: str
    mode: str
    processes: int
    jobs_per_s: float
    broker_cpu: float
    worker_cpu: float


async def run_one(
    where: str,
    url: str,
    broker_pids: list[int],
    mode: str,
    processes: int,
    jobs: int,
    queue_type: str,
) -> Result:
    work = Path(tempfile.mkdtemp(prefix="leveret-scaling-"))
    queue = f"scale-{uuid.uuid4().hex[:8]}"
    write_app(work, queue)
    env = {
        **os.environ,
        "LEVERET_AMQP_URL": url,
        "LEVERET_QUEUE_TYPE": queue_type,
        "LEVERET_METRICS_PORT": "0",
        "LEVERET_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run(
        [LEVERET, "topology", "declare", "scaleapp:worker"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
    )
    await fill(url, jobs)
    procs: list[subprocess.Popen[bytes]] = []
    if mode == "supervisor":
        cmd = [LEVERET, "worker", "scaleapp:worker", "--processes", str(processes)]
        if processes == 1:
            cmd = cmd[:3]
        procs.append(subprocess.Popen(cmd, cwd=work, env=env))
    else:
        for _ in range(processes):
            procs.append(
                subprocess.Popen([LEVERET, "worker", "scaleapp:worker"], cwd=work, env=env)
            )

    def worker_pids() -> list[int]:
        pids = []
        for p in procs:
            pids.append(p.pid)
            pids.extend(children_of(p.pid))
        return pids

    depth = Depth(url, queue)
    samples: list[tuple[float, int, float, float]] = []  # t, left, broker cpu, worker cpu
    worker_cpu_seen: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            left = await depth()
            for pid in worker_pids():
                worker_cpu_seen[pid] = max(worker_cpu_seen.get(pid, 0.0), cpu_seconds(pid))
            samples.append(
                (
                    time.monotonic(),
                    left,
                    sum(cpu_seconds(p) for p in broker_pids),
                    sum(worker_cpu_seen.values()),
                )
            )
            if left == 0:
                break
            await asyncio.sleep(0.25)
    finally:
        await depth.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    hi = next(s for s in samples if s[1] <= jobs * 0.9)
    lo = next(s for s in samples if s[1] <= jobs * 0.1)
    wall = max(lo[0] - hi[0], 1e-6)
    rate = (hi[1] - lo[1]) / wall
    return Result(
        where, mode, processes, rate, (lo[2] - hi[2]) / wall * 100, (lo[3] - hi[3]) / wall * 100
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--no-cluster", action="store_true")
    parser.add_argument("--no-single", action="store_true")
    args = parser.parse_args()
    counts = [int(x) for x in args.processes.split(",")]
    results: list[Result] = []
    places: list[tuple[str, str, list[int], str, object]] = []
    vhost = f"leveret-scaling-{uuid.uuid4().hex[:6]}"
    mgmt = httpx.Client(auth=("guest", "guest"), base_url="http://127.0.0.1:15672/api")
    if not args.no_single:
        mgmt.put(f"/vhosts/{vhost}").raise_for_status()
        mgmt.put(
            f"/permissions/{vhost}/guest", json={"configure": ".*", "write": ".*", "read": ".*"}
        ).raise_for_status()
        pid = listening_pid(5672)
        places.append(
            (
                "single node",
                str(URL(SHARED_URL).with_path("/" + vhost)),
                [pid] if pid else [],
                "classic",
                None,
            )
        )
    cluster = None
    if not args.no_cluster:
        sys.path.insert(0, str(ROOT))
        from tests.cluster.cluster import Cluster

        cluster = Cluster()
        t0 = time.monotonic()
        cluster.start()
        print(f"cluster up in {time.monotonic() - t0:.0f} s", flush=True)
        pids = [p for p in (listening_pid(n.amqp_port) for n in cluster.nodes) if p]
        places.append(("3-node cluster", ",".join(cluster.amqp_urls), pids, "quorum", None))
    try:
        for where, url, broker_pids, queue_type, _ in places:
            for mode in ("supervisor", "separate"):
                for n in counts:
                    if mode == "separate" and n == 1:
                        continue  # the same thing as --processes 1
                    r = await run_one(where, url, broker_pids, mode, n, args.jobs, queue_type)
                    results.append(r)
                    print(
                        f"{where:15} {mode:10} {n}  {r.jobs_per_s:7.0f} jobs/s  "
                        f"broker {r.broker_cpu:4.0f} %  workers {r.worker_cpu:4.0f} %",
                        flush=True,
                    )
    finally:
        if cluster is not None:
            cluster.teardown()
        if not args.no_single:
            mgmt.delete(f"/vhosts/{vhost}")
    print("\n| where | how | processes | jobs/s | broker CPU | worker CPU (all processes) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        how = "`--processes N`" if r.mode == "supervisor" else "N lone workers"
        print(
            f"| {r.where} | {how} | {r.processes} | {r.jobs_per_s:,.0f} | "
            f"{r.broker_cpu:.0f} % | {r.worker_cpu:.0f} % |"
        )


if __name__ == "__main__":
    asyncio.run(main())
