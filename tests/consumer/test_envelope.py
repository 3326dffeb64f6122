"""The wire envelope is parsed in one place (producers/wire/message.py), old delay keys included."""

from __future__ import annotations

import pytest
from pamqp.commands import Basic

from leveret.producers.wire.message import CONTENT_TYPE, read_envelope
from leveret.topology.delay import delayed_job_route, job_from_routing_key

MAX = 1000


def _props(**kwargs: object) -> Basic.Properties:
    return Basic.Properties(**kwargs)  # type: ignore[arg-type]


def test_a_delayed_key_names_its_job_in_the_current_and_the_old_layout() -> None:
    _, key = delayed_job_route("app", 7.5, "send.email")
    assert job_from_routing_key(key) == "send.email"
    old = ".".join(["0"] * 18 + ["1"]) + ".j.send.email"  # the first layout: 19 words of 1/0
    assert job_from_routing_key(old) == "send.email"
    assert job_from_routing_key("send.email") == "send.email"
    # A retry key addresses a queue, not a job: it names nothing else.
    _, retry_key = delayed_job_route("app", 1, "x")
    queue_key = retry_key.replace(".j.x", ".q.work")
    assert job_from_routing_key(queue_key) == queue_key


def test_read_envelope_takes_type_then_the_routing_key_and_the_attempts() -> None:
    props = _props(message_type="a", message_id="id", headers={"x-attempts": 2})
    env = read_envelope(props, "b", 10, MAX)
    assert (env.name, env.job_id, env.attempts, env.problem) == ("a", "id", 2, None)
    old = ".".join(["1"] * 19) + ".j.late"
    env = read_envelope(_props(content_type=f"{CONTENT_TYPE}; charset=utf-8"), old, 10, MAX)
    assert (env.name, env.job_id, env.problem) == ("late", None, None)


@pytest.mark.parametrize(
    ("props", "size", "problem"),
    [
        ({"content_encoding": "gzip"}, 10, "content-encoding"),
        ({"content_type": "text/plain"}, 10, "content type"),
        ({}, MAX + 1, "LEVERET_MAX_BODY_BYTES"),
        ({"headers": {"x-attempts": True}}, 10, "x-attempts"),
        ({"headers": {"x-attempts": -1}}, 10, "x-attempts"),
    ],
)
def test_read_envelope_says_why_a_message_is_invalid(
    props: dict[str, object], size: int, problem: str
) -> None:
    env = read_envelope(_props(**props), "job", size, MAX)
    assert env.problem is not None and problem in env.problem
    assert env.attempts == 0
