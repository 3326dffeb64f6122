"""Locks and done marks across real ``leveret worker`` processes, the real broker and Redis:
two workers never overlap runs on one lock key and burn no attempt waiting; a SIGKILLed holder's
lock frees within LEVERET_LOCK_TTL; a SIGKILL after a done mark and before the ack reruns
nothing."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import redis

from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from tests.faults.plumbing import WorkerProcess, reaped
from tests.support import Broker, unique, wait_for

from .conftest import STATUS_URL

APP = """
import asyncio, os, signal, time
from leveret.consumer import JobContext, Worker
from leveret.consumer.features import idempotency

worker = Worker()
QUEUE = os.environ["COORD_QUEUE"]
MARKS = os.environ["COORD_MARKS"]
_LOG = os.open(os.environ["COORD_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def log(*words):
    os.write(_LOG, (" ".join(str(w) for w in words) + "\\n").encode())


def first_time(name):
    try:  # O_EXCL: true once per name, across processes
        os.close(os.open(os.path.join(MARKS, name), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def job(name, **options):
    def register(fn):
        try:
            return worker.job(name, queue=QUEUE, backoff=0, **options)(fn)
        except TypeError:  # Worker.job does not forward the coordination options yet
            worker.jobs.add(fn, name, QUEUE, 3, 0, None, **options)
            return fn
    return register


@job(QUEUE + "-locked", lock="{key}")
async def locked(p: dict, ctx: JobContext) -> None:
    log("start", os.getpid(), ctx.job_id, ctx.attempt, repr(time.time()), ctx.lock_token, p["key"])
    if p.get("hold") and first_time("hold-" + ctx.job_id):
        await asyncio.sleep(60)  # the first run only: it is SIGKILLed meanwhile
    await asyncio.sleep(0.02)
    log("end", os.getpid(), ctx.job_id, ctx.attempt, repr(time.time()), ctx.lock_token, p["key"])


@job(QUEUE + "-once", idempotency_key="{order}")
async def once(p: dict, ctx: JobContext) -> dict:
    log("ran", os.getpid(), ctx.job_id, ctx.attempt)
    return {"receipt": p["order"] + "-" + str(os.getpid())}


@job(QUEUE + "-manual")
async def manual(p: dict, ctx: JobContext) -> str:
    if await ctx.done_before("mail:" + p["order"]):
        log("skipped", os.getpid(), ctx.job_id, ctx.attempt)
        return "skipped"
    log("mailed", os.getpid(), ctx.job_id, ctx.attempt)
    await ctx.mark_done("mail:" + p["order"])
    if first_time("manual-" + ctx.job_id):
        os.kill(os.getpid(), signal.SIGKILL)  # after the mark, before the ack
    return "mailed"


# SIGKILL right after the idempotency layer's mark is written, before settle acks: once.
_mark = idempotency.RedisDoneMarks.mark


async def mark_then_die(self, key, result=None):
    await _mark(self, key, result)
    if key.startswith("job:") and first_time("once-" + key.replace(":", "_")):
        os.kill(os.getpid(), signal.SIGKILL)


idempotency.RedisDoneMarks.mark = mark_then_die
"""


def _setup(tmp_path: Path, **env: str) -> tuple[str, str, Path, dict[str, str]]:
    exchange, queue = unique("ex"), unique("q")
    (tmp_path / "coordapp.py").write_text(APP)
    (tmp_path / "marks").mkdir()
    log = tmp_path / "runs.log"
    log.touch()
    full = {
        "COORD_QUEUE": queue,
        "COORD_LOG": str(log),
        "COORD_MARKS": str(tmp_path / "marks"),
        "LEVERET_EXCHANGE": exchange,
        "LEVERET_STATUS_URL": STATUS_URL,
        "LEVERET_PREFETCH": "10",
        "LEVERET_LOG_LEVEL": "warning",
        **env,
    }
    return exchange, queue, log, full


def _lines(log: Path, word: str) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines() if line.startswith(word + " ")]


def _start(tmp_path: Path, broker: Broker, env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess.start(tmp_path, "coordapp:worker", broker.url, env=env)


async def test_two_workers_never_overlap_on_one_key_and_burn_no_attempt(
    broker: Broker, tmp_path: Path, redis_db: redis.Redis
) -> None:
    exchange, queue, log, env = _setup(tmp_path)
    one, two = _start(tmp_path, broker, env), _start(tmp_path, broker, env)
    n = 40
    with reaped(one, two):
        await asyncio.gather(one.wait_ready(), two.wait_ready())
        settings = ConnectionSettings(amqp_url=broker.url, exchange=exchange)
        async with Publisher(settings=settings) as pub:
            started = time.monotonic()
            for i in range(n):
                await pub.publish(f"{queue}-locked", {"key": "customer-1", "i": i})
            # Other keys run beside them.
            for i in range(10):
                await pub.publish(f"{queue}-locked", {"key": f"other-{i}", "i": i})
            await wait_for(lambda: len(_lines(log, "end")) >= n + 10, 60, "every job")
            took = time.monotonic() - started
    starts, ends = _lines(log, "start"), _lines(log, "end")
    ended = {(e[1], e[2]): float(e[4]) for e in ends}
    assert len(starts) == n + 10 and len({s[2] for s in starts}) == n + 10  # each ran once
    assert {s[3] for s in starts} == {"1"}  # waiting burnt no attempt
    assert len({s[1] for s in starts}) == 2, "both workers ran jobs"
    # Runs on the one key, in start order: each starts after the previous one ended.
    on_key = sorted(
        (float(s[4]), ended[(s[1], s[2])], int(s[5])) for s in starts if s[6] == "customer-1"
    )
    assert len(on_key) == n
    for (_, end, token), (start, _, next_token) in itertools.pairwise(on_key):
        assert start >= end, "two runs on one lock key overlapped"
        assert next_token > token  # fencing tokens grow
    print(f"\nCOORD-FIGURES {n} jobs on one lock key (+10 others), 2 workers: {took:.2f} s")


async def test_a_sigkilled_holders_lock_frees_within_the_ttl(
    broker: Broker, tmp_path: Path, redis_db: redis.Redis
) -> None:
    exchange, queue, log, env = _setup(tmp_path, LEVERET_LOCK_TTL="2")
    one, two = _start(tmp_path, broker, env), _start(tmp_path, broker, env)
    with reaped(one, two):
        await asyncio.gather(one.wait_ready(), two.wait_ready())
        settings = ConnectionSettings(amqp_url=broker.url, exchange=exchange)
        async with Publisher(settings=settings) as pub:
            holder = await pub.publish(f"{queue}-locked", {"key": "k", "hold": True})
            await wait_for(lambda: _lines(log, "start"), 15, "the holder to start")
            pid = _lines(log, "start")[0][1]
            dying, other = (one, two) if str(one.proc.pid) == pid else (two, one)
            waiter = await pub.publish(f"{queue}-locked", {"key": "k"})
            await asyncio.sleep(0.5)  # the waiter is postponed meanwhile
            dying.kill()  # SIGKILL: no release, no more renewals
            killed_at, killed = time.time(), time.monotonic()
            await wait_for(lambda: not redis_db.exists("leveret:lock:key:k"), 10, "the key")
            freed = time.monotonic() - killed
            await wait_for(
                lambda: {s[2] for s in _lines(log, "end")} >= {holder, waiter},
                15,
                "the holder's rerun and the waiter to run once the lock freed",
            )
    after = [s for s in _lines(log, "start") if s[1] == str(other.proc.pid)]
    taken = min(float(s[4]) for s in after) - killed_at
    assert {s[3] for s in _lines(log, "start")} == {"1"}  # waiting burnt no attempt
    assert freed <= 2.0 + 0.1, freed  # LEVERET_LOCK_TTL=2 (renewed every 2/3 s before)
    assert taken < 2.0 + 1.5, taken  # plus at most a postponed run's round trip
    print(f"\nCOORD-FIGURES SIGKILLed holder: key freed {freed:.2f} s, taken {taken:.2f} s")


async def test_a_done_mark_survives_a_sigkill_before_the_ack(
    broker: Broker, tmp_path: Path, redis_db: redis.Redis
) -> None:
    exchange, queue, log, env = _setup(tmp_path)
    one = _start(tmp_path, broker, env)
    two: WorkerProcess | None = None
    with reaped(one):
        await one.wait_ready()
        settings = ConnectionSettings(amqp_url=broker.url, exchange=exchange)
        async with Publisher(settings=settings, status_url=STATUS_URL) as pub:
            once = await pub.publish(f"{queue}-once", {"order": "o-1"})
            await one.wait_exit(15)  # killed itself right after the mark
            first = _lines(log, "ran")
            assert len(first) == 1
            two = _start(tmp_path, broker, env)
            with reaped(two):
                await two.wait_ready()
                result = await pub.result(once, timeout=30)
                manual = await pub.publish(f"{queue}-manual", {"order": "o-2"})
                await wait_for(lambda: two.proc.poll() is not None, 15, "the manual kill")
                three = _start(tmp_path, broker, env)
                with reaped(three):
                    await three.wait_ready()
                    manual_result = await pub.result(manual, timeout=30)
    assert len(_lines(log, "ran")) == 1  # the rerun skipped the handler
    assert result == {"receipt": f"o-1-{first[0][1]}"}  # and returned the first run's result
    assert len(_lines(log, "mailed")) == 1 and len(_lines(log, "skipped")) == 1
    assert manual_result == "skipped"
