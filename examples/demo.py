"""The README's demo: a real worker, real jobs, and what happened to each.

Starts `leveret worker demo_app:worker` as a subprocess, publishes jobs that succeed, retry,
get rejected, fail for good and carry a bad payload, waits for every outcome, then prints where
each job ended up, the DLQ's headers, the worker's metrics and where to look in the management
UI. Exits 0 when every job ended where it should; `--keep` leaves the worker running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import httpx

from leveret import Publisher, WorkerSettings
from leveret.producers import mask_url

HERE = Path(__file__).resolve().parent
QUEUES = ("email", "images")

JOBS = [
    # (job, payload, what should happen)
    ("send_email", {"to": "ada@example.com", "subject": "welcome"}, "succeeded"),
    ("send_email", {"to": "grace@example.com", "subject": "invoice"}, "succeeded"),
    ("send_email", {"to": "flaky@example.com", "subject": "retry me"}, "succeeded after a retry"),
    ("send_email", {"to": "nobody@invalid", "subject": "bounce"}, "DLQ: rejected"),
    ("resize_image", {"image": "cat.png", "width": 320}, "succeeded"),
    ("resize_image", {"image": "dog.png", "width": 0}, "DLQ: exhausted after 2 attempts"),
    ("send_email", {"to": "carol@example.com"}, "DLQ: invalid (no subject)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


async def _dead_letters(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Read the DLQ without changing it: get each message and requeue them all at the end."""
    connection = await aio_pika.connect(url)
    messages = []
    try:
        channel = await connection.channel()
        dlq = await channel.declare_queue(f"{queue}.dlq", passive=True)
        while (message := await dlq.get(no_ack=False, fail=False)) is not None:
            messages.append(message)
    finally:
        await connection.close()  # unacked messages return to the DLQ
    return messages


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the worker exited early with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit("the worker did not become ready in time; see its log above")


def _start_console(log_path: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """``leveret api demo_app:worker`` with a token of its own: the HTTP API and the console."""
    port, token = _free_port(), secrets.token_urlsafe(16)
    env = {**os.environ, "LEVERET_API_TOKEN": token, "LEVERET_METRICS_PORT": "0"}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "leveret"),
            "api",
            "demo_app:worker",
            "--port",
            str(port),
        ],
        cwd=HERE,
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ui/login", timeout=1).status_code == 200:
                return proc, f"{url}/ui", token
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"the API and console did not start; see {log_path}")


def _metrics(port: int, name: str = "leveret_jobs_completed_total") -> list[str]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    lines = text.splitlines()
    return [line for line in lines if line.startswith(name) and not line.endswith(" 0.0")]


def _value(lines: list[str]) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def _show_status(url: str, status_url: str) -> None:
    """Publish one job and print its status each time it changes: queued → started (with its
    progress) → succeeded with its result, as `pub.status()` and `leveret job show` read it."""
    _say(f"\njob status (Redis {mask_url(status_url)}): one job, read every 50 ms as it runs")
    async with Publisher(url, status_url=status_url) as pub:
        # A 1 s delay, so that `queued` is there to see before a worker starts it.
        job_id = await pub.publish(
            "make_thumbnails", {"image": "cat.png", "sizes": [64, 128, 256]}, delay=1.0
        )
        last = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = await pub.status(job_id)
            seen = None if status is None else (status.state, status.progress, status.message)
            if status is not None and seen != last:
                last = seen
                extra = (
                    f"  progress={status.progress:.0%} {status.message!r}"
                    if (status.progress is not None and status.state == "started")
                    else ""
                )
                if status.state == "succeeded":
                    extra = f"  result={json.dumps(status.result)}"
                _say(f"  {job_id[:8]}  {status.state:<9} attempt={status.attempt}{extra}")
                if status.ended:
                    break
            await asyncio.sleep(0.05)
        _say(f"try: LEVERET_STATUS_URL={status_url} leveret job show {job_id}")


async def _show_schedule(port: int) -> None:
    """The schedule fires tidy_up every 2 s: wait for two ticks and show who fired them."""
    _say("\nschedule tidy-up (every 2 s; one leader among the worker processes fires each tick):")
    deadline = time.monotonic() + 15
    while _value(_metrics(port, "leveret_schedule_ticks_total")) < 2:
        if time.monotonic() > deadline:
            _say("  no tick yet; see the worker log (scheduler_leader, schedule_fired)")
            return
        await asyncio.sleep(0.2)
    for line in _metrics(port, "leveret_scheduler_leader") + _metrics(
        port, "leveret_schedule_ticks_total"
    ):
        _say(f"  {line}")
    _say("try: leveret schedule list demo_app:worker (from examples/)")


async def main(keep: bool) -> int:
    settings = WorkerSettings()
    url = settings.amqp_url.get_secret_value()
    port = int(os.environ.get("LEVERET_METRICS_PORT") or _free_port())
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "leveret-demo-worker.log"
    _say(f"broker:  {mask_url(url)}")
    _say(f"worker:  leveret worker demo_app:worker  (log: {log_path}, metrics :{port})")
    env = {**os.environ, "LEVERET_METRICS_PORT": str(port), "LEVERET_LOG_LEVEL": "info"}
    log_file = log_path.open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any job runs
        [str(Path(sys.executable).parent / "leveret"), "worker", "demo_app:worker"],
        cwd=HERE,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    api_log = log_path.with_name("leveret-demo-api.log")
    api, console_url, token = _start_console(api_log)
    _say(f"console: {console_url}  (sign in with the API token {token}; log: {api_log})")
    try:
        _wait_ready(port, proc)
        async with Publisher(url) as pub:
            dlq_before = {q: await _depth(url, f"{q}.dlq") for q in QUEUES}
            _say("\npublishing (each id is returned only after the broker confirmed the job):")
            ids = []
            for job, payload, expected in JOBS:
                job_id = await pub.publish(job, payload)
                ids.append(job_id)
                _say(f"  {job_id}  {job:<13} {payload!s:<52} -> expect {expected}")
        dead_expected = sum(1 for *_, e in JOBS if e.startswith("DLQ"))
        deadline = time.monotonic() + 30
        while True:
            dead_now = 0
            for q in QUEUES:
                dead_now += await _depth(url, f"{q}.dlq") - dlq_before[q]
            done = _value(  # this run's jobs, not the schedule's ticks
                [
                    line
                    for line in _metrics(port)
                    if 'outcome="succeeded"' in line and 'job_name="tidy_up"' not in line
                ]
            )
            if dead_now >= dead_expected and done >= 4:
                break
            if time.monotonic() > deadline:
                _say("timed out waiting for the jobs; see the worker log")
                return 1
            await asyncio.sleep(0.2)

        _say("\nworker metrics (leveret_jobs_completed_total):")
        for line in _metrics(port):
            _say(f"  {line}")
        _say("\ndead-letter queues (x-reason / x-attempts / x-error):")
        ours = set(ids)
        for queue in QUEUES:
            for message in await _dead_letters(url, queue):
                if message.message_id not in ours:
                    continue
                headers = message.headers or {}
                _say(
                    f"  {queue}.dlq  {message.message_id}  {headers.get('x-reason')!s:<9} "
                    f"attempts={headers.get('x-attempts')}  {headers.get('x-error')}"
                )
        _say("\nfrom the worker's log (JSON lines on stderr; these are this run's jobs):")
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("job_id") in ours:
                detail = entry.get("error") or entry.get("to") or entry.get("image") or ""
                _say(
                    f"  {entry['event']:<18} {entry['job_id'][:8]}  attempt={entry.get('attempt')}"
                    f"  {detail}"
                )
        host = urlsplit(url).hostname or "localhost"
        _say(
            f"\nsee it in the management UI: http://{host}:15672/#/queues (guest/guest):\n"
            "  email, images           work queues (x-max-priority 10; Bindings: the job names)\n"
            "  jobs.delay.1s           a retry waits here for its backoff (TTL 1 s; one chain\n"
            "                          of delay queues for every work queue of the exchange)\n"
            "  email.dlq, images.dlq   dead jobs; click one, 'Get messages' shows x-reason\n"
            "try: leveret dlq list email   |   leveret status demo_app:worker (from examples/)"
        )
        await _show_schedule(port)
        status_url = os.environ.get("LEVERET_STATUS_URL")
        if status_url:
            await _show_status(url, status_url)
        else:
            _say("\n(no LEVERET_STATUS_URL: start Redis to see a job's status change as it runs)")
        _say(f"\nthe web console: {console_url}  (sign in with the API token {token})")
        if keep:
            _say(
                f"worker and console keep running (metrics http://127.0.0.1:{port}/metrics); "
                "Ctrl-C stops"
            )
            await asyncio.to_thread(proc.wait)
        return 0
    finally:
        if api.poll() is None:
            api.send_signal(signal.SIGTERM)
            try:
                api.wait(timeout=20)
            except subprocess.TimeoutExpired:
                api.kill()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
        log_file.close()
        if proc.returncode not in (0, None, -signal.SIGTERM):
            _say(f"worker exited with {proc.returncode}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the worker running")
    try:
        sys.exit(asyncio.run(main(parser.parse_args().keep)))
    except KeyboardInterrupt:
        sys.exit(0)
