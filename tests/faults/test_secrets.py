"""Scenario 8: a distinctive password never shows, whatever goes wrong."""

from __future__ import annotations

import asyncio
import signal
import traceback
from pathlib import Path

import httpx
import pytest
from yarl import URL

from leveret.consumer import WorkerSettings
from leveret.producers import Publisher
from leveret.producers.errors import BrokerUnavailable
from tests.faults.plumbing import DedicatedNode, free_port, install_app, reaped, record
from tests.support import Broker, leveret_cli, unique, wait_for

# "/" must be percent-encoded in a URL: both spellings are checked.
PASSWORD = "Zebra-S3cret-pw/42"
MARKERS = ("Zebra-S3cret", "S3cret-pw", "pw%2F42", "pw/42")


def secret_url(base: str, user: str = "guest", password: str = PASSWORD) -> str:
    return str(URL(base).with_user(user).with_password(password))


def assert_clean(text: str, where: str) -> None:
    for marker in MARKERS:
        assert marker not in text, f"the password leaked in {where}: ...{text[-600:]}"


async def test_password_never_shows_in_library_errors(broker: Broker) -> None:
    """Refused login and unreachable broker: error text, repr and traceback are masked."""
    refused = secret_url(broker.url)
    unreachable = secret_url(f"amqp://127.0.0.1:{free_port()}/")
    for url in (refused, unreachable):
        pub = Publisher(url)
        assert_clean(repr(pub), "Publisher repr")
        with pytest.raises(BrokerUnavailable) as caught:
            await pub.connect()
        text = "".join(traceback.format_exception(caught.value))
        assert_clean(text, "the exception and its traceback")
        assert_clean(repr(caught.value), "the exception repr")
        assert "******" in str(caught.value)
        settings = WorkerSettings(amqp_url=url)
        assert_clean(repr(settings) + str(settings.model_dump()), "settings repr")


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_password_never_shows_on_the_command_line(
    broker: Broker, tmp_path: Path, level: str
) -> None:
    """publish, status, dlq, --help and a retrying worker print no password, even at debug."""
    app = install_app(tmp_path, unique("secret"), broker.url)
    outputs: list[tuple[str, str]] = []
    for url in (secret_url(broker.url), secret_url(f"amqp://127.0.0.1:{free_port()}/")):
        env = {"LEVERET_AMQP_URL": url, "LEVERET_LOG_LEVEL": level, **app.env()}
        for args in (
            ("publish", app.job, "{}"),
            ("status",),
            ("dlq", "list", app.queue),
            ("--help",),
            ("worker", "--help"),
            ("publish", "--help"),
        ):
            done = await asyncio.to_thread(leveret_cli, *args, env=env, cwd=tmp_path)
            outputs.append((" ".join(args), done.stdout + done.stderr))
            if args[0] in ("publish", "status", "dlq") and "--help" not in args:
                assert done.returncode != 0, (args, done.stderr)
                assert "Traceback" not in done.stderr
        worker = app.worker(LEVERET_AMQP_URL=url, LEVERET_LOG_LEVEL=level)
        with reaped(worker):
            await wait_for(lambda w=worker: w.log().count("broker_unavailable") >= 2, 20, "retries")
            assert worker.proc.poll() is None  # it keeps trying, it does not give up
            worker.proc.send_signal(signal.SIGTERM)
            await worker.wait_exit(10)
        outputs.append(("worker", worker.log_path.read_text()))
    for what, text in outputs:
        assert_clean(text, what)
    record(
        "secrets: refused + unreachable",
        jobs=0,
        lost=0,
        duplicated=0,
        outputs_checked=len(outputs),
        level=level,
    )


@pytest.mark.slow
async def test_password_never_shows_in_metrics_or_logs_of_a_working_worker(
    node: DedicatedNode, tmp_path: Path
) -> None:
    """A worker logged in with the distinctive password: logs, /metrics, errors stay clean."""
    user = unique("secret-user")
    await asyncio.to_thread(node.ctl, "add_user", user, PASSWORD)
    await asyncio.to_thread(node.ctl, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
    try:
        url = secret_url(node.url, user)
        app = install_app(tmp_path, unique("secret"), url)
        worker = app.worker(LEVERET_LOG_LEVEL="debug")
        with reaped(worker):
            await worker.wait_ready()
            async with Publisher(url) as pub:
                job_id = await pub.publish(app.job, {})
                # A refused job: the error names the job, not the URL.
                with pytest.raises(Exception) as refused:
                    await pub.publish(unique("nobody"), {})
            assert_clean(str(refused.value), "an unroutable-job error")
            await wait_for(lambda: any(r[2] == job_id for r in app.runs()), 20, "the job")
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")).text
            assert "leveret_jobs_started_total" in metrics
            assert_clean(metrics, "/metrics")
            worker.proc.send_signal(signal.SIGTERM)
            assert await worker.wait_exit(10) == 0
        assert_clean(worker.log_path.read_text(), "the worker's debug log")
    finally:
        await asyncio.to_thread(node.ctl, "delete_user", user, check=False)
