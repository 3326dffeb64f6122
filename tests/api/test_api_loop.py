"""``leveret api --loop asyncio|uvloop``: the server runs on the loop asked for, says so in its
start line, and serves (a job published through it reaches the broker).

Run as a user runs it: the command in a subprocess against the real broker (a vhost of the
test's own), looked at over HTTP and through its log lines on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.support import ROOT, Broker

from .conftest import free_port

TOKEN = "loop-test-token"


def _env(broker: Broker) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEVERET_")}
    env.update(LEVERET_AMQP_URL=broker.url, LEVERET_METRICS_PORT="0", LEVERET_API_TOKEN=TOKEN)
    return env


def _wait_answering(proc: subprocess.Popen[str], base: str) -> None:
    """Until the API takes a job (202): it is up, connected, and its topology declared."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "leveret api exited early"
        try:
            response = httpx.post(f"{base}/jobs/api_cli_ping", json={"n": 1}, headers=auth)
            if response.status_code == 202:
                return
            assert response.status_code == 503, response.text  # not connected yet
        except httpx.TransportError:
            pass  # not listening yet
        assert time.monotonic() < deadline, "leveret api never took a job"
        time.sleep(0.2)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_api_runs_on_the_loop_asked_for(broker: Broker, loop: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "leveret", "api", "tests.api.cli_app:worker",
         "--port", str(port), "--loop", loop],
        env=_env(broker), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_answering(proc, f"http://127.0.0.1:{port}")
        assert broker.queue_exists("api_cli")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    started = [line for line in lines if line.get("event") == "event_loop"]
    # One start line, naming the loop the server really ran on (read from inside it).
    assert [(s["loop"], s["asked"]) for s in started] == [(loop, loop)], stderr


def test_api_loop_choices_are_the_workers() -> None:
    """One list of choices for both commands (the shared helper's), shown by --help."""
    result = subprocess.run(
        [sys.executable, "-m", "leveret", "api", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "--loop [auto|asyncio|uvloop]" in result.stdout
