"""`leveret schedule list` and `leveret publish --eta`, run as a user runs them."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import aio_pika
import pytest

from leveret.consumer.features.schedules.spec import make_schedule, parse_tick
from leveret.topology import Topology, WorkQueue, declare
from leveret.topology.delay import MAX_LATENESS_S
from tests.support import Broker, leveret_cli, unique

APP = """
from datetime import timedelta
from leveret.consumer import Worker

worker = Worker()
# Declared before its job: the check runs once the app has loaded.
worker.schedule("cleanup", cron="*/15 * * * *", tz="Europe/Paris", payload={"days": 30})
worker.schedule("beat", every=timedelta(seconds=30), name="hb", missed="skip")

@worker.job("cleanup", queue="{queue}")
async def cleanup(p: dict) -> None: ...

@worker.job("beat", queue="{queue}")
async def beat(p: dict) -> None: ...

unregistered = Worker()
unregistered.schedule("nojob", every=5)

@unregistered.job("cleanup", queue="{queue}")
async def cleanup2(p: dict) -> None: ...

twice = Worker()
twice.schedule("cleanup", every=5)
twice.schedule("cleanup", every=7)

@twice.job("cleanup", queue="{queue}")
async def cleanup3(p: dict) -> None: ...
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    queue = unique("sched")
    (tmp_path / "schedapp.py").write_text(textwrap.dedent(APP).replace("{queue}", queue))
    (tmp_path / "badtz.py").write_text(
        "from leveret.consumer import Worker\nworker = Worker()\n"
        "worker.schedule('x', cron='* * * * *', tz='Mars/Olympus')\n"
    )
    (tmp_path / "badcron.py").write_text(
        "from leveret.consumer import Worker\nworker = Worker()\n"
        "worker.schedule('x', cron='61 * * * *')\n"
    )
    return tmp_path


def _env(broker: Broker) -> dict[str, str]:
    return {"LEVERET_AMQP_URL": broker.url, "LEVERET_METRICS_PORT": "0"}


def _one_clear_line(result: object) -> str:
    assert result.returncode != 0  # type: ignore[attr-defined]
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("args", [("schedule", "list", "--help"), ("publish", "--help")])
def test_help_shows_an_example(args: tuple[str, ...]) -> None:
    result = leveret_cli(*args)
    assert result.returncode == 0
    assert "Example" in result.stdout
    assert ("--eta 2027-01-01T09:00:00+01:00" in result.stdout) == (args[0] == "publish")


def test_schedule_list_shows_each_schedule_and_its_next_fire_time(app_dir: Path) -> None:
    before = datetime.now(UTC)
    table = leveret_cli("schedule", "list", "schedapp:worker", cwd=app_dir)
    as_json = leveret_cli("schedule", "list", "schedapp:worker", "--json", cwd=app_dir)
    after = datetime.now(UTC)
    assert table.returncode == 0 and as_json.returncode == 0, table.stderr + as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(r["name"], r["job"], r["expression"], r["tz"], r["missed"]) for r in rows] == [
        ("cleanup", "cleanup", "*/15 * * * *", "Europe/Paris", "once"),
        ("hb", "beat", "every 30s", "UTC", "skip"),
    ]
    schedules = {
        "cleanup": make_schedule("cleanup", cron="*/15 * * * *", tz="Europe/Paris"),
        "hb": make_schedule("beat", every=30, name="hb"),
    }
    for row in rows:
        nxt = parse_tick(row["next_fire_utc"])
        assert row["next_fire_utc"].endswith("Z")
        # The next tick after some instant of the command's run.
        assert schedules[row["name"]].next_after(before) <= nxt
        assert nxt <= schedules[row["name"]].next_after(after)
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "JOB", "EXPRESSION", "TZ", "NEXT", "FIRE", "(UTC)",
                                "MISSED", "SOURCE"]  # fmt: skip
    assert lines[1].split()[0] == "cleanup" and rows[0]["next_fire_utc"] in lines[1]
    assert lines[2].split()[0] == "hb" and rows[1]["next_fire_utc"] in lines[2]
    assert "2 schedule(s)" in table.stderr


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("schedapp:unregistered", "names job 'nojob', which is not registered"),
        ("schedapp:twice", "two schedules are named 'cleanup'"),
        ("badtz:worker", "unknown time zone 'Mars/Olympus'"),
        ("badcron:worker", "bad cron expression '61 * * * *'"),
    ],
)
@pytest.mark.parametrize("command", [("schedule", "list"), ("topology", "declare"), ("worker",)])
def test_a_bad_schedule_refuses_the_app_with_one_line(
    broker: Broker, app_dir: Path, spec: str, expected: str, command: tuple[str, ...]
) -> None:
    """The worker, topology declare and schedule list all refuse it before doing anything."""
    result = leveret_cli(*command, spec, env=_env(broker), cwd=app_dir, timeout=30)
    assert expected in _one_clear_line(result)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--eta", "2027-01-01T09:00:00"), "has no UTC offset"),
        (("--eta", "next tuesday"), "not an ISO 8601 time"),
        (("--eta", "2099-01-01T09:00:00Z"), "about 388 days"),
        (("--eta", "2027-01-01T09:00:00Z", "--delay", "5"), "not both"),
    ],
)
def test_a_bad_eta_is_one_clear_line(broker: Broker, args: tuple[str, ...], expected: str) -> None:
    result = leveret_cli("publish", "some-job", "{}", *args, env=_env(broker))
    assert expected in _one_clear_line(result)


async def test_publish_eta_lands_no_earlier_than_its_time(broker: Broker) -> None:
    """--eta 8 s ahead (room for the CLI's start on a busy machine), written with a +01:00
    offset: the job arrives inside its bound."""
    queue = unique("etacli")
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, Topology(queues=(WorkQueue(name=queue, jobs=(f"{queue}-j",)),)))
        eta = datetime.fromtimestamp(time.time() + 8, timezone(timedelta(hours=1)))
        result = leveret_cli(
            "publish", f"{queue}-j", "{}", "--eta", eta.isoformat(), "--id", "eta-cli",
            env=_env(broker),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "eta-cli"
        assert time.time() < eta.timestamp(), "the CLI took longer than the eta was ahead"
        q = await (await connection.channel()).get_queue(queue)
        while (message := await q.get(fail=False, no_ack=True)) is None:
            assert time.time() < eta.timestamp() + 5, "the job never arrived"
            await asyncio.sleep(0.01)
        arrived = time.time()
        assert message.message_id == "eta-cli"
        assert 0 <= arrived - eta.timestamp() < MAX_LATENESS_S + 0.1
    finally:
        await connection.close()
