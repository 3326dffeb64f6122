"""The `leveret` command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.support import Broker, leveret_cli, unique

SECRET = "Zq9-very-secret-PW"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_dir(tmp_path: Path) -> tuple[Path, str]:
    """An app module in a temp dir, with one job on a unique queue."""
    queue = unique("cli")
    (tmp_path / "cliapp.py").write_text(
        textwrap.dedent(
            f"""
            from pydantic import BaseModel
            from leveret.consumer import Worker

            worker = Worker()
            not_a_worker = 42

            class P(BaseModel):
                n: int

            @worker.job("{queue}-job", queue="{queue}", max_attempts=1)
            async def handle(p: P) -> None:
                print("ran", p.n, flush=True)
            """
        )
    )
    return tmp_path, queue


def _env(broker: Broker, **extra: str) -> dict[str, str]:
    return {"LEVERET_AMQP_URL": broker.url, "LEVERET_METRICS_PORT": "0", **extra}


def _one_clear_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("worker", "--help"),
        ("topology", "declare", "--help"),
        ("topology", "export", "--help"),
        ("publish", "--help"),
    ],
)
def test_help_shows_an_example(args: tuple[str, ...]) -> None:
    """Every command's --help exits 0 and shows how it is used."""
    result = leveret_cli(*args)
    assert result.returncode == 0
    assert "Example" in result.stdout or "leveret COMMAND" in result.stdout


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("cliapp", "module:attribute"),
        ("nosuchmodule:worker", "cannot import module 'nosuchmodule'"),
        ("cliapp:nothing", "has no attribute 'nothing'"),
        ("cliapp:not_a_worker", "not a consumer.Worker"),
    ],
)
def test_a_bad_app_is_one_clear_line(
    broker: Broker, app_dir: tuple[Path, str], spec: str, expected: str
) -> None:
    """A wrong APP exits non-zero with one line that says what is wrong."""
    path, _ = app_dir
    result = leveret_cli("topology", "declare", spec, env=_env(broker), cwd=path)
    assert expected in _one_clear_line(result)


def test_bad_json_on_the_command_line_is_one_clear_line(broker: Broker) -> None:
    """publish with malformed JSON says so and how to quote it."""
    result = leveret_cli("publish", "job", "{to: 1}", env=_env(broker))
    assert "not valid JSON" in _one_clear_line(result)


def test_an_unreachable_broker_is_one_clear_line_without_the_password() -> None:
    """Nothing listens on the port: one line, masked URL, non-zero exit."""
    url = f"amqp://guest:{SECRET}@127.0.0.1:{_free_port()}/"
    result = leveret_cli("publish", "job", "{}", env={"LEVERET_AMQP_URL": url})
    line = _one_clear_line(result)
    assert "cannot connect" in line and "******" in line
    assert SECRET not in result.stderr + result.stdout


def test_wrong_credentials_are_one_clear_line_without_the_password(broker: Broker) -> None:
    """A refused login says to check the credentials and never prints the password."""
    url = broker.url.replace(f":{broker.password}@", f":{SECRET}@")
    result = leveret_cli("publish", "job", "{}", env={"LEVERET_AMQP_URL": url})
    assert "login refused" in _one_clear_line(result)
    assert SECRET not in result.stderr + result.stdout


def test_declare_export_publish_round_trip(broker: Broker, app_dir: tuple[Path, str]) -> None:
    """declare twice succeeds; export is JSON alone on stdout; publish prints the id."""
    path, queue = app_dir
    env = _env(broker)
    for _ in range(2):
        result = leveret_cli("topology", "declare", "cliapp:worker", env=env, cwd=path)
        assert result.returncode == 0, result.stderr
    exported = leveret_cli("topology", "export", "cliapp:worker", env=env, cwd=path)
    assert exported.returncode == 0
    definitions = json.loads(exported.stdout)
    assert queue in {q["name"] for q in definitions["queues"]}
    published = leveret_cli("publish", f"{queue}-job", '{"n": 1}', "--id", "my-id", env=env)
    assert published.returncode == 0, published.stderr
    assert published.stdout.strip() == "my-id"
    unroutable = leveret_cli("publish", f"{queue}-nobody", "{}", env=env)
    assert "unroutable" in _one_clear_line(unroutable)


def test_the_worker_runs_jobs_and_exits_zero_on_sigterm(
    broker: Broker, app_dir: tuple[Path, str]
) -> None:
    """`leveret worker` serves health endpoints, runs a job and exits 0 on SIGTERM."""
    path, queue = app_dir
    port = _free_port()
    env = {**os.environ, **_env(broker, LEVERET_METRICS_PORT=str(port))}
    exe = str(Path(sys.executable).parent / "leveret")
    proc = subprocess.Popen(
        [exe, "worker", "cliapp:worker"],
        cwd=path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        published = leveret_cli("publish", f"{queue}-job", '{"n": 7}', env=_env(broker))
        assert published.returncode == 0
        deadline = time.monotonic() + 10
        while (
            "leveret_jobs_completed_total"
            not in (metrics := httpx.get(f"http://127.0.0.1:{port}/metrics").text)
            or f'job_name="{queue}-job",outcome="succeeded"' not in metrics
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "ran 7" in out
    for line in err.splitlines():
        json.loads(line)  # stderr is not a terminal: JSON lines only


def test_a_worker_without_a_broker_keeps_trying_and_is_not_ready() -> None:
    """No broker: /readyz is 503, /healthz 200, one log line per failure, no password."""
    port = _free_port()
    url = f"amqp://guest:{SECRET}@127.0.0.1:{_free_port()}/"
    env = {**os.environ, "LEVERET_AMQP_URL": url, "LEVERET_METRICS_PORT": str(port)}
    exe = str(Path(sys.executable).parent / "leveret")
    app = Path(__file__).resolve().parents[2] / "examples"
    proc = subprocess.Popen(
        [exe, "worker", "demo_app:worker"], cwd=app, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                readyz = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert readyz.status_code == 503
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    failures = [json.loads(line) for line in err.splitlines() if "broker_unavailable" in line]
    assert len(failures) >= 2
    assert all("******" in f["error"] for f in failures)
    assert SECRET not in err
