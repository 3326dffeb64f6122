"""A vhost the broker will not open (absent, or the user has no permission on it): `leveret
publish` and `leveret dlq list` exit non-zero with one clear line naming the vhost, `leveret
worker` logs that line as it retries (as for a refused login); never a traceback or the password.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from yarl import URL

from tests.support import Broker, leveret_cli

SECRET = "Vh0st-very-secret-PW"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@contextlib.contextmanager
def _user_without_permissions(broker: Broker) -> Iterator[str]:
    """A user (password SECRET) with no permission on any vhost; deleted afterwards."""
    name = f"leveret-noperm-{uuid.uuid4().hex[:8]}"
    response = broker.api("PUT", f"/users/{name}", json={"password": SECRET, "tags": ""})
    assert response.status_code in (201, 204), response.text
    try:
        yield name
    finally:
        broker.api("DELETE", f"/users/{name}")


@pytest.fixture(params=["missing", "forbidden"])
def refused(request: pytest.FixtureRequest, broker: Broker) -> Iterator[tuple[str, str]]:
    """(url, vhost): a vhost that does not exist, or the run's vhost for a user who may not
    open it. The user is one of the test's own, so its password is one no output may hold."""
    with _user_without_permissions(broker) as user:
        url = URL(broker.url).with_user(user).with_password(SECRET)
        if request.param == "missing":
            vhost = f"leveret-no-such-vhost-{uuid.uuid4().hex[:8]}"
            yield str(url.with_path("/" + quote(vhost, safe=""), encoded=True)), vhost
        else:
            yield str(url), broker.vhost


def _one_clear_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args", [("publish", "some_job", "{}"), ("dlq", "list", "some_queue")], ids=["publish", "dlq"]
)
def test_a_refused_vhost_is_one_clear_line(refused: tuple[str, str], args: tuple[str, ...]) -> None:
    url, vhost = refused
    result = leveret_cli(*args, env={"LEVERET_AMQP_URL": url})
    line = _one_clear_line(result)
    assert f"refused to open vhost {vhost!r}" in line, line
    assert "permissions" in line


def test_the_worker_logs_a_refused_vhost_as_one_clear_line(refused: tuple[str, str]) -> None:
    url, vhost = refused
    exe = str(Path(sys.executable).parent / "leveret")
    env = {"LEVERET_AMQP_URL": url, "LEVERET_METRICS_PORT": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [exe, "worker", "demo_app:worker"], cwd=EXAMPLES, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(4)  # the first attempt and at least one retry (0.5 s, then about 1 s)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    assert SECRET not in out + err
    failures = [json.loads(line) for line in err.splitlines() if "broker_unavailable" in line]
    assert failures, err
    assert all(f"refused to open vhost {vhost!r}" in f["error"] for f in failures), failures
