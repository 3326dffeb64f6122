"""Each library's own message format, so the harness can fill its queue at bare-client speed.

Filling 20,000 jobs through Celery's publisher would take longer than the measurement, so the
harness writes each library's wire format itself with pipelined confirms (aio-pika), exactly as
the library's own publisher would, and the run's final count proves the library accepted every
message.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Wire:
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] | None = None
    props: dict[str, Any] = field(default_factory=dict)
    id: str = ""  # the job's id in the library's own terms (where its status or result is kept)


PAD = "x" * 470  # with the other fields, a body of about 512 bytes


def payload(i: int, stamp: bool = False) -> dict[str, Any]:
    return {"i": i, "ts": time.time() if stamp else 0.0, "pad": PAD}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encode(lib: str, queue: str, job: str, data: dict[str, Any]) -> Wire:
    """The message ``lib``'s own publisher would send for job ``job`` with argument ``data``."""
    # Neither the loop a runner uses nor its number of processes changes its wire format.
    lib = re.sub(r"-\d+p$", "", lib).removesuffix("-uvloop")
    # A row with results kept (``celery-results``, ``dramatiq-results``) sends the same format
    # as its library's plain row, except that Celery's message asks for its result.
    keep_result = lib.endswith("-results")
    lib = lib.removesuffix("-results")
    if lib == "leveret" or lib.startswith("leveret-"):  # -blocking and the lifecycle rows
        # Wire format v1 from the contract: exchange `jobs`, routing key = job name.
        job_id = str(uuid.uuid4())
        return Wire(
            "jobs",
            job,
            _json(data),
            props={
                "content_type": "application/json",
                "message_id": job_id,
                "type": job,
            },
            id=job_id,
        )
    if lib in ("aiopika", "faststream"):
        return Wire("", queue, _json(data), props={"content_type": "application/json"})
    if lib == "dramatiq":
        message_id = str(uuid.uuid4())
        message = {
            "queue_name": queue,
            "actor_name": job,
            "args": [data],
            "kwargs": {},
            "options": {},
            "message_id": message_id,
            "message_timestamp": int(time.time() * 1000),
        }
        return Wire("", queue, _json(message), id=message_id)
    if lib == "celery":
        # Celery task message protocol 2 (what apply_async sends with the json serializer).
        task_id = str(uuid.uuid4())
        headers = {
            "lang": "py",
            "task": job,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "(...)",
            "kwargsrepr": "{}",
            "origin": "bench",
            "ignore_result": not keep_result,
        }
        body = [[data], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        return Wire(
            "",
            queue,
            _json(body),
            headers=headers,
            props={
                "content_type": "application/json",
                "content_encoding": "utf-8",
                "correlation_id": task_id,
            },
            id=task_id,
        )
    if lib == "taskiq":
        task_id = uuid.uuid4().hex
        message = {
            "task_id": task_id,
            "task_name": job,
            "labels": {},
            "labels_types": {},
            "args": [data],
            "kwargs": {},
        }
        return Wire(
            "", queue, _json(message), headers={"task_id": task_id, "task_name": job}, id=task_id
        )
    raise ValueError(f"no wire format for {lib!r}")
