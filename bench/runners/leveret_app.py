"""The app the ``leveret-cli`` rows' ``leveret worker`` loads: ``bench.runners.leveret_app:worker``.

The job and its handler are the in-process runner's (``leveret_runner.register_jobs``), counted
by the same ``Tally``; the worker's settings come from ``LEVERET_*`` as a user's do (the
``leveret_cli_runner`` sets them). The run's spec comes from ``BENCH_SPEC``.

The harness protocol (``bench/runners/__init__.py``) is spoken through one process-scoped
resource that no handler asks for (so a job pays nothing for it, ``execution.build_chain``):
the worker opens it at start, before consuming, and closes it after its last job drained. Open,
it waits for the worker to be ready and says ``CONSUMING``; closed, it says ``RESULT``. Once
the tally has every job (or, when processes share the queue, once jobs stopped coming) it says
``DONE``, and the runner stops the CLI with SIGTERM, as a user would. Under ``--processes N``
the supervisor's children inherit its stdout, so each line carries the process's pid; the lines
are short single writes, so children's lines never interleave.

Importing this module does nothing else: the supervisor imports the app too (to check it) and
never runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from bench.runners.common import Tally, shares_queue
from bench.runners.leveret_runner import register_jobs
from leveret.consumer import Worker


def report(tag: str, **data: Any) -> None:
    """One protocol line on stdout, tagged with this process's pid, in one write."""
    line = f"{tag} {json.dumps({'pid': os.getpid(), **data})}\n".encode()
    os.write(1, line)


class Probe:
    """The process resource's value: nothing a handler uses."""

    __slots__ = ()


spec: dict[str, Any] = json.loads(os.environ.get("BENCH_SPEC", "{}") or "{}")
tally = Tally(spec, lambda: report("DONE")) if spec else None
worker = Worker()
if spec:
    register_jobs(worker, spec, tally)


async def _consuming() -> None:
    assert tally is not None
    # Ready, or every job already done (a small run can finish before the first poll).
    while not worker.ready and not tally.done:  # noqa: ASYNC110 - as the in-process runner
        await asyncio.sleep(0.005)
    report("CONSUMING")
    if shares_queue(spec):
        tally.watch_idle()


@worker.resource(scope="process")
async def probe() -> AsyncIterator[Probe]:
    assert tally is not None
    tally.go()
    watching = asyncio.create_task(_consuming())
    try:
        yield Probe()
    finally:
        watching.cancel()
        report("RESULT", **tally.result())
