"""Locks on the broker alone (no ``LEVERET_STATUS_URL``): the lock store on the real broker, and
real ``leveret worker`` processes. Two workers never overlap runs on one key and burn no attempt
waiting; a SIGKILLed holder's key is taken by the other worker at once; distinct keys run side
by side; runs of one process on one key never overlap (the broker cannot tell them apart); a
closed lock connection loses its holds and the next run locks on a new one; ``idempotency_key=``
still refuses to start without Redis."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiormq
import pytest
from pydantic import BaseModel, SecretStr

from leveret.consumer import JobContext, Worker
from leveret.consumer.features.broker_locks import (
    CONNECTION_NAME,
    REFUSED_FOR_S,
    BrokerLocks,
    lock_queue_name,
    lock_url,
)
from leveret.consumer.features.locks import Locked, LockLost, key_template
from leveret.producers import Publisher
from leveret.producers.broker import connect
from leveret.producers.settings import ConnectionSettings
from tests.faults.plumbing import WorkerProcess, reaped
from tests.support import Broker, running, unique, wait_for

from .conftest import job
from .test_processes import _lines

BROKER_APP = """
import asyncio, os, time
from leveret.consumer import JobContext, Worker

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


@worker.job(QUEUE + "-locked", queue=QUEUE, backoff=0, lock="{key}")
async def locked(p: dict, ctx: JobContext) -> None:
    log("start", os.getpid(), ctx.job_id, ctx.attempt, repr(time.time()), ctx.lock_token, p["key"])
    if p.get("hold") and first_time("hold-" + ctx.job_id):
        await asyncio.sleep(60)  # the first run only: it is SIGKILLed meanwhile
    await asyncio.sleep(0.02)
    log("end", os.getpid(), ctx.job_id, ctx.attempt, repr(time.time()), ctx.lock_token, p["key"])
"""

# The same app with an idempotency_key= job: refused without LEVERET_STATUS_URL.
IDEMPOTENT_APP = """
import os
from leveret.consumer import Worker

worker = Worker()


@worker.job("charge", queue=os.environ["COORD_QUEUE"], idempotency_key="{order}")
async def charge(p: dict) -> None:
    pass
"""


class Step(BaseModel):
    n: int = 0


@pytest.fixture(autouse=True)
def no_status_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every worker here, in this process or a child, runs without Redis."""
    monkeypatch.delenv("LEVERET_STATUS_URL", raising=False)
    yield


def _settings(broker: Broker, heartbeat: int = 2) -> ConnectionSettings:
    return ConnectionSettings(amqp_url=SecretStr(lock_url(broker.url, heartbeat)))


@pytest.fixture
async def stores(broker: Broker) -> AsyncIterator[tuple[BrokerLocks, BrokerLocks]]:
    """Two lock stores, as two worker processes would have (a connection each)."""
    exchange = unique("ex")
    settings = _settings(broker)
    one = BrokerLocks(lambda: connect(settings, robust=False), exchange, heartbeat_s=2)
    two = BrokerLocks(lambda: connect(settings, robust=False), exchange, heartbeat_s=2)
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


def _lock_queues(broker: Broker, exchange: str) -> list[str]:
    queues = broker.api("GET", f"/queues/{broker.qvhost}").json()
    return [q["name"] for q in queues if q["name"].startswith(exchange + ".lock.")]


def _lock_connections(broker: Broker) -> list[str]:
    conns = broker.api("GET", f"/vhosts/{broker.qvhost}/connections").json()
    return [
        c["name"]
        for c in conns
        if (c.get("client_properties") or {}).get("connection_name") == CONNECTION_NAME
    ]


# -- the store -----------------------------------------------------------------------------------


async def test_a_key_is_held_against_other_connections_and_this_process(
    broker: Broker, stores: tuple[BrokerLocks, BrokerLocks]
) -> None:
    one, two = stores
    first = await one.acquire("c1", "a", 60)
    assert first is not None
    assert broker.queue_exists(lock_queue_name(one.exchange, "c1"))
    assert await two.acquire("c1", "b", 60) is None  # another connection: RESOURCE_LOCKED
    # The same connection could redeclare the exclusive queue: the store refuses by itself.
    assert await one.acquire("c1", "c", 60) is None
    assert await one.renew("c1", "a", first, 60)
    assert not await one.renew("c1", "b", first, 60)  # not b's
    await one.release("c1", "b", first)  # not b's: nothing happens
    assert await two.acquire("c1", "b", 60) is None
    assert await two.acquire("c2", "b", 60) is not None  # another key is free
    await one.release("c1", "a", first)
    assert not broker.queue_exists(lock_queue_name(one.exchange, "c1"))
    # Refused a moment ago, so taken as held for REFUSED_FOR_S without asking the broker.
    assert await two.acquire("c1", "b", 60) is None
    await asyncio.sleep(REFUSED_FOR_S)
    second = await two.acquire("c1", "b", 60)
    assert second is not None
    third = await two.acquire("c3", "b", 60)
    assert third is not None and third > second  # tokens grow within a process


async def test_a_closed_connection_loses_its_holds_and_the_next_takes_a_new_one(
    broker: Broker, stores: tuple[BrokerLocks, BrokerLocks]
) -> None:
    one, two = stores
    token = await one.acquire("k", "a", 60)
    assert token is not None
    told: list[str] = []
    one.watch("k", "a", token, told.append)
    assert await two.acquire("k", "b", 60) is None
    await wait_for(lambda: _lock_connections(broker), 10, "the lock connections to be listed")
    broker.close_connections()  # the broker drops every connection (both stores')
    await wait_for(lambda: told, 5, "the holder to be told")
    assert "connection closed" in told[0]
    assert not await one.renew("k", "a", token, 60)
    # The next acquisition connects again; the key went with the old connection.
    again = await two.acquire("k", "b", 60)
    assert again is not None
    await two.release("k", "b", again)
    await one.release("k", "a", token)  # lost already: nothing to delete, the key is forgotten
    assert await one.acquire("k", "c", 60) is not None


async def test_a_lock_queue_expired_by_a_policy_fails_its_renewal(
    broker: Broker, stores: tuple[BrokerLocks, BrokerLocks]
) -> None:
    """Nobody can delete another connection's exclusive queue (the management API answers 400),
    but an ``expires`` policy does: the renewal notices (docs/coordination.md, Limits)."""
    one, two = stores
    token = await one.acquire("k", "a", 60)
    assert token is not None
    name = lock_queue_name(one.exchange, "k")
    assert (
        broker.api("DELETE", f"/queues/{broker.qvhost}/{quote(name, safe='')}").status_code == 400
    )
    policy = f"/policies/{broker.qvhost}/{one.exchange}-expires"
    pattern = "^" + one.exchange.replace(".", "\\.") + "\\.lock\\."
    definition = {"pattern": pattern, "definition": {"expires": 300}, "apply-to": "queues"}
    broker.api("PUT", policy, json=definition).raise_for_status()
    try:
        await wait_for(lambda: not broker.queue_exists(name), 10, "the policy to expire it")
        assert not await one.renew("k", "a", token, 60)
        assert await two.acquire("k", "b", 60) is not None
    finally:
        broker.api("DELETE", policy)


async def test_a_holder_the_broker_stops_answering_gives_up_within_a_heartbeat(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partition: the connection stays open but nothing comes back. The store's pings go
    unanswered, so it gives its holds up (and closes the connection) a heartbeat after the
    last answer, before the broker would free them (two to three heartbeats)."""
    exchange = unique("ex")
    settings = _settings(broker, heartbeat=1)
    one = BrokerLocks(lambda: connect(settings, robust=False), exchange, heartbeat_s=1)
    two = BrokerLocks(lambda: connect(settings, robust=False), exchange, heartbeat_s=1)
    try:
        token = await one.acquire("k", "a", 4)
        assert token is not None
        told: list[str] = []
        one.watch("k", "a", token, told.append)

        async def unanswered(self: Any, *args: Any, **kwargs: Any) -> None:
            await asyncio.sleep(3600)

        monkeypatch.setattr(aiormq.Channel, "basic_qos", unanswered)
        cut = time.monotonic()
        await wait_for(lambda: told, 5, "the holder to give up")
        gave_up = time.monotonic() - cut
        monkeypatch.undo()
        assert "did not answer" in told[0]
        assert gave_up <= 1.0 + 0.3, gave_up  # a heartbeat (1 s) after the last answer
        assert not await one.renew("k", "a", token, 4)
        name = lock_queue_name(exchange, "k")
        await wait_for(lambda: not broker.queue_exists(name), 5, "the connection to close")
        assert await two.acquire("k", "b", 4) is not None
    finally:
        await one.close()
        await two.close()


async def test_a_lost_connection_cancels_the_async_run_at_once(
    broker: Broker, stores: tuple[BrokerLocks, BrokerLocks]
) -> None:
    one, _ = stores
    render = key_template("{n}", "lock", "j", Step)
    layer = Locked("{n}", render, one, 60, max_waiting=1, cancels=True)
    ctx = JobContext("id-1", "j", "q", 1, 3, None, payload=Step(n=7))  # type: ignore[arg-type]
    seen: list[str] = []

    async def handler(c: JobContext) -> None:
        seen.append("started")
        await wait_for(lambda: _lock_connections(broker), 10, "the lock connection")
        broker.close_connections()
        await asyncio.sleep(30)
        seen.append("finished")  # never: cancelled when the connection closed, not at renewal

    started = time.monotonic()
    with pytest.raises(LockLost):
        await layer(ctx, handler)
    assert ctx.lock_lost and seen == ["started"]
    assert time.monotonic() - started < 10  # the renewal would come only after 20 s
    assert one.held == frozenset()


async def test_a_cancelled_acquisition_leaves_no_queue_behind(
    broker: Broker, stores: tuple[BrokerLocks, BrokerLocks]
) -> None:
    """A run cancelled while its declare is on the wire (shutdown, a timeout) takes no lock, and
    the queue the broker may have created for it anyway is deleted."""
    one, two = stores
    warm = await one.acquire("warm", "a", 60)  # connected: the cancellations hit the declares
    assert warm is not None
    await one.release("warm", "a", warm)
    outcomes: list[object] = []
    for i in range(30):  # cancelled at different points of the declare (~ms on the wire)
        task = asyncio.ensure_future(one.acquire(f"k{i}", "a", 60))
        await asyncio.sleep(0.0002 * i)
        task.cancel()
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        outcomes.append(outcome)
        if isinstance(outcome, int):  # it was taken before the cancellation: a normal hold
            await one.release(f"k{i}", "a", outcome)
    assert any(isinstance(o, asyncio.CancelledError) for o in outcomes)
    await wait_for(lambda: not one.held, 10, "the cancelled acquisitions to be undone")
    assert _lock_queues(broker, one.exchange) == []
    for i in range(30):
        assert await two.acquire(f"k{i}", "b", 60) is not None


async def test_done_marks_stay_a_clear_error_with_broker_locks() -> None:
    from leveret.consumer import ConfigError
    from leveret.consumer.features.locks import Coordination, CoordinationSettings

    coordination = Coordination(CoordinationSettings(), locks=object())
    ctx = JobContext("id", "job", "q", 1, 3, None)  # type: ignore[arg-type]
    ctx.done_marks = coordination  # what the worker's pipeline sets
    with pytest.raises(ConfigError, match="LEVERET_STATUS_URL"):
        await ctx.done_before("k")
    with pytest.raises(ConfigError, match="LEVERET_STATUS_URL"):
        await ctx.mark_done("k")


# -- in a worker ---------------------------------------------------------------------------------


async def test_runs_of_one_process_on_one_key_never_overlap(broker: Broker) -> None:
    """The worker's own connection could redeclare its exclusive queue: the store's own record
    of held keys keeps the process's runs apart."""
    queue = unique("q")
    worker = Worker(settings=broker.settings(exchange=unique("ex"), prefetch=20))
    runs: list[tuple[float, float, int]] = []

    @job(worker, f"{queue}-locked", queue=queue, lock="{n}")
    async def locked(step: Step, ctx: JobContext) -> None:
        started = time.monotonic()
        await asyncio.sleep(0.02)
        assert ctx.lock_token is not None
        runs.append((started, time.monotonic(), ctx.attempt))

    async with running(worker):
        settings = ConnectionSettings(amqp_url=broker.url, exchange=worker.settings.exchange)
        async with Publisher(settings=settings) as pub:
            for _ in range(15):
                await pub.publish(f"{queue}-locked", {"n": 1})
            await wait_for(lambda: len(runs) >= 15, 60, "every run")
    assert len(runs) == 15 and {a for _, _, a in runs} == {1}
    for (_, end, _), (start, _, _) in itertools.pairwise(sorted(runs)):
        assert start >= end, "two runs of one process on one lock key overlapped"
    assert _lock_queues(broker, worker.settings.exchange) == []  # all released


async def test_a_worker_locks_on_a_new_connection_after_losing_its_own(broker: Broker) -> None:
    """The lock connection dies under a running job: the run loses its lock (cancelled, retried)
    and the retry locks on the connection the store opened since."""
    queue = unique("q")
    worker = Worker(settings=broker.settings(exchange=unique("ex")))
    seen: list[tuple[int, bool]] = []

    @job(worker, f"{queue}-locked", queue=queue, lock="{n}")
    async def locked(step: Step, ctx: JobContext) -> str:
        seen.append((ctx.attempt, ctx.lock_lost))
        if ctx.attempt == 1:
            await asyncio.sleep(30)  # cancelled when the lock connection closes
        return "done"

    async with running(worker):
        settings = ConnectionSettings(amqp_url=broker.url, exchange=worker.settings.exchange)
        async with Publisher(settings=settings) as pub:
            job_id = await pub.publish(f"{queue}-locked", {"n": 3})
            await wait_for(lambda: seen, 20, "the first run")
            lock_conns = await wait_for(lambda: _lock_connections(broker), 10, "its connection")
            for name in lock_conns:
                broker.api("DELETE", f"/connections/{quote(name, safe='')}").raise_for_status()
            await wait_for(lambda: len(seen) >= 2, 20, "the retry")
            assert seen == [(1, False), (2, False)], job_id
            await wait_for(lambda: _lock_queues(broker, worker.settings.exchange) == [], 10, "")


# -- worker processes ----------------------------------------------------------------------------


def _setup(tmp_path: Path, **env: str) -> tuple[str, str, Path, dict[str, str]]:
    exchange, queue = unique("ex"), unique("q")
    (tmp_path / "coordapp.py").write_text(BROKER_APP)
    (tmp_path / "idemapp.py").write_text(IDEMPOTENT_APP)
    (tmp_path / "marks").mkdir()
    log = tmp_path / "runs.log"
    log.touch()
    full = {
        "COORD_QUEUE": queue,
        "COORD_LOG": str(log),
        "COORD_MARKS": str(tmp_path / "marks"),
        "LEVERET_EXCHANGE": exchange,
        "LEVERET_PREFETCH": "10",
        "LEVERET_LOG_LEVEL": "warning",
        **env,
    }
    return exchange, queue, log, full


def _start(tmp_path: Path, broker: Broker, env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess.start(tmp_path, "coordapp:worker", broker.url, env=env)


def _runs(log: Path) -> list[tuple[float, float, str, str, int, str, str]]:
    """(start, end, pid, job id, token, key, attempt) of each run that ended."""
    ended = {(e[1], e[2]): float(e[4]) for e in _lines(log, "end")}
    return [
        (float(s[4]), ended[(s[1], s[2])], s[1], s[2], int(s[5]), s[6], s[3])
        for s in _lines(log, "start")
        if (s[1], s[2]) in ended
    ]


async def test_two_workers_never_overlap_on_one_key_and_burn_no_attempt(
    broker: Broker, tmp_path: Path
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
            for i in range(10):  # other keys run beside them
                await pub.publish(f"{queue}-locked", {"key": f"other-{i}", "i": i})
            await wait_for(lambda: len(_lines(log, "end")) >= n + 10, 90, "every job")
            took = time.monotonic() - started
        await wait_for(lambda: _lock_queues(broker, exchange) == [], 10, "every lock released")
    starts = _lines(log, "start")
    assert len(starts) == n + 10 and len({s[2] for s in starts}) == n + 10  # each ran once
    assert {s[3] for s in starts} == {"1"}  # waiting burnt no attempt
    assert len({s[1] for s in starts}) == 2, "both workers ran jobs"
    on_key = sorted(r for r in _runs(log) if r[5] == "customer-1")
    assert len(on_key) == n
    assert len({r[2] for r in on_key}) == 2, "both workers held the key"
    for before, after in itertools.pairwise(on_key):
        assert after[0] >= before[1], "two runs on one lock key overlapped"
    for pid in {r[2] for r in on_key}:  # tokens grow within a process (not across: docs)
        tokens = [r[4] for r in on_key if r[2] == pid]
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    print(
        f"\nCOORD-FIGURES broker locks: {n} jobs on one key (+10 others), 2 workers: {took:.2f} s"
    )


async def test_a_sigkilled_holders_key_is_taken_by_the_other_worker_at_once(
    broker: Broker, tmp_path: Path
) -> None:
    exchange, queue, log, env = _setup(tmp_path)  # LEVERET_LOCK_TTL: the default 60 s
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
            await asyncio.sleep(1.5)  # the waiter is postponed meanwhile, more than once
            assert len(_lines(log, "start")) == 1, "the waiter ran while the key was held"
            name = lock_queue_name(exchange, "k")
            assert broker.queue_exists(name)
            dying.kill()  # SIGKILL: no release
            killed_at, killed = time.time(), time.monotonic()
            await wait_for(lambda: not broker.queue_exists(name), 10, "the lock queue to go")
            freed = time.monotonic() - killed
            await wait_for(
                lambda: {s[2] for s in _lines(log, "end")} >= {holder, waiter},
                30,
                "the holder's rerun and the waiter to run once the key freed",
            )
    after = [s for s in _lines(log, "start") if s[1] == str(other.proc.pid)]
    taken = min(float(s[4]) for s in after) - killed_at
    assert {s[3] for s in _lines(log, "start")} == {"1"}  # waiting burnt no attempt
    assert freed < 2.0, freed  # the broker drops a dead connection's exclusive queues at once
    assert taken < 5.0, taken  # far within LEVERET_LOCK_TTL (60): a postponed run's round trip
    print(
        f"\nCOORD-FIGURES broker locks, SIGKILLed holder: freed {freed:.2f} s, taken {taken:.2f} s"
    )


async def test_distinct_keys_run_side_by_side(broker: Broker, tmp_path: Path) -> None:
    exchange, queue, log, env = _setup(tmp_path)
    one = _start(tmp_path, broker, env)
    with reaped(one):
        await one.wait_ready()
        settings = ConnectionSettings(amqp_url=broker.url, exchange=exchange)
        async with Publisher(settings=settings) as pub:
            for i in range(8):
                await pub.publish(f"{queue}-locked", {"key": f"k-{i}", "hold": True})
            await wait_for(lambda: len(_lines(log, "start")) >= 8, 20, "every key's run")
            # All eight hold their keys at once (each sleeps 60 s on its first run).
            assert len(_lock_queues(broker, exchange)) == 8
    assert len({s[6] for s in _lines(log, "start")}) == 8


async def test_idempotency_keys_still_refuse_to_start_without_redis(
    broker: Broker, tmp_path: Path
) -> None:
    _, _, _, env = _setup(tmp_path)
    worker = WorkerProcess.start(tmp_path, "idemapp:worker", broker.url, env=env)
    with reaped(worker):
        code = await worker.wait_exit(30)
    assert code != 0
    log = worker.log()
    assert "job(s) charge use idempotency_key=, which needs Redis" in log, log
    assert "set LEVERET_STATUS_URL" in log, log
