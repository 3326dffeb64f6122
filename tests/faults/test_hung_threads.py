"""Issue 9 item 6: a process whose plain ``def`` handler hangs forever can still exit.

Python cannot stop a thread; the worker's job threads are daemon threads, so after a graceful
stop the interpreter does not wait for a handler that never returns (``concurrent.futures``
threads are joined at exit, and the process would hang there).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from tests.support import ROOT, Broker, unique

SCRIPT = """
import asyncio, sys, threading, time
from pydantic import BaseModel
from leveret.consumer import Worker, WorkerSettings
from leveret.producers import Publisher

class P(BaseModel):
    n: int

worker = Worker(WorkerSettings(amqp_url=sys.argv[1], metrics_port=0, shutdown_grace=0.5))
queue = sys.argv[2]
started = threading.Event()

@worker.job(queue + "-job", queue=queue, max_attempts=1, timeout=0.2)
def hang(p: P) -> None:
    started.set()
    time.sleep(3600)

async def main() -> None:
    task = asyncio.create_task(worker.run())
    while not worker.ready:
        await asyncio.sleep(0.05)
    async with Publisher(sys.argv[1]) as pub:
        await pub.publish(queue + "-job", {"n": 1})
    while not started.is_set():
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # past its timeout: the thread runs on
    worker.stop()
    await task
    print("run returned", flush=True)

asyncio.run(main())
"""


async def test_a_process_with_a_hung_def_handler_exits_after_stop(
    broker: Broker, tmp_path: Path
) -> None:
    script = tmp_path / "hung.py"
    script.write_text(SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        broker.url,
        unique("hung"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    t0 = time.monotonic()
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()  # our own child, by its handle
        out, err = await proc.communicate()
        raise AssertionError(
            f"the process did not exit: {out.decode()[-500:]} {err.decode()[-1500:]}"
        ) from None
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"run returned" in out
    assert time.monotonic() - t0 < 30
