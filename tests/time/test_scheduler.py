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

import aio_pika
import pytest

from leveret.consumer.schedules import parse_tick
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


@dataclass
class Rig:
    broker: Broker
    exchange: str
    job: str
    app: str
    missed: str = "once"
    replicas: list[Replica] = field(default_factory=list)
    arrivals: list[tuple[str, float]] = field(default_factory=list)

    def start(self, n: int) -> list[Replica]:
        new = []
        for _ in range(n):
            proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "tests.time.scheduler_proc", self.broker.url,
                 self.exchange, self.app, self.job, "1", self.missed],
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

    def stop_all(self) -> None:
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in self.replicas:
            try:
                r.proc.wait(10)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()

    def ticks(self) -> list[datetime]:
        return [parse_tick(i.split("@", 1)[1]) for i, _ in self.arrivals]


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
        await connection.close()


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
