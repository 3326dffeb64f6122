"""A group of 500 whose final job runs exactly once while one of two worker processes is
SIGKILLed mid-group (real ``leveret worker`` processes, the real broker and Redis)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from leveret.producers import Job, Publisher
from leveret.producers.groups import then_id
from leveret.producers.settings import ConnectionSettings
from tests.faults.plumbing import WorkerProcess, reaped
from tests.support import Broker, unique, wait_for

from .conftest import STATUS_URL, Made

APP = """
import asyncio, os
from leveret.consumer import JobContext, Worker

worker = Worker()
QUEUE = os.environ["GROUP_QUEUE"]
_LOG = os.open(os.environ["GROUP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@worker.job(QUEUE + "-member", queue=QUEUE)
async def member(payload: dict, ctx: JobContext) -> int:
    await asyncio.sleep(0.2)
    os.write(_LOG, f"member {os.getpid()} {ctx.job_id}\\n".encode())
    return payload["n"]


@worker.job(QUEUE + "-final", queue=QUEUE + "-final")
async def final(payload: dict, ctx: JobContext) -> int:
    states = sorted({m.state for m in ctx.group.members})
    total = sum(m.result for m in ctx.group.members)
    line = {"pid": os.getpid(), "members": len(ctx.group.members), "states": states, "sum": total}
    os.write(_LOG, ("final " + __import__("json").dumps(line) + "\\n").encode())
    return total
"""


async def test_group_of_500_final_job_once_with_a_worker_sigkilled(
    broker: Broker, tmp_path: Path, made: Made
) -> None:
    exchange, queue = unique("ex"), unique("q")
    (tmp_path / "groupapp.py").write_text(APP)
    log = tmp_path / "runs.log"
    env = {
        "GROUP_QUEUE": queue,
        "GROUP_LOG": str(log),
        "LEVERET_EXCHANGE": exchange,
        "LEVERET_STATUS_URL": STATUS_URL,
        "LEVERET_PREFETCH": "20",
    }
    one = WorkerProcess.start(tmp_path, "groupapp:worker", broker.url, env=env)
    two = WorkerProcess.start(tmp_path, "groupapp:worker", broker.url, env=env)
    settings = ConnectionSettings(amqp_url=broker.url, exchange=exchange)
    with reaped(one, two):
        await one.wait_ready()
        await two.wait_ready()
        async with Publisher(settings=settings, status_url=STATUS_URL) as pub:
            started = time.monotonic()
            members = [Job(job=f"{queue}-member", payload={"n": i}) for i in range(500)]
            gid = await pub.group(members, then=Job(job=f"{queue}-final", payload={}))
            made.groups.append(gid)

            async def ended() -> int:
                status = await pub.status(gid)
                return 0 if status is None else status.ended

            await wait_for(lambda: _ended_over(ended, 100), 60, "100 members ended")
            at_kill = await ended()
            one.kill()  # SIGKILL, mid-group: its prefetched and in-flight members come back
            result = await pub.result(then_id(gid), timeout=90)
            took = time.monotonic() - started
            await asyncio.sleep(1.0)  # a second final run (a duplicate publish) would show by now
            status = await pub.status(gid)
    finals = [json.loads(line[6:]) for line in log.read_text().splitlines() if line[:6] == "final "]
    member_runs = sum(1 for line in log.read_text().splitlines() if line.startswith("member "))
    assert 100 <= at_kill < 400, at_kill
    assert len(finals) == 1, finals
    assert finals[0]["members"] == 500 and finals[0]["states"] == ["succeeded"]
    assert result == sum(range(500)) == finals[0]["sum"]
    assert status is not None and status.ended == 500
    assert status.counts == {"succeeded": 500, "dead": 0, "cancelled": 0, "pending": 0}
    assert status.then_state == "succeeded"
    print(
        f"\nGROUP-500 killed at {at_kill} ended; member runs {member_runs} (500 members); "
        f"final once; {took:.1f} s"
    )


async def _ended_over(ended: object, n: int) -> bool:
    return bool(await ended() >= n)  # type: ignore[operator]
