"""Leveret through its real CLI: ``leveret worker bench.runners.leveret_app:worker``.

The ``leveret-cli`` rows (issue 26): the default worker as a user runs it, a subprocess of the
``leveret`` console script with its default ``--loop auto`` (uvloop where installed), settings
from ``LEVERET_*``, ``--prefetch`` the workload's and ``--processes N`` for a multi-process row
(the supervisor and its N children). This runner only frames it for the harness: it declares
the topology and says ``READY``; on ``GO`` (the queue is full) it starts the CLI, which loads
``leveret_app`` (the in-process runner's job, handler and ``Tally``). It relays ``CONSUMING``
once every worker process consumes, stops the CLI with SIGTERM once every process said
``DONE``, and says one ``RESULT`` that adds up the processes' reports, as the harness does for
processes it starts itself.

CPU per job is the worker processes', from each one's first job, as for every row; under
``--processes`` the supervisor's own CPU while they consume is added (it runs no jobs, but a
user pays for it). This runner's CPU, like the harness's, is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.runners.common import load_spec, say, wait_go
from bench.runners.leveret_runner import declare_topology, free_port, make_worker

APP = "bench.runners.leveret_app:worker"
ROOT = Path(__file__).resolve().parents[2]
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The CLI is killed if this runner is (the harness kills a runner that overran)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def cli_env(spec: dict[str, Any]) -> dict[str, str]:
    """``LEVERET_*`` as a user would set them: what the in-process runner passes as settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEVERET_")}
    env.update(
        LEVERET_AMQP_URL=spec["url"],
        LEVERET_METRICS_PORT=str(free_port()),
        LEVERET_METRICS_HOST="127.0.0.1",
        LEVERET_SHUTDOWN_GRACE="10",
        BENCH_SPEC=json.dumps(spec),
    )
    for key in ("events", "status_url", "status_ttl"):
        if key in spec:
            env["LEVERET_" + key.upper()] = str(spec[key])
    return env


def cpu_s_of(pid: int) -> float:
    """User + system CPU seconds of a living process, from ``/proc/PID/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def merge(results: list[dict[str, Any]], extra_cpu_s: float) -> dict[str, Any]:
    """The processes' reports as one, the way the harness adds up its own processes'."""
    busy = [r for r in results if r["handled"]] or results
    return {
        "handled": sum(r["handled"] for r in results),
        "t_first": min(r["t_first"] for r in busy),
        "t_last": max(r["t_last"] for r in busy),
        "cpu_s": sum(r["cpu_s"] for r in results) + extra_cpu_s,
        "rss_hwm_kib": max(r["rss_hwm_kib"] for r in results),
        "processes": len(results),
    }


def main() -> None:
    spec = load_spec()
    processes = int(spec.get("processes", 1))
    asyncio.run(declare_topology(spec, make_worker(spec, None)))
    say("READY")
    wait_go()
    argv = [str(Path(sys.executable).with_name("leveret")), "worker", APP]
    argv += ["--prefetch", str(spec.get("prefetch", 50))]
    if processes > 1:
        argv += ["--processes", str(processes)]
    cli = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=cli_env(spec),
        cwd=ROOT,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
    )
    assert cli.stdout is not None
    consuming: set[int] = set()
    done: set[int] = set()
    results: dict[int, dict[str, Any]] = {}
    supervisor_cpu = 0.0
    for raw in cli.stdout:
        tag, _, rest = raw.decode().partition(" ")
        if tag not in ("CONSUMING", "DONE", "RESULT"):
            continue  # not ours: the CLI writes its logs to stderr, but be safe
        data = json.loads(rest)
        pid = data.pop("pid")
        if tag == "CONSUMING":
            consuming.add(pid)
            if len(consuming) == processes:
                supervisor_cpu = -cpu_s_of(cli.pid) if processes > 1 else 0.0
                say("CONSUMING")
        elif tag == "DONE":
            done.add(pid)
            if len(done) == processes:
                if processes > 1:
                    supervisor_cpu += cpu_s_of(cli.pid)
                cli.send_signal(signal.SIGTERM)  # graceful: in-flight jobs finish, acks flushed
        else:
            results[pid] = data
            if len(results) == processes:
                break
    code = cli.wait(timeout=60)
    if len(results) != processes:
        raise SystemExit(f"leveret worker exited (code {code}) with {len(results)} reports")
    say("RESULT", **merge(list(results.values()), max(0.0, supervisor_cpu)))


if __name__ == "__main__":
    main()
