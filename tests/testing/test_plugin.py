"""The pytest plugin, used the way a user's project would: a test in a fresh directory (no
conftest of ours), the installed package, the plugin loaded by its ``pytest11`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

USER_TEST = '''
import asyncio
import os

import httpx
from pydantic import BaseModel

from leveret.consumer import JobContext, Worker, WorkerSettings
from leveret.producers import Publisher

VHOSTS = os.environ["VHOST_LOG"]


class P(BaseModel):
    n: int


async def test_a_job_round_trip_on_a_fresh_vhost(leveret_amqp_url):
    vhost = leveret_amqp_url.rsplit("/", 1)[1]
    open(VHOSTS, "a").write(vhost + "\\n")
    assert vhost.startswith("leveret-test-")
    worker = Worker(WorkerSettings(amqp_url=leveret_amqp_url, metrics_port=0))
    done = asyncio.Event()

    @worker.job("double")
    async def double(p: P, ctx: JobContext) -> int:
        done.set()
        return p.n * 2

    task = asyncio.create_task(worker.run())
    for _ in range(600):  # until it consumes (it declares the topology first)
        if worker.ready or task.done():
            break
        await asyncio.sleep(0.05)
    assert worker.ready
    async with Publisher(leveret_amqp_url) as pub:
        await pub.publish("double", {"n": 21})
        await asyncio.wait_for(done.wait(), 20)
    worker.stop()
    await asyncio.wait_for(task, 20)


def test_each_test_gets_its_own_vhost(leveret_amqp_url):
    vhost = leveret_amqp_url.rsplit("/", 1)[1]
    open(VHOSTS, "a").write(vhost + "\\n")
'''


def test_the_plugin_in_a_fresh_directory(tmp_path: Path) -> None:
    (tmp_path / "test_user_jobs.py").write_text(textwrap.dedent(USER_TEST))
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    log = tmp_path / "vhosts.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        VHOST_LOG=str(log),
        LEVERET_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/",
        PYTHONPATH="",  # nothing of the repository but the installed package
    )
    result = subprocess.run(
        # No `-p`: the installed package registers the plugin through its pytest11 entry point.
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    vhosts = log.read_text().split()
    assert len(vhosts) == 2 and vhosts[0] != vhosts[1]
    existing = {
        v["name"]
        for v in httpx.get("http://127.0.0.1:15672/api/vhosts", auth=("guest", "guest")).json()
    }
    assert not existing & set(vhosts)  # both deleted after their tests
    assert "tests/conftest.py" not in result.stdout + result.stderr
