"""Standard-library logging from a handler reaches stderr as JSON, with the job's context."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from tests.support import Broker, leveret_cli, unique


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_handlers_stdlib_log_line_is_json_with_the_job_context(
    broker: Broker, tmp_path: Path
) -> None:
    """`leveret worker` at info: the handler's logging.error shows, AMQP library chatter not."""
    queue = unique("stdlog")
    done = tmp_path / "done"
    (tmp_path / "logapp.py").write_text(
        textwrap.dedent(
            f"""
            import logging
            from pathlib import Path
            from pydantic import BaseModel
            from leveret.consumer import Worker

            worker = Worker()
            log = logging.getLogger("logapp.billing")

            class P(BaseModel):
                n: int

            @worker.job("{queue}-job", queue="{queue}", max_attempts=1)
            async def handle(p: P) -> None:
                log.error("charge %d failed", p.n, extra={{"customer": "c-42"}})
                log.debug("too detailed for info")
                # What the AMQP client libraries say: quieted below debug.
                logging.getLogger("aiormq.connection").warning("aiormq chatter")
                logging.getLogger("aio_pika.robust_connection").warning("aio_pika chatter")
                Path({str(done)!r}).write_text("done")
            """
        )
    )
    port = _free_port()
    env = {
        **os.environ,
        "LEVERET_AMQP_URL": broker.url,
        "LEVERET_METRICS_PORT": str(port),
        "LEVERET_LOG_LEVEL": "info",
    }
    exe = str(Path(sys.executable).parent / "leveret")
    proc = subprocess.Popen(
        [exe, "worker", "logapp:worker"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "worker never ready"
            time.sleep(0.1)
        published = leveret_cli(
            "publish", f"{queue}-job", '{"n": 7}', "--id", "job-log-1",
            env={"LEVERET_AMQP_URL": broker.url},
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        deadline = time.monotonic() + 15
        while not done.exists():
            assert time.monotonic() < deadline, "the job never ran"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]  # JSON lines only
    (line,) = [x for x in lines if x.get("event") == "charge 7 failed"]
    assert line["level"] == "error"
    assert line["logger"] == "logapp.billing"
    assert line["customer"] == "c-42"
    assert line["job_id"] == "job-log-1"
    assert line["job"] == f"{queue}-job"
    assert line["queue"] == queue
    assert "timestamp" in line
    assert "too detailed" not in err
    assert "chatter" not in err
