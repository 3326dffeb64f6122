"""`leveret doctor` flags what would go wrong, each finding saying what to change."""

from __future__ import annotations

import json
import re
import subprocess

import aio_pika
from yarl import URL

from leveret.topology import WorkQueue
from tests.ops.helpers import app_module
from tests.support import leveret_cli, unique

APP = """
    from pydantic import BaseModel
    from leveret.consumer import Worker

    worker = Worker()

    class P(BaseModel):
        n: int

    @worker.job("work", queue="{queue}", timeout={timeout})
    async def work(p: P) -> None:
        pass
"""


def broker_consumer_timeout_s(broker) -> float:
    """The shared broker's real consumer_timeout (read, never changed); 30 min by default."""
    if broker.local:
        out = subprocess.run(
            ["rabbitmqctl", "eval", "application:get_env(rabbit, consumer_timeout)."],
            capture_output=True, text=True, timeout=60, check=False,
        ).stdout  # fmt: skip
        match = re.search(r"\{ok,\s*(\d+)\}", out)
        if match:
            return int(match[1]) / 1000
    return 1800.0


def findings(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_doctor_passes_a_healthy_app(broker, tmp_path):
    """A declared app with a bounded timeout has no errors, and doctor exits 0."""
    queue = unique("ok")
    with app_module(tmp_path, APP.format(queue=queue, timeout=60), "healthyapp") as app:
        env = {"LEVERET_AMQP_URL": broker.url}
        assert leveret_cli("topology", "declare", app, cwd=tmp_path, env=env).returncode == 0
        result = leveret_cli("doctor", app, "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = findings(result)
    assert not [f for f in seen if f["severity"] == "error"]
    checks = {(f["check"], f["severity"]) for f in seen}
    assert {("management", "ok"), ("queue_arguments", "ok"), ("permissions", "ok")} <= checks
    assert any(f["check"] == "version" and "RabbitMQ 3." in f["message"] for f in seen)
    assert "guest:guest" not in result.stdout + result.stderr


def test_doctor_flags_a_job_timeout_above_consumer_timeout(broker, tmp_path):
    """A job allowed to run longer than the broker's consumer_timeout is an error."""
    limit_s = broker_consumer_timeout_s(broker)
    source = APP.format(queue=unique("slow"), timeout=limit_s + 60)
    with app_module(tmp_path, source, "slowapp") as app:
        result = leveret_cli("doctor", app, cwd=tmp_path, env={"LEVERET_AMQP_URL": broker.url})
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("ERROR"))
    assert "consumer_timeout" in line and "'work'" in line
    assert "raise consumer_timeout" in line and "Lower its timeout" in line


def test_doctor_warns_about_a_job_without_timeout(broker, tmp_path):
    """A job without timeout= counts as unbounded: a warning, not an error."""
    with app_module(tmp_path, APP.format(queue=unique("nt"), timeout=None), "notimeout") as app:
        result = leveret_cli("doctor", app, "--json", cwd=tmp_path,
                             env={"LEVERET_AMQP_URL": broker.url})  # fmt: skip
    assert result.returncode == 0
    warning = next(f for f in findings(result) if f["severity"] == "warning")
    assert warning["check"] == "consumer_timeout" and "has no timeout" in warning["message"]


async def test_doctor_flags_a_queue_declared_with_conflicting_arguments(broker, tmp_path):
    """An existing queue with other arguments is an error, with or without the management API."""
    queue = unique("conflict")
    connection = await aio_pika.connect(broker.url)
    channel = await connection.channel()
    # Everything as the app wants it but the priority levels.
    arguments = {**WorkQueue(name=queue).work_arguments(), "x-max-priority": 5}
    await channel.declare_queue(queue, durable=True, arguments=arguments)
    await connection.close()
    with app_module(tmp_path, APP.format(queue=queue, timeout=60), "conflictapp") as app:
        via_api = leveret_cli("doctor", app, "--json", cwd=tmp_path,
                              env={"LEVERET_AMQP_URL": broker.url})  # fmt: skip
        via_amqp = leveret_cli(
            "doctor", app, "--json", cwd=tmp_path,
            env={"LEVERET_AMQP_URL": broker.url, "LEVERET_MANAGEMENT_URL": "http://127.0.0.1:1"},
        )  # fmt: skip
    for result in (via_api, via_amqp):
        assert result.returncode == 1, result.stdout + result.stderr
        errors = [f for f in findings(result) if f["severity"] == "error"]
        assert [f["check"] for f in errors] == ["queue_arguments"], errors
        assert repr(queue) in errors[0]["message"]
        assert "x-max-priority" in errors[0]["message"]
        assert "delete it" in errors[0]["message"]
    assert "(the app wants 10)" in next(
        f["message"] for f in findings(via_api) if f["severity"] == "error"
    )


def test_doctor_flags_missing_permissions(broker, tmp_path):
    """A user who may not configure the app's queues gets an error naming what to grant."""
    user, password = unique("limited"), "pw-limited"
    broker.api("PUT", f"/users/{user}", json={"password": password, "tags": ""}).raise_for_status()
    broker.api(
        "PUT", f"/permissions/{broker.qvhost}/{user}",
        json={"configure": "^$", "write": ".*", "read": ".*"},
    ).raise_for_status()  # fmt: skip
    try:
        amqp = str(URL(broker.url).with_user(user).with_password(password))
        admin = f"http://{broker.user}:{broker.password}@{broker.host}:{broker.mgmt_port}"
        with app_module(tmp_path, APP.format(queue=unique("perm"), timeout=60), "permapp") as app:
            result = leveret_cli(
                "doctor", app, "--json", cwd=tmp_path,
                env={"LEVERET_AMQP_URL": amqp, "LEVERET_MANAGEMENT_URL": admin},
            )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        error = next(f for f in findings(result) if f["check"] == "permissions")
        assert error["severity"] == "error"
        assert "lacks configure" in error["message"] and "set_permissions" in error["message"]
        assert password not in result.stdout + result.stderr
    finally:
        broker.api("DELETE", f"/users/{user}")


SHARED = """
    from pydantic import BaseModel
    from leveret.consumer import Worker

    worker = Worker()

    class P(BaseModel):
        n: int

    @worker.job("{job}", queue="{queue}", timeout=60)
    async def work(p: P) -> None:
        pass
"""


def test_doctor_warns_when_another_queue_serves_the_same_job_name(broker, tmp_path):
    """A job name bound to a second app's queue is a warning naming that queue."""
    job, mine, theirs = unique("job"), unique("mine"), unique("theirs")
    env = {"LEVERET_AMQP_URL": broker.url}
    with app_module(tmp_path, SHARED.format(job=job, queue=theirs), "theirapp") as other:
        assert leveret_cli("topology", "declare", other, cwd=tmp_path, env=env).returncode == 0
    with app_module(tmp_path, SHARED.format(job=job, queue=mine), "myapp") as app:
        assert leveret_cli("topology", "declare", app, cwd=tmp_path, env=env).returncode == 0
        result = leveret_cli("doctor", app, "--json", cwd=tmp_path, env=env)
    [warning] = [f for f in findings(result) if f["check"] == "job_names"]
    assert warning["severity"] == "warning"
    assert repr(theirs) in warning["message"] and repr(job) in warning["message"]
