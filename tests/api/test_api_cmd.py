"""``leveret api APP`` as a process: refuses to start without a token, serves with one, stops
on SIGTERM. The command is run from its module (``api_cmd``) until the lead registers it in
the ``leveret`` group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.support import ROOT, Broker

from .conftest import free_port

RUN = "from leveret.consumer.cli.api_cmd import api; api()"


def _env(broker: Broker, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEVERET_")}
    env.update(LEVERET_AMQP_URL=broker.url, LEVERET_METRICS_PORT="0", **extra)
    return env


def test_refuses_to_start_without_a_token(broker: Broker) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", RUN, "tests.api.cli_app:worker"],
        env=_env(broker), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "LEVERET_API_TOKEN" in proc.stderr
    assert "--insecure-no-auth" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serves_with_a_token_and_stops_on_sigterm(broker: Broker) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, "tests.api.cli_app:worker", "--port", str(port)],
        env=_env(broker, LEVERET_API_TOKEN="cli-token"), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        auth = {"Authorization": "Bearer cli-token"}
        deadline = time.monotonic() + 30
        while True:  # 503 until it has connected and declared the topology
            response = httpx.post(f"{base}/jobs/api_cli_ping", json={"n": 1}, headers=auth)
            if response.status_code == 202:
                break
            assert response.status_code == 503 and time.monotonic() < deadline, response.text
            time.sleep(0.2)
        assert broker.queue_exists("api_cli"), "the API declared the app's topology"
        assert httpx.get(f"{base}/jobs/x").status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "cli-token" not in stderr
