"""What ``leveret worker`` loads before it runs a job: a regression guard for its idle memory.

Issue 16 budgets a worker's idle RSS (45 MiB with the metrics endpoint on). Timing and RSS
figures move with the machine; which modules a start imports does not. So this runs, in a fresh
interpreter, exactly what ``leveret worker APP`` imports up to the moment it starts the loop
(the package, the whole command line with every subcommand registered, an app with one job and
the worker command's own module) and asserts that the operator tools and the optional heavy
libraries stay out of ``sys.modules``. Each of them is imported where it is used: the ``dlq``,
``status`` and ``doctor`` commands' tools in their command functions, rich where a table is
drawn, cronsim where a cron expression is evaluated, FastAPI and uvicorn by ``leveret api``.

rich is not in the list: structlog imports it whenever it is installed (``structlog.dev``), so it
is loaded with ``leveret`` whatever this package does (see the report on issue 16).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import ROOT

# Loaded only by the commands (or features) that use them; never by a worker's start.
NOT_AT_START = (
    "leveret.consumer.ops.dlq",
    "leveret.consumer.ops.overview",
    "leveret.consumer.ops.schema",
    "leveret.consumer.ops.doctor",
    "leveret.consumer.ops.management",
    "leveret.consumer.features.groups",  # only with a status store (settle imports it then)
    "leveret.consumer.features.cancel_watch",  # likewise (a session starts it then)
    "leveret.consumer.api",
    "httpx",
    "cronsim",
    "fastapi",
    "starlette",
    "uvicorn",
)

APP = """
    from pydantic import BaseModel

    from leveret import Worker

    worker = Worker()


    class P(BaseModel):
        n: int


    @worker.job("lean_noop", queue="lean_noop")
    async def noop(p: P) -> None:
        pass
"""

# The worker's start path, stopped just before it connects: the CLI group with every command
# (as the `leveret` entry point builds it), the app loaded and checked as `worker` loads it.
PROBE = """
    import json, sys

    from leveret.consumer.cli import cli
    from leveret.consumer.cli.common import load_app
    from leveret.consumer.cli import worker_cmd

    assert set(cli.commands) >= {"worker", "dlq", "status", "doctor", "api", "schedule"}
    load_app("leanapp:worker")
    print(json.dumps(sorted(sys.modules)))
"""


def _modules_at_start(tmp_path: Path) -> set[str]:
    (tmp_path / "leanapp.py").write_text(textwrap.dedent(APP))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


@pytest.fixture(scope="module")
def modules_at_start(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return _modules_at_start(tmp_path_factory.mktemp("lean"))


def test_the_probe_sees_the_worker_start_path(modules_at_start: set[str]) -> None:
    """The probe really loaded the worker and its command line (else the guard proves nothing)."""
    seen = ("leveret.consumer.worker", "leveret.consumer.cli.worker_cmd",
            "leveret.consumer.cli.dlq_cmd", "leveret.consumer.features.schedules.leader",
            "click")  # fmt: skip
    for name in seen:
        assert name in modules_at_start, name


@pytest.mark.parametrize("module", NOT_AT_START)
def test_a_worker_start_does_not_import(modules_at_start: set[str], module: str) -> None:
    loaded = sorted(m for m in modules_at_start if m == module or m.startswith(module + "."))
    assert not loaded, f"a worker start imports {loaded}: import it where it is used"


def test_a_publisher_does_not_load_the_worker_runtime() -> None:
    """``leveret`` loads its public names on first use: a service that only publishes
    (``leveret.producers``) does not import the worker, its scheduler or its CLI."""
    code = (
        "import json, sys; from leveret.producers import Publisher; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('leveret.consumer'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
