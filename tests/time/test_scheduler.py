"""Schedules fired once across replicas: real broker, real processes, real SIGKILL.

Each replica is ``tests/time/scheduler_proc.py``: a ``Scheduler`` alone with a 1 s ``every``
schedule named ``tick``, publishing job ``<unique>`` into an exchange of the test's own, where a
collector queue counts the ids (``tick@<second>Z``) and their arrival times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest

from leveret.consumer.features.schedules.leader import scheduler_queue_name
from leveret.consumer.features.schedules.spec import parse_tick
from tests.support import ROOT, Broker, unique

pytestmark = pytest.mark.slow


@dataclass
class Replica:
    proc: subprocess.Popen[str]
    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def events(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.lines if e.get("event") == name]

    def led_at(self) -> float | None:
        for t, e in self.events("scheduler_leader"):
            if e["leader"]:
                return t
        return None

    def leading_since(self) -> float | None:
        """When it last became leader, if its last word on leadership is that it leads."""
        events = self.events("scheduler_leader")
        if events and events[-1][1]["leader"]:
            return events[-1][0]
        return None


@dataclass
class Rig:
    broker: Broker
    exchange: str
    job: str
    app: str
    missed: str = "once"
    replicas: list[Replica] = field(default_factory=list)
    arrivals: list[tuple[str, float]] = field(default_factory=list)

    def start(self, n: int, *, app: str | None = None, extra: str = "") -> list[Replica]:
        new = []
        for _ in range(n):
            proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "tests.time.scheduler_proc", self.broker.url,
                 self.exchange, app or self.app, self.job, "1", self.missed, extra],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            replica = Replica(proc)
            threading.Thread(target=self._read, args=(replica,), daemon=True).start()
            new.append(replica)
        self.replicas += new
        return new

    @staticmethod
    def _read(replica: Replica) -> None:
        assert replica.proc.stdout is not None
        for line in replica.proc.stdout:
            with contextlib.suppress(ValueError):
                replica.lines.append((time.time(), json.loads(line)))

    def leader(self) -> Replica | None:
        alive = [r for r in self.replicas if r.proc.poll() is None and r.led_at() is not None]
        return max(alive, key=lambda r: r.led_at() or 0.0) if alive else None

    def current_leader(self) -> Replica | None:
        """The live replica that last became leader and still says it leads."""
        alive = [r for r in self.replicas if r.proc.poll() is None and r.leading_since()]
        return max(alive, key=lambda r: r.leading_since() or 0.0) if alive else None

    def stop_all(self) -> None:
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGCONT)  # a frozen one must hear the SIGTERM
                r.proc.send_signal(signal.SIGTERM)
        for r in self.replicas:
            try:
                r.proc.wait(10)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()

    def ticks(self, name: str = "tick") -> list[datetime]:
        return [parse_tick(i.split("@", 1)[1]) for i in self.ids(name)]

    def ids(self, name: str = "tick") -> list[str]:
        return [i for i, _ in self.arrivals if i.split("@", 1)[0] == name]


@pytest.fixture
async def rig(broker: Broker) -> AsyncIterator[Rig]:
    rig = Rig(broker, unique("sx"), unique("tickjob"), unique("app"))
    connection = await aio_pika.connect(broker.url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(rig.exchange, "direct", durable=True)
    queue = await channel.declare_queue(unique("collect"), durable=True)
    await queue.bind(exchange, rig.job)

    async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        rig.arrivals.append((message.message_id or "", time.time()))
        await message.ack()

    await queue.consume(collect)
    try:
        yield rig
    finally:
        rig.stop_all()
        await asyncio.sleep(0.5)
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        await connection.close()
        for app in (rig.app, "default"):
            name = quote(scheduler_queue_name(rig.exchange, app), safe="")
            broker.api("DELETE", f"/queues/{broker.qvhost}/{name}")


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _consecutive(ticks: list[datetime]) -> bool:
    s = sorted(set(ticks))
    return all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(s))


async def test_three_replicas_fire_each_of_twenty_ticks_exactly_once(rig: Rig) -> None:
    rig.start(3)
    await _until(lambda: rig.leader() is not None, 15, "a leader")
    await _until(lambda: len(rig.arrivals) >= 21, 40, "21 ticks")
    rig.stop_all()
    await asyncio.sleep(0.5)
    ids = [i for i, _ in rig.arrivals]
    assert not [i for i, n in Counter(ids).items() if n > 1], ids  # no tick twice
    assert _consecutive(rig.ticks()), ids  # none missing
    assert len(ids) >= 21
    leaders = [r for r in rig.replicas if r.led_at() is not None]
    assert len(leaders) == 1  # one leader throughout, visible in its log
    for job_id, arrived in rig.arrivals:  # within 1 s of the tick, never early
        lateness = arrived - parse_tick(job_id.split("@", 1)[1]).timestamp()
        assert 0 <= lateness < 1.0, (job_id, lateness)


async def test_sigkill_of_the_leader_hands_over_within_5_s_without_losing_a_tick(
    rig: Rig,
) -> None:
    rig.start(3)
    await _until(lambda: rig.leader() is not None, 15, "a leader")
    await _until(lambda: len(rig.arrivals) >= 5, 20, "5 ticks")
    old = rig.leader()
    assert old is not None
    os.kill(old.proc.pid, signal.SIGKILL)
    killed_at = time.time()
    old.proc.wait()
    await _until(lambda: rig.leader() not in (None, old), 10, "a new leader")
    new = rig.leader()
    assert new is not None and (new.led_at() or 0) - killed_at < 5.0
    count = len(rig.arrivals)
    await _until(lambda: len(rig.arrivals) >= count + 6, 20, "6 more ticks")
    rig.stop_all()
    await asyncio.sleep(0.5)
    ids = [i for i, _ in rig.arrivals]
    doubles = {i: n for i, n in Counter(ids).items() if n > 1}
    assert len(doubles) <= 1 and all(n == 2 for n in doubles.values()), doubles
    assert _consecutive(rig.ticks()), ids  # no tick missing across the takeover


@pytest.mark.parametrize("missed", ["once", "skip"])
async def test_ticks_missed_while_nothing_ran(rig: Rig, missed: str) -> None:
    """All replicas down for 6 ticks: "once" fires the newest missed tick, "skip" none."""
    rig.missed = missed
    rig.start(2)
    await _until(lambda: len(rig.arrivals) >= 3, 20, "3 ticks")
    rig.stop_all()
    down_since = datetime.fromtimestamp(time.time(), UTC)
    before = set(rig.ticks())
    await asyncio.sleep(6.2)
    back = rig.start(2)
    await _until(lambda: any(r.led_at() for r in back), 15, "a leader after the restart")
    leader = next(r for r in back if r.led_at())
    since = parse_tick(leader.events("scheduler_standby")[0][1]["since"])
    await _until(lambda: len(rig.arrivals) >= len(before) + 4, 20, "ticks after the restart")
    rig.stop_all()
    await asyncio.sleep(0.5)
    ticks = rig.ticks()
    assert len(ticks) == len(set(ticks))
    gap = [t for t in ticks if down_since < t < since]
    missed_ticks = (since - down_since).total_seconds() // 1
    assert missed_ticks >= 5
    newest_missed = datetime.fromtimestamp(since.timestamp() // 1, UTC)
    if newest_missed == since:
        newest_missed -= timedelta(seconds=1)
    assert gap == ([newest_missed] if missed == "once" else []), (gap, since, down_since)
    after = sorted(t for t in ticks if t >= since)
    assert after and _consecutive(after)
    assert after[0] - since < timedelta(seconds=1)  # resumes with the first tick after start


async def test_replicas_with_different_schedule_sets_share_one_leader(rig: Rig) -> None:
    """A rolling update: the old replica knows {tick, old_only}, the new one {tick, new_only},
    neither has a name. They share one leadership (the old one keeps it, so ``tick`` fires once
    per tick), the new one takes over when the old one leaves, and the token keeps the state of
    ``old_only``, which the new leader does not know."""
    (old,) = rig.start(1, app="-", extra="old_only")
    await _until(lambda: old.led_at() is not None, 15, "the old replica leading")
    (new,) = rig.start(1, app="-", extra="new_only")
    await _until(lambda: len(rig.ids()) >= 6, 20, "6 ticks")
    assert new.led_at() is None, "the new replica leads beside the old one"
    assert not rig.ids("new_only")
    old.proc.send_signal(signal.SIGTERM)
    left_at = time.time()
    old.proc.wait(10)
    await _until(lambda: new.led_at() is not None, 5, "the new replica taking over")
    assert (new.led_at() or 0) - left_at < 5.0
    count = len(rig.ids())
    await _until(
        lambda: len(rig.ids()) >= count + 3 and len(rig.ids("new_only")) >= 2, 10, "new ticks"
    )
    rig.stop_all()
    await asyncio.sleep(0.5)
    ids = rig.ids()
    assert not [i for i, n in Counter(ids).items() if n > 1], ids  # no tick twice
    assert _consecutive(rig.ticks()), ids  # none missing across the handover
    last_old = max(rig.ticks("old_only"))
    connection = await aio_pika.connect(rig.broker.url)
    try:
        channel = await connection.channel()
        tokens = await channel.declare_queue(
            scheduler_queue_name(rig.exchange, "default"),  # no name: the default app
            durable=True,
            arguments={"x-single-active-consumer": True},
        )
        message = await tokens.get(no_ack=False)
        await message.nack(requeue=True)
    finally:
        await connection.close()
    state = json.loads(message.body)["ticks"]
    assert set(state) == {"tick", "old_only", "new_only"}, state
    assert parse_tick(state["old_only"]) == last_old  # untouched by the leader not knowing it


async def test_deleting_the_leader_queue_puts_every_replica_back_into_the_election(
    rig: Rig,
) -> None:
    """The broker cancels every consumer of a deleted queue (also what a classic queue's node
    failure does). Ticks go on, none skipped; the replica that was standing by is back in the
    election: killing whoever leads afterwards still hands over within 5 s."""
    rig.start(2)
    await _until(lambda: rig.current_leader() is not None, 15, "a leader")
    await _until(lambda: len(rig.ids()) >= 3, 20, "3 ticks")
    queue = quote(scheduler_queue_name(rig.exchange, rig.app), safe="")
    response = rig.broker.api("DELETE", f"/queues/{rig.broker.qvhost}/{queue}")
    assert response.status_code == 204, response.text
    deleted_at = time.time()
    await _until(
        lambda: any(t.timestamp() > deleted_at for t in rig.ticks()), 5, "a tick after deletion"
    )
    await asyncio.sleep(3)
    leader = rig.current_leader()
    assert leader is not None
    os.kill(leader.proc.pid, signal.SIGKILL)
    killed_at = time.time()
    leader.proc.wait()
    await _until(
        lambda: rig.current_leader() not in (None, leader), 5, "a takeover after the deletion"
    )
    new = rig.current_leader()
    assert new is not None and (new.leading_since() or 0) - killed_at < 5.0
    count = len(rig.ids())
    await _until(lambda: len(rig.ids()) >= count + 3, 10, "3 more ticks")
    rig.stop_all()
    await asyncio.sleep(0.5)
    ids = rig.ids()
    doubles = {i: n for i, n in Counter(ids).items() if n > 1}
    assert len(doubles) <= 2 and all(n == 2 for n in doubles.values()), doubles  # one a takeover
    assert _consecutive(rig.ticks()), ids  # none skipped, across the deletion and the kill


async def test_a_frozen_leader_is_replaced_within_5_s_and_steps_down_when_it_thaws(
    rig: Rig,
) -> None:
    """SIGSTOP is a host that vanished without closing its socket: only the AMQP heartbeat
    tells the broker. The standby fires the next tick within 5 s; the thawed leader finds its
    connection closed, steps down, and at most one tick is published twice."""
    rig.start(2)
    await _until(lambda: rig.current_leader() is not None, 15, "a leader")
    await _until(lambda: len(rig.ids()) >= 3, 20, "3 ticks")
    frozen = rig.current_leader()
    assert frozen is not None
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    frozen_at = time.time()
    try:
        await _until(
            lambda: any(t.timestamp() > frozen_at for t in rig.ticks()), 5, "a tick after freeze"
        )
        first = min(
            a
            for i, a in rig.arrivals
            if i.startswith("tick@") and parse_tick(i[5:]).timestamp() > frozen_at
        )
        new = rig.current_leader()
        assert new is not None and new is not frozen
        print(f"takeover: leader after {(new.leading_since() or 0) - frozen_at:.2f} s, "
              f"first tick after {first - frozen_at:.2f} s")  # fmt: skip
        count = len(rig.ids())
        await _until(lambda: len(rig.ids()) >= count + 2, 10, "2 more ticks")
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    await _until(lambda: frozen.leading_since() is None, 10, "the thawed leader stepping down")
    count = len(rig.ids())
    await _until(lambda: len(rig.ids()) >= count + 3, 10, "3 more ticks")
    rig.stop_all()
    await asyncio.sleep(0.5)
    ids = rig.ids()
    doubles = {i: n for i, n in Counter(ids).items() if n > 1}
    assert len(doubles) <= 1 and all(n == 2 for n in doubles.values()), doubles
    assert _consecutive(rig.ticks()), ids
