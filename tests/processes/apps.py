"""A worker app written to a temp dir, and a ``leveret worker`` subprocess around it.

The app's one job records every run it finishes as a line ``<job id> <pid> <attempt> <outcome>``
in the file ``LEVERET_TEST_OUT`` (appends of one short line are atomic), so a test can count
runs per id and per process after the processes are gone: that is what "no job lost" and
"both processes ran jobs" are checked against, not the worker's own counters.

Payload ``{"n": …, "mode": …}``: ``ok`` succeeds, ``fail_once`` raises on its first attempt
(a retry), ``reject`` raises ``Reject`` (straight to the DLQ); ``sleep`` seconds first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

APP = "procapp:worker"
JOB = "proc_job"


def write_app(directory: Path, queue: str) -> Path:
    (directory / "procapp.py").write_text(
        textwrap.dedent(
            f"""
            import asyncio, os
            from pydantic import BaseModel
            from leveret.consumer import JobContext, Reject, Worker

            worker = Worker()
            OUT = os.environ["LEVERET_TEST_OUT"]

            class P(BaseModel):
                n: int
                mode: str = "ok"
                sleep: float = 0.0

            def record(ctx, outcome):
                line = f"{{ctx.job_id}} {{os.getpid()}} {{ctx.attempt}} {{outcome}}\\n"
                fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)

            @worker.job("{JOB}", queue="{queue}", max_attempts=3, backoff=0.5)
            async def proc_job(p: P, ctx: JobContext) -> None:
                if p.sleep:
                    await asyncio.sleep(p.sleep)
                if p.mode == "fail_once" and ctx.attempt == 1:
                    record(ctx, "failed")
                    raise RuntimeError("first attempt fails")
                if p.mode == "reject":
                    record(ctx, "rejected")
                    raise Reject("rejected on purpose")
                record(ctx, "ok")
            """
        )
    )
    return directory


@dataclass
class Runs:
    """The lines of the out file, read once."""

    lines: list[tuple[str, int, int, str]]

    @classmethod
    def read(cls, path: Path) -> Runs:
        if not path.exists():
            return cls([])
        rows = []
        for raw in path.read_text().splitlines():
            job_id, pid, attempt, outcome = raw.split()
            rows.append((job_id, int(pid), int(attempt), outcome))
        return cls(rows)

    def ids(self, outcome: str | None = None) -> set[str]:
        return {r[0] for r in self.lines if outcome is None or r[3] == outcome}

    def pids(self) -> set[int]:
        return {r[1] for r in self.lines}

    def finals(self) -> Counter[str]:
        """Runs that ended a job (ok or rejected) per id: more than 1 is a duplicate."""
        return Counter(r[0] for r in self.lines if r[3] in ("ok", "rejected"))


class WorkerProcess:
    """``leveret worker APP …`` in the background, stderr (JSON log lines) to a file."""

    def __init__(self, cwd: Path, env: dict[str, str], *args: str) -> None:
        self.log_path = cwd / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        exe = str(Path(sys.executable).parent / "leveret")
        self.proc = subprocess.Popen(
            [exe, "worker", APP, *args],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def wait_event(self, name: str, count: int = 1, timeout: float = 30) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while len(found := self.events(name)) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}x {name} within {timeout} s: {self.tail()}")
            time.sleep(0.1)
        return found

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._log.close()


def readyz(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=3).status_code
    except httpx.HTTPError:
        return 0


def wait_status(port: int, status: int, timeout: float = 30) -> float:
    """Poll /readyz until it answers ``status``; the seconds it took."""
    t0 = time.monotonic()
    while (got := readyz(port)) != status:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"/readyz answered {got}, not {status}, for {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - t0


def metric_sum(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
