"""Node loss for the features beyond the round trip: delayed jobs, their statuses and dedup keys,
and schedules, on the 3-node cluster with quorum queues, a node stopped mid-run and started again.

Every process is given all three nodes in ``LEVERET_AMQP_URL`` and fails over by itself; the node
stopped is the one that matters most (the worker's and the publisher's node, which also leads the
quorum queues they declared; for schedules, the node holding the election queue and the leader's
connection where they coincide). What must hold:

* delays: every confirmed delayed job runs once its delay is over (never early), whether it was
  due before, during or after the outage; its status reads ``succeeded``; a dedup key held while
  its job waits answers with that job's id (during the outage too) and is free once it ended;
* schedules: no tick is missed, at most one tick runs twice per takeover.

On RabbitMQ 3.10.8 the delay chain loses jobs in some runs (see ``STRANDED``): that test is an
xfail when, and only when, the jobs it lost are the ones stuck in the delay queues.

Figures (lateness, takeover time, duplicates) are printed, as ``test_node_loss.py`` does, and
recorded in docs/reliability.md's node-loss table. Each test deletes its queues at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest
import redis.asyncio as aioredis
from yarl import URL

from leveret.consumer.features.schedules.spec import parse_tick
from leveret.producers import ConnectionSettings, Publisher
from leveret.producers.broker.connection import connected_url
from leveret.producers.publisher import Job
from tests.cluster.cluster import Cluster
from tests.processes.apps import readyz, wait_status
from tests.support import unique, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(420)]

STATUS_URL = "redis://127.0.0.1:6379/13"

APP = """
import os, time
from leveret.consumer import JobContext, Worker

worker = Worker()
OUT = os.environ["LEVERET_TEST_OUT"]
{schedule}

def record(ctx):
    line = f"{{ctx.job_id}} {{os.getpid()}} {{ctx.attempt}} {{time.time()}}\\n"
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)

@worker.job("{job}", queue="{queue}", max_attempts=3, backoff=0.5)
async def job(payload: dict, ctx: JobContext) -> dict:
    record(ctx)
    return {{"n": payload.get("n")}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runs(path: Path) -> list[tuple[str, int, int, float]]:
    """(job id, pid, attempt, when it ran) per line of the app's out file."""
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().splitlines():
        job_id, pid, attempt, at = raw.split()
        out.append((job_id, int(pid), int(attempt), float(at)))
    return out


class Proc:
    """``leveret worker app:worker`` with its JSON log in a file (tests/processes/apps.py's
    ``WorkerProcess`` loads a fixed app module; this one loads ``app``)."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.log_path = cwd / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.port = int(env["LEVERET_METRICS_PORT"])
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "leveret"), "worker", "app:worker"],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self._log.close()


class ReadyWatch(threading.Thread):
    """When the worker's /readyz went non-200 and 200 again."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.transitions = port, []  # type: ignore[var-annotated]
        self.done = threading.Event()

    def run(self) -> None:
        last = None
        while not self.done.is_set():
            status = readyz(self.port)
            if status != last:
                self.transitions.append((time.monotonic(), status))
                last = status
            time.sleep(0.1)

    def not_ready_after(self, t0: float) -> float | None:
        down = [t for t, s in self.transitions if t >= t0 and s != 200]
        if not down:
            return 0.0
        up = [t for t, s in self.transitions if t > down[0] and s == 200]
        return up[0] - down[0] if up else None


def _node_index(cluster: Cluster, port: int) -> int:
    return next(i for i, n in enumerate(cluster.nodes) if n.amqp_port == port)


async def _delete_queues(cluster: Cluster, via: int, prefixes: tuple[str, ...]) -> int:
    """Delete the cluster's queues whose names start with one of ``prefixes`` (quorum queues
    left behind are Raft groups on every node)."""
    names = [
        q["name"]
        for q in await asyncio.to_thread(cluster.api, via, "/api/queues/%2F?columns=name")
        if q["name"].startswith(prefixes)
    ]
    conn = await aio_pika.connect(cluster.amqp_urls[via])
    try:
        ch = await conn.channel()
        for name in names:
            await ch.queue_delete(name)
    finally:
        await conn.close()
    return len(names)


def _write_app(directory: Path, job: str, queue: str, schedule: str = "") -> None:
    (directory / "app.py").write_text(
        textwrap.dedent(APP).format(job=job, queue=queue, schedule=schedule)
    )


# The known failure, taken as an xfail only when it explains every lost job (any other loss
# fails the test; a run that loses nothing passes: it happens in about 1 run of 4 here).
STRANDED = (
    "bug (RabbitMQ 3.10.8's at-least-once dead-lettering, which topology/model.py "
    "Topology.delay_arguments turns on for the quorum delay chain): jobs that had expired in a "
    "delay queue whose Raft leader was on the stopped node stay counted in that queue's "
    "messages_dlx and are never forwarded by the new leader (still there 60+ s after the node "
    "came back); 7 and 18 of 64 confirmed delayed jobs never ran in two runs. RabbitMQ fixed "
    "DLX-worker handover bugs after 3.10.8 (rabbitmq-server#7677, backported to 3.10.x)"
)


async def _stranded(cluster: Cluster, via: int, exchange: str) -> int:
    """Messages the delay queues of ``exchange`` hold as dead-lettered but not yet forwarded."""
    queues = await asyncio.to_thread(cluster.api, via, "/api/queues/%2F")
    return sum(
        int(q.get("messages_dlx") or 0) for q in queues if q["name"].startswith(f"{exchange}.")
    )


DELAYED = 60  # jobs, published in one batch just before the stop
KEYED = 10  # of them with a dedup key, due after the outage (the key is held throughout)


def _delay(i: int) -> float:
    """2..31 s for the plain jobs: due before, during and after the outage (the node takes
    about 10 s to stop and is started 5 s later); 40..49 s for the keyed ones."""
    return 40 + i if i < KEYED else 2 + i % 30


async def test_delayed_jobs_statuses_and_dedup_keys_survive_a_node_stop(
    cluster: Cluster, tmp_path: Path
) -> None:
    urls = ",".join(cluster.amqp_urls)
    exchange, queue, job = unique("nlx"), unique("nldelay"), unique("nljob")
    _write_app(tmp_path, job, queue)
    out = tmp_path / "runs.txt"
    port = _free_port()
    env = {
        "LEVERET_AMQP_URL": urls,
        "LEVERET_EXCHANGE": exchange,
        "LEVERET_QUEUE_TYPE": "quorum",
        "LEVERET_STATUS_URL": STATUS_URL,
        "LEVERET_METRICS_PORT": str(port),
        "LEVERET_TEST_OUT": str(out),
        "LEVERET_SHUTDOWN_GRACE": "10",
        "LEVERET_LOG_LEVEL": "info",
    }
    keys = [unique("nlkey") for _ in range(KEYED)]
    made: list[str] = []  # job ids whose status keys go afterwards
    stats: dict[str, Any] = {}
    w = Proc(tmp_path, env)
    watch = ReadyWatch(port)
    try:
        await asyncio.to_thread(wait_status, port, 200, 90)
        consuming = await wait_for(lambda: w.events("consuming"), 30, "the worker to consume")
        worker_port = URL(str(consuming[0]["node"])).port
        assert worker_port is not None
        victim = _node_index(cluster, worker_port)
        alive = (victim + 1) % 3
        leaders = {
            q["name"]: q.get("leader")
            for q in await asyncio.to_thread(cluster.api, alive, "/api/queues/%2F")
            if q["name"].startswith((queue, f"{exchange}.delay."))
        }
        stats["stopped node"] = cluster.nodes[victim].name
        stats["quorum leaders on it"] = sum(
            v == cluster.nodes[victim].name for v in leaders.values()
        )
        watch.start()

        settings = ConnectionSettings(amqp_url=urls, exchange=exchange, publish_timeout=15)
        # The publisher on the victim too, so that it fails over as well.
        for _ in range(12):
            pub = Publisher(settings=settings, status_url=STATUS_URL)
            await pub.connect()
            if URL(connected_url(urls)).port == worker_port:
                break
            await pub.close()
        stats["publisher on it"] = URL(connected_url(urls)).port == worker_port
        try:
            due: dict[str, float] = {}
            jobs = [
                Job(
                    job=job,
                    payload={"n": i},
                    delay=_delay(i),
                    dedup_key=keys[i] if i < KEYED else None,
                )
                for i in range(DELAYED)
            ]
            sent = time.time()
            ids = await pub.publish_many(jobs)
            made += ids
            for i, job_id in enumerate(ids):
                due[job_id] = sent + _delay(i)
            keyed = dict(zip(keys, ids[:KEYED], strict=True))
            # Held: the same key answers with the waiting job's id and enqueues nothing.
            for key in keys[:3]:
                assert await pub.publish(job, {"n": -1}, dedup_key=key) == keyed[key]

            stopped: dict[str, float] = {}

            def bounce() -> None:
                stopped["at"], stopped["wall"] = time.monotonic(), time.time()
                cluster.stop_node(victim)
                stopped["down"] = time.monotonic()
                time.sleep(5)
                cluster.start_node(victim)
                stopped["up"], stopped["up_wall"] = time.monotonic(), time.time()

            await asyncio.sleep(1)
            bouncer = threading.Thread(target=bounce, daemon=True)
            bouncer.start()
            # During the outage: keyed publishes still answer (Redis holds the claims) and
            # new delayed jobs are confirmed once the publisher has failed over.
            await wait_for(lambda: "down" in stopped, 120, "the node to stop", interval=0.2)
            t_held = time.monotonic()
            for key in keys[3:6]:
                assert await pub.publish(job, {"n": -2}, dedup_key=key) == keyed[key]
            stats["held-key publishes in the outage s"] = round(time.monotonic() - t_held, 2)
            late_sent = time.time()
            t_pub = time.monotonic()
            while True:
                try:
                    extra = await pub.publish_many(
                        [Job(job=job, payload={"n": 100 + d}, delay=d) for d in (1, 3, 6, 10)]
                    )
                    break
                except Exception as exc:  # a publish caught by the failover: publish again
                    stats.setdefault("publish errors", []).append(type(exc).__name__)
                    await asyncio.sleep(0.5)
            stats["publish in the outage s"] = round(time.monotonic() - t_pub, 2)
            made += extra
            for job_id, d in zip(extra, (1, 3, 6, 10), strict=True):
                due[job_id] = late_sent + d
            await asyncio.to_thread(bouncer.join, 180)
            assert "up" in stopped, "the node did not come back"

            with contextlib.suppress(AssertionError):
                await wait_for(
                    lambda: set(due) <= {r[0] for r in _runs(out)},
                    60,
                    "every confirmed delayed job to run",
                    interval=0.5,
                )
            runs = _runs(out)
            lost = set(due) - {r[0] for r in runs}
            if lost:
                stranded = await _stranded(cluster, alive, exchange)
                stats["stranded in messages_dlx"] = stranded
                stats["lost due at s from the stop"] = sorted(
                    round(due[j] - stopped["wall"], 1) for j in lost
                )
            first_run = {}
            for job_id, _, _, at in runs:
                first_run.setdefault(job_id, at)
            lateness = {j: first_run[j] - due[j] for j in due if j in first_run}
            early = {j: round(v, 3) for j, v in lateness.items() if v < -0.05}
            assert not early, f"jobs ran before their delay was over: {early}"

            # Every status ends right (read through the publisher, as a client would):
            # succeeded for each job that ran, queued for one still held by the broker.
            async def statuses_right() -> bool:
                for job_id in due:
                    status = await pub.status(job_id)
                    wanted = "queued" if job_id in lost else "succeeded"
                    if status is None or status.state != wanted:
                        return False
                return True

            await wait_for(statuses_right, 30, "every status to read right", interval=0.5)
            # A key is free once its job ended (the same key enqueues a new job), and still
            # held by a job the broker still holds.
            for key in keys:
                again = await pub.publish(job, {"n": -3}, dedup_key=key)
                if keyed[key] in lost:
                    assert again == keyed[key], f"{key} freed while its job is still queued"
                    continue
                made.append(again)
                assert again != keyed[key], f"{key} still held after its job ended"
            await wait_for(
                lambda: set(made) - lost <= {r[0] for r in _runs(out)}, 30, "the re-keyed jobs"
            )
        finally:
            await pub.close()

        wall_down, wall_up = stopped["wall"], stopped["up_wall"]
        in_outage = [v for j, v in lateness.items() if wall_down <= due[j] <= wall_up + 1]
        before = [v for j, v in lateness.items() if due[j] < wall_down]
        after = [v for j, v in lateness.items() if due[j] > wall_up + 1]
        finals = Counter(r[0] for r in runs)
        watch.done.set()
        not_ready = watch.not_ready_after(stopped["at"])
        stats.update(
            jobs=len(due),
            lost=len(lost),
            duplicated=sum(1 for c in finals.values() if c > 1),
            node_stop_s=round(stopped["down"] - stopped["at"], 1),
            outage_s=round(stopped["up"] - stopped["at"], 1),
            worker_not_ready_s=None if not_ready is None else round(not_ready, 1),
            late_max_due_before_s=round(max(before, default=0), 2),
            late_max_due_in_outage_s=round(max(in_outage, default=0), 2),
            due_in_outage=len(in_outage),
            late_max_due_after_s=round(max(after, default=0), 2),
        )
        assert not_ready is not None, "the worker never became ready again"
        if lost:
            explained = len(lost) <= stats["stranded in messages_dlx"]
            assert explained, f"{len(lost)} confirmed delayed jobs lost: {stats}"
            pytest.xfail(STRANDED)
    finally:
        watch.done.set()
        code = w.stop()
        print("\nnode loss, delays/status/dedup:", stats)
        client = aioredis.Redis.from_url(STATUS_URL)
        names = [f"leveret:{i}" for i in made] + [f"leveret:dedup-job:{i}" for i in made]
        names += [f"leveret:dedup:{k}" for k in keys] + [f"leveret:cancel:{i}" for i in made]
        await client.delete(*names)
        await client.aclose()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(cluster.wait_running, 3)
            await _delete_queues(cluster, 0, (queue, f"{exchange}."))
    assert code == 0, w.tail()


SCHEDULE = 'worker.schedule("{job}", every=1, name="tick")'


async def test_schedules_miss_no_tick_through_a_node_stop(cluster: Cluster, tmp_path: Path) -> None:
    urls = ",".join(cluster.amqp_urls)
    exchange, queue, job = unique("nsx"), unique("nsched"), unique("nstick")
    _write_app(tmp_path, job, queue, SCHEDULE.format(job=job))
    out = tmp_path / "runs.txt"
    base = {
        "LEVERET_AMQP_URL": urls,
        "LEVERET_EXCHANGE": exchange,
        "LEVERET_QUEUE_TYPE": "quorum",
        "LEVERET_TEST_OUT": str(out),
        "LEVERET_SHUTDOWN_GRACE": "10",
        "LEVERET_LOG_LEVEL": "info",
    }
    procs = [Proc(tmp_path, {**base, "LEVERET_METRICS_PORT": str(_free_port())}) for _ in range(2)]
    stats: dict[str, Any] = {}
    election = f"{exchange}.scheduler.default"
    try:
        for p in procs:
            await asyncio.to_thread(wait_status, p.port, 200, 90)

        def leader() -> Proc | None:
            led = [p for p in procs if any(e.get("leader") for e in p.events("scheduler_leader"))]
            return led[0] if len(led) == 1 else None

        lead = await wait_for(leader, 30, "a scheduler leader", interval=0.2)
        await wait_for(lambda: len(_runs(out)) >= 6, 30, "6 ticks", interval=0.2)
        info = await asyncio.to_thread(
            cluster.api, 0, f"/api/queues/%2F/{quote(election, safe='')}"
        )
        home = str(info.get("leader") or info.get("node"))
        stats["election queue"] = f"{info.get('type')}, led from {home}"
        # The node to stop: the one the leading scheduler's connection is on (the active
        # consumer's channel), so that the leadership has to move to the other process.
        active = [c for c in info.get("consumer_details") or [] if c.get("active")]
        via = str(active[0]["channel_details"]["node"]) if active else home
        victim = next(i for i, n in enumerate(cluster.nodes) if n.name == via)
        stats["stopped node"] = via
        stats["election queue led from it"] = via == home

        stopped: dict[str, float] = {}

        def bounce() -> None:
            stopped["wall"] = time.time()
            cluster.stop_node(victim)
            stopped["down_wall"] = time.time()
            time.sleep(5)
            cluster.start_node(victim)
            stopped["up_wall"] = time.time()

        bouncer = threading.Thread(target=bounce, daemon=True)
        bouncer.start()
        await asyncio.to_thread(bouncer.join, 180)
        assert "up_wall" in stopped, "the node did not come back"
        count = len({r[0] for r in _runs(out)})
        await wait_for(
            lambda: len({r[0] for r in _runs(out)}) >= count + 8, 60, "8 ticks after", interval=0.5
        )
    finally:
        codes = [p.stop() for p in procs]
        print("\nnode loss, schedules:", stats)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(cluster.wait_running, 3)
            await _delete_queues(cluster, 0, (queue, f"{exchange}."))
    runs = _runs(out)
    ticks = sorted({parse_tick(r[0].split("@", 1)[1]).timestamp() for r in runs})
    missing = [t for a, b in itertools.pairwise(ticks) if b - a > 1 for t in [a]]
    first = {}
    for job_id, _, _, at in runs:
        first.setdefault(job_id, at)
    lateness = {j: at - parse_tick(j.split("@", 1)[1]).timestamp() for j, at in first.items()}
    doubles = {i: n for i, n in Counter(r[0] for r in runs).items() if n > 1}
    around = [
        v
        for j, v in lateness.items()
        if stopped["wall"] - 1 <= parse_tick(j.split("@", 1)[1]).timestamp() <= stopped["up_wall"]
    ]
    firsts = sorted(first.values())
    took_over = [
        datetime.fromisoformat(str(ev["timestamp"])).timestamp() - stopped["wall"]
        for p in procs
        for ev in p.events("scheduler_leader")
        if ev.get("leader")
        and p is not lead
        and datetime.fromisoformat(str(ev["timestamp"])).timestamp() > stopped["wall"]
    ]
    stats.update(
        takeover_after_stop_s=round(min(took_over), 1) if took_over else None,
        longest_gap_between_ticks_s=round(max(b - a for a, b in itertools.pairwise(firsts)), 2),
        ticks=len(ticks),
        missed=sum(int(b - a) - 1 for a, b in itertools.pairwise(ticks) if b - a > 1),
        doubled=len(doubles),
        late_max_s=round(max(lateness.values()), 2),
        late_max_around_stop_s=round(max(around, default=0), 2),
        node_stop_s=round(stopped["down_wall"] - stopped["wall"], 1),
        outage_s=round(stopped["up_wall"] - stopped["wall"], 1),
    )
    print("node loss, schedules:", stats)
    assert not missing, f"ticks missed after {missing}: {stats}"
    assert len(doubles) <= 1 and all(n == 2 for n in doubles.values()), doubles
    assert codes == [0, 0], [p.tail() for p in procs]
