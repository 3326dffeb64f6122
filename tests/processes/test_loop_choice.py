"""``--loop auto|asyncio|uvloop``: the worker runs on the loop asked for and logs which, and
``BlockingPublisher``'s loop thread takes the same choice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from leveret.producers import BlockingPublisher
from leveret.producers.eventloop import LoopUnavailable, resolve, uvloop_available
from tests.processes.apps import WorkerProcess, write_app
from tests.support import Broker, leveret_cli, unique

needs_uvloop = pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed")


@needs_uvloop
@pytest.mark.parametrize(
    ("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")]
)
def test_the_worker_runs_and_logs_the_loop_asked_for(
    tmp_path: Path, broker: Broker, choice: str, expected: str
) -> None:
    write_app(tmp_path, unique("loop"))
    env = {
        "LEVERET_AMQP_URL": broker.url,
        "LEVERET_METRICS_PORT": "0",
        "LEVERET_TEST_OUT": str(tmp_path / "runs.txt"),
    }
    w = WorkerProcess(tmp_path, env, "--loop", choice)
    try:
        line = w.wait_event("event_loop")[0]
        w.wait_event("consuming")  # and it works on that loop
    finally:
        code = w.stop()
    assert code == 0, w.tail()
    assert line["loop"] == expected and line["asked"] == choice


def test_an_unknown_loop_is_refused_in_one_line(tmp_path: Path) -> None:
    result = leveret_cli("worker", "x:y", "--loop", "trio", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "trio" in result.stderr
    with pytest.raises(LoopUnavailable):
        resolve("trio")


@needs_uvloop
@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_the_blocking_publishers_loop_thread(broker: Broker, choice: str, expected: str) -> None:
    with BlockingPublisher(broker.url, loop=choice) as pub:  # type: ignore[arg-type]
        module = type(pub._loop).__module__
        assert module.startswith(expected), module
        assert isinstance(pub._loop, asyncio.AbstractEventLoop)
