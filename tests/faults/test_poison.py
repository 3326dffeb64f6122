"""Scenario 6: poison input, published with a raw AMQP client, never stops the worker."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from dataclasses import dataclass
from typing import Any

import aio_pika
from pydantic import BaseModel

from leveret.consumer import JobContext, Worker
from tests.faults.plumbing import record
from tests.support import Broker, running, unique, wait_for


class Payload(BaseModel):
    n: int


class Boom(BaseException):
    """Not an Exception: a handler raising it must still be contained."""


@dataclass
class Poison:
    kind: str
    body: bytes
    expect: str  # "ran:<job>" or "dlq:<reason>"
    job: str = "good"  # routing key suffix
    props: dict[str, Any] | None = None
    message_id: str | None = "auto"
    error: str = ""  # the x-error of a dead-lettered handler run must start with this


def _nested(depth: int) -> bytes:
    return b'{"n": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"


def poisons() -> list[Poison]:
    ok = b'{"n": 1}'
    return [
        Poison("not JSON", b"this is not json {", "dlq:invalid"),
        Poison("empty body", b"", "dlq:invalid"),
        Poison("JSON array, not an object", b"[1, 2, 3]", "dlq:invalid"),
        Poison("JSON null", b"null", "dlq:invalid"),
        Poison("not UTF-8", b'{"n": 1, "s": "\xff\xfe"}', "dlq:invalid"),
        Poison("NaN literal", b'{"n": NaN}', "dlq:invalid"),
        Poison("wrong content type", ok, "dlq:invalid", props={"content_type": "text/plain"}),
        Poison(
            "gzip content-encoding",
            gzip.compress(ok),
            "dlq:invalid",
            props={"content_encoding": "gzip"},
        ),
        Poison("over the size limit", b'{"n": 1, "pad": "' + b"x" * 70_000 + b'"}', "dlq:invalid"),
        Poison("deeply nested JSON", _nested(20_000), "dlq:invalid"),
        Poison("model mismatch", b'{"n": "many"}', "dlq:invalid"),
        Poison("type disagrees with routing key", ok, "ran:other", props={"type": "{q}-other"}),
        Poison("type names no job", ok, "dlq:unknown_job", props={"type": "{q}-nope"}),
        Poison(
            "routing key and type name no job, odd characters",
            ok,
            "dlq:unknown_job",
            props={"type": "évil\u202ename " * 5},
        ),
        Poison("priority out of range", ok, "ran:good", props={"priority": 200}),
        Poison("x-attempts is a string", ok, "dlq:invalid", props={"headers": {"x-attempts": "3"}}),
        Poison("x-attempts is negative", ok, "dlq:invalid", props={"headers": {"x-attempts": -4}}),
        Poison("x-attempts is a float", ok, "dlq:invalid", props={"headers": {"x-attempts": 2.5}}),
        Poison("missing message_id", b'{"n": 424242}', "ran:good", message_id=None),
        Poison("duplicate message_id (first)", b'{"n": 7001}', "ran:good", message_id="dup-id"),
        Poison("duplicate message_id (second)", b'{"n": 7002}', "ran:good", message_id="dup-id"),
        Poison("handler raises SystemExit", ok, "dlq:exhausted", job="exit", error="SystemExit"),
        Poison(
            "handler raises KeyboardInterrupt",
            ok,
            "dlq:exhausted",
            job="kbint",
            error="KeyboardInterrupt",
        ),
        Poison("handler raises a BaseException", ok, "dlq:exhausted", job="base", error="Boom"),
        Poison(
            "handler raises CancelledError itself",
            ok,
            "dlq:exhausted",
            job="cancelled",
            error="CancelledError",
        ),
        Poison(
            "plain-def handler raises SystemExit",
            ok,
            "dlq:exhausted",
            job="sync_exit",
            error="SystemExit",
        ),
        Poison(
            "handler never returns (async)", ok, "dlq:exhausted", job="hang", error="TimeoutError"
        ),
        Poison(
            "handler never returns (plain def)",
            ok,
            "dlq:exhausted",
            job="sync_hang",
            error="TimeoutError",
        ),
        Poison("return value not JSON-serializable", ok, "ran:weird", job="weird"),
    ]


async def test_poison_messages_are_handled_or_dead_lettered(broker: Broker, registry) -> None:
    """Every kind of poison is run or dead-lettered with a reason, and good jobs keep flowing."""
    queue = unique("poison")
    worker = Worker(broker.settings(max_body_bytes=65_536, prefetch=8), registry=registry)
    ran: list[tuple[str, str, int]] = []  # (job, job_id, n)

    def name(suffix: str) -> str:
        return f"{queue}-{suffix}"

    @worker.job(name("good"), queue=queue)
    async def good(p: Payload, ctx: JobContext) -> None:
        ran.append(("good", ctx.job_id, p.n))

    @worker.job(name("other"), queue=queue)
    async def other(p: Payload, ctx: JobContext) -> None:
        ran.append(("other", ctx.job_id, p.n))

    @worker.job(name("weird"), queue=queue)
    async def weird(p: Payload, ctx: JobContext) -> object:
        ran.append(("weird", ctx.job_id, p.n))
        return {"not": {1, 2}, "fn": print}

    @worker.job(name("exit"), queue=queue, max_attempts=1)
    async def exits(p: Payload) -> None:
        raise SystemExit(3)

    @worker.job(name("kbint"), queue=queue, max_attempts=1)
    async def kbint(p: Payload) -> None:
        raise KeyboardInterrupt

    @worker.job(name("base"), queue=queue, max_attempts=1)
    async def base(p: Payload) -> None:
        raise Boom("not an Exception")

    @worker.job(name("cancelled"), queue=queue, max_attempts=1)
    async def cancelled(p: Payload) -> None:
        raise asyncio.CancelledError

    @worker.job(name("sync_exit"), queue=queue, max_attempts=1)
    def sync_exit(p: Payload) -> None:
        raise SystemExit(4)

    @worker.job(name("hang"), queue=queue, max_attempts=1, timeout=0.3)
    async def hang(p: Payload) -> None:
        await asyncio.Event().wait()

    @worker.job(name("sync_hang"), queue=queue, max_attempts=1, timeout=0.3)
    def sync_hang(p: Payload) -> None:
        time.sleep(1.5)

    cases = poisons()
    started = time.monotonic()
    async with running(worker) as task:
        connection = await aio_pika.connect(broker.url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(broker.settings().exchange)
            for i, case in enumerate(cases):
                props: dict[str, Any] = {"content_type": "application/json", "delivery_mode": 2}
                props.update(case.props or {})
                if isinstance(props.get("type"), str):
                    props["type"] = props["type"].replace("{q}", queue)
                if case.message_id == "auto":
                    props["message_id"] = f"poison-{i}"
                elif case.message_id is not None:
                    props["message_id"] = case.message_id
                await exchange.publish(
                    aio_pika.Message(case.body, **props), routing_key=name(case.job)
                )
                # A good job after every poison: the worker must keep processing them.
                await exchange.publish(
                    aio_pika.Message(
                        json.dumps({"n": i}).encode(),
                        content_type="application/json",
                        message_id=f"good-{i}",
                        type=name("good"),
                    ),
                    routing_key=name("good"),
                )
        expected_dlq = sum(c.expect.startswith("dlq:") for c in cases)
        await wait_for(
            lambda: sum(1 for j, i, _ in ran if i.startswith("good-")) == len(cases),
            30,
            "every good job to run",
        )
        await wait_for(
            lambda: _depth_is(broker, f"{queue}.dlq", expected_dlq), 30, "the poison in the DLQ"
        )
        assert worker.ready and not task.done()
    elapsed = time.monotonic() - started

    dead = {m["properties"].get("message_id"): m for m in broker.get_messages(f"{queue}.dlq", 200)}
    for i, case in enumerate(cases):
        kind, _, what = case.expect.partition(":")
        mid = f"poison-{i}"
        if kind == "dlq":
            assert mid in dead, f"{case.kind}: not dead-lettered"
            headers = dead[mid]["properties"]["headers"]
            assert headers["x-reason"] == what, f"{case.kind}: {headers}"
            assert headers["x-error"], case.kind
            assert isinstance(headers["x-attempts"], int)
            if case.error:  # a handler ran exactly once and its error is named
                assert headers["x-error"].startswith(case.error), f"{case.kind}: {headers}"
                assert headers["x-attempts"] == 1, f"{case.kind}: {headers}"
        elif case.message_id == "auto":
            assert (what, mid, 1) in ran, f"{case.kind}: did not run as {what}"
    assert [n for j, i, n in ran if i == "dup-id"] == [7001, 7002]
    assigned = [i for j, i, n in ran if n == 424242]
    assert len(assigned) == 1 and assigned[0]  # the consumer gave it an id
    assert await broker.depth(queue) == 0
    # Metric labels never take values from the wire.
    jobs = {
        s.labels["job"]
        for metric in registry.collect()
        for s in metric.samples
        if "job" in s.labels
    }
    assert jobs <= {*worker.jobs.jobs, "unknown"}, jobs
    record(
        "poison input",
        kinds=len(cases),
        jobs=2 * len(cases),
        lost=0,
        duplicated=0,
        dead_lettered=expected_dlq,
        seconds=round(elapsed, 1),
    )


async def _depth_is(broker: Broker, queue: str, n: int) -> bool:
    return await broker.depth(queue) == n
