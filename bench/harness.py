"""Runs the workloads, interleaved, each run in fresh subprocesses, and keeps every figure.

Method, so that figures from a noisy shared machine still mean something:

* Rounds: every round runs every workload for every library once, libraries in a rotated
  order, so drift in machine load spreads over all of them. Figures are the median over rounds
  with the min–max beside it; ratios are taken to the bare aio-pika loop *of the same round*,
  then the median of those ratios is quoted.
* Each run starts the library's runner (``bench/runners``) in a new process; the harness fills
  its queue in the library's own wire format while the consumer is not attached, then lets it
  go. Throughput is jobs over the span from the first handler start to the last handler end, so
  start-up is not counted.
* A row may run several consumer processes on one queue (``consume_2proc``, or a row's own
  ``_processes`` such as ``aiopika-uvloop-4p``): each stops once jobs stopped coming, and the
  harness adds up their counts and CPU and spans the first start to the last end over all of
  them. The ``leveret-cli`` rows start the real ``leveret worker`` CLI (``--processes N`` for
  several), whose runner adds up its processes' reports the same way.
* Nothing lost: after a consume run the queue must be empty (the runner has closed its
  connection, so anything unacked would be back) and the handler count must equal the jobs
  sent; after a publish run the queue must hold exactly the jobs published. A run that fails
  either check is reported as failed, not averaged in.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.broker import BenchBroker
from bench.wire import encode, payload

ROOT = Path(__file__).resolve().parent.parent
RUNNERS: dict[str, tuple[str, dict[str, Any]]] = {
    "aiopika": ("bench.runners.aiopika_runner", {}),
    "aiopika-uvloop": ("bench.runners.aiopika_runner", {"uvloop": True}),
    "leveret": ("bench.runners.leveret_runner", {}),
    "leveret-uvloop": ("bench.runners.leveret_runner", {"uvloop": True}),
    "leveret-blocking": ("bench.runners.leveret_runner", {"blocking": True}),
    # Feature rows of consume_noop (issues 12, 14, 16, 20): the same worker and handler as
    # "leveret", same loop (asyncio) and same prefetch (the workload's), one setting changed each;
    # see FEATURE_SETTINGS. "leveret" itself runs the defaults: events off, no status store
    # (issue 20). Lifecycle rows: outcome events on, or the worker writing each job's status to
    # Redis itself (events off). A row with ``results`` set is counted by the harness only once
    # every job's final status (or result) is readable in Redis (``ResultWatch``).
    "leveret-outcomes": ("bench.runners.leveret_runner", {"events": "outcomes"}),
    "leveret-status": (
        "bench.runners.leveret_runner",
        {"events": "off", "status_ttl": 600, "results": "leveret"},
    ),
    # The same two under uvloop (what ``--loop auto`` picks): issue 20's budget holds them
    # against bare aio-pika on uvloop, like for like.
    "leveret-outcomes-uvloop": (
        "bench.runners.leveret_runner",
        {"events": "outcomes", "uvloop": True},
    ),
    "leveret-status-uvloop": (
        "bench.runners.leveret_runner",
        {"events": "off", "status_ttl": 600, "results": "leveret", "uvloop": True},
    ),
    "dramatiq": ("bench.runners.dramatiq_runner", {}),
    "celery": ("bench.runners.celery_runner", {}),
    # Issue 20's peers with results kept, each at its best settings otherwise (the rows above):
    # Dramatiq with its Results middleware on Redis, Celery with a Redis result backend,
    # task_track_started and task events (-E). Counted once every result is readable.
    "dramatiq-results": ("bench.runners.dramatiq_runner", {"results": "dramatiq"}),
    "celery-results": ("bench.runners.celery_runner", {"results": "celery"}),
    "faststream": ("bench.runners.faststream_runner", {}),
    "faststream-uvloop": ("bench.runners.faststream_runner", {"uvloop": True}),
    "taskiq": ("bench.runners.taskiq_runner", {}),
    "taskiq-uvloop": ("bench.runners.taskiq_runner", {"uvloop": True}),
    # Issue 14: the handler takes one job-scoped resource (an async generator); compare with
    # "leveret" (same handler, no resource) to see the job scope's cost.
    "leveret-resource": ("bench.runners.leveret_runner", {"job_resource": True}),
    # Issue 10: the worker before the reshaping, run from a snapshot of that commit with that
    # commit's own runner (``_tree``: see ``snapshot``). No lifecycle events existed then, so
    # its like-for-like row today is "leveret" (events off by default since issue 20).
    "leveret-before": ("bench.runners.leveret_runner", {"_tree": "b86b806"}),
    # Issues 20-22: the worker at the start of that session (9311e50), events off like today's
    # default, beside "leveret": what the status-writer change and the reshaping cost.
    "leveret-9311e50": ("bench.runners.leveret_runner", {"_tree": "9311e50", "events": "off"}),
    # Issue 26. The default worker as a user runs it: the `leveret worker` CLI in a subprocess,
    # its default `--loop auto` (uvloop), the same job, handler and count as "leveret" (the app
    # it loads is bench/runners/leveret_app.py). `_cli`: the runner starts the worker processes
    # itself (`--processes N` in a multi-process workload), so the harness starts one runner.
    "leveret-cli": ("bench.runners.leveret_cli_runner", {"_cli": True}),
    "leveret-cli-2p": ("bench.runners.leveret_cli_runner", {"_cli": True, "_processes": 2}),
    # The broker's ceiling: bare aio-pika on uvloop in 2 and 4 consumer processes on one queue
    # (`_processes`: how many the harness starts, whatever the workload's count).
    "aiopika-uvloop-2p": ("bench.runners.aiopika_runner", {"uvloop": True, "_processes": 2}),
    "aiopika-uvloop-4p": ("bench.runners.aiopika_runner", {"uvloop": True, "_processes": 4}),
    # Locks need Redis (LEVERET_STATUS_URL), which also turns the status writes on: the lock
    # rows are "leveret-status" plus `lock="{i}"` (a key per job, never contended), counted
    # like it once every status reads `succeeded`; their budget is against "leveret-status".
    "leveret-lock": (
        "bench.runners.leveret_runner",
        {"events": "off", "status_ttl": 600, "results": "leveret", "lock": "{i}"},
    ),
    "leveret-lock-uvloop": (
        "bench.runners.leveret_runner",
        {"events": "off", "status_ttl": 600, "results": "leveret", "lock": "{i}", "uvloop": True},
    ),
    # A per-process rate limit far above any rate this machine reaches: never binds, so the row
    # is what admitting each start under a limit costs.
    "leveret-ratelimit": ("bench.runners.leveret_runner", {"rate_limit": "100000/s"}),
    "leveret-ratelimit-uvloop": (
        "bench.runners.leveret_runner",
        {"rate_limit": "100000/s", "uvloop": True},
    ),
    "leveret-resource-uvloop": (
        "bench.runners.leveret_runner",
        {"job_resource": True, "uvloop": True},
    ),
    # Locks on the broker alone (no LEVERET_STATUS_URL, so no status writes either): against
    # plain "leveret". In the plan only once the broker lock store exists (``broker_locks``).
    "leveret-lock-broker": ("bench.runners.leveret_runner", {"lock": "{i}"}),
}
# Peers at their best configuration: the asyncio ones on uvloop (they can use it; a user who
# cares about speed does), Dramatiq and Celery on their own threads (no event loop to swap).
ALL_PEERS = ["dramatiq", "celery", "faststream-uvloop", "taskiq-uvloop"]
PIPELINING_PEERS = ["faststream-uvloop", "taskiq-uvloop"]
# One full run shows every feature row beside bare aio-pika (issue 16's last target row). Each is
# the plain "leveret" row with one setting changed, nothing else tuned: what the report prints.
FEATURES = [
    "leveret-outcomes",
    "leveret-status",
    "leveret-resource",
    "leveret-lock",
    "leveret-ratelimit",
    "leveret-before",
    "leveret-9311e50",
]
# The feature rows again under uvloop, and the peers with results kept (issue 20's budget).
FEATURES_UVLOOP = [
    "leveret-outcomes-uvloop",
    "leveret-status-uvloop",
    "leveret-resource-uvloop",
    "leveret-lock-uvloop",
    "leveret-ratelimit-uvloop",
]
RESULT_PEERS = ["dramatiq-results", "celery-results"]
# Issue 26: the CLI row, and the broker's ceiling (bare aio-pika on uvloop in 1, 2, 4 processes,
# the best of them per round: ``summarise``'s ``x_ceiling``).
CLI_ROWS = ["leveret-cli"]
CEILING = ["aiopika-uvloop", "aiopika-uvloop-2p", "aiopika-uvloop-4p"]


def broker_locks() -> list[str]:
    """``leveret-lock-broker`` once the broker-only lock store exists, else nothing."""
    found = importlib.util.find_spec("leveret.consumer.features.broker_locks") is not None
    return ["leveret-lock-broker"] if found else []


# Each feature row's own comparison beside plain Leveret (``x_base``): the same settings without
# its one feature. A lock needs the status store, so a lock row is held against the status row;
# the CLI row against the same worker in-process on the same loop.
BASE_OF = {
    "leveret-lock": "leveret-status",
    "leveret-lock-uvloop": "leveret-status-uvloop",
    "leveret-cli": "leveret-uvloop",
}
FEATURE_SETTINGS = {
    "leveret": "defaults: `LEVERET_EVENTS` unset, so `off`; no status store",
    "leveret-uvloop": "as `leveret`, under `uvloop.run`",
    "leveret-outcomes": "`events=outcomes`: one outcome event per job, confirmed before its ack",
    "leveret-status": "`LEVERET_STATUS_URL` set (Redis, TTL 600 s), events `off`: the worker "
    "writes each status itself (one script per batch, before the acks); counted once every "
    "job reads `succeeded` in Redis",
    "leveret-outcomes-uvloop": "as `leveret-outcomes`, under `uvloop.run`",
    "leveret-status-uvloop": "as `leveret-status`, under `uvloop.run`",
    "leveret-resource": "as `leveret`, handler takes one job-scoped async-generator resource",
    "leveret-before": "the worker at b86b806, before the reshaping (issue 10); it had no "
    "events: compare with `leveret`",
    "leveret-9311e50": "the worker at 9311e50 (before issues 20-22) with `events=off`: "
    "compare with `leveret`",
    "dramatiq-results": "`dramatiq` + `Results` middleware on a Redis backend, "
    "`store_results=True`; counted once every result is readable",
    "celery-results": "`celery` + Redis result backend, `task_track_started=True`, task events "
    "(`-E`); counted once every SUCCESS result is readable",
    "leveret-cli": "the defaults, run as `leveret worker bench.runners.leveret_app:worker "
    "--prefetch N` in a subprocess (default `--loop auto`: uvloop); same handler and count",
    "leveret-lock": 'as `leveret-status` + `lock="{i}"` (a Redis lock per job, keys never '
    "contended); counted once every job reads `succeeded`",
    "leveret-lock-uvloop": "as `leveret-lock`, under `uvloop.run`",
    "leveret-ratelimit": '`rate_limit="100000/s"` (per process; never binds here)',
    "leveret-ratelimit-uvloop": "as `leveret-ratelimit`, under `uvloop.run`",
    "leveret-resource-uvloop": "as `leveret-resource`, under `uvloop.run`",
    "leveret-lock-broker": '`lock="{i}"` with no status store: each job\'s lock on the '
    "broker (an exclusive queue per held key)",
}
# Concurrency is threads (or Celery's solo pool at 1).
THREADED = {"dramatiq", "celery", "dramatiq-results", "celery-results"}
# Where the rows with ``results`` keep them: the bench's own Redis database (the tests use 0
# and 13); each run's keys are its own (fresh ids, a per-run namespace) and deleted after it.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def loop_of(lib: str) -> str:
    """Which event loop a row ran on, for the report: every row says it."""
    if lib in THREADED or lib == "leveret-blocking":
        return "threads (no loop)"
    if lib.startswith("leveret-cli"):
        return "uvloop (`--loop auto`)"
    return "uvloop" if lib.endswith("-uvloop") or "-uvloop-" in lib else "asyncio"


def consumers(wl: Workload, lib: str) -> int:
    """How many consumer processes a row runs in ``wl``: its own count, else the workload's."""
    return int(RUNNERS[lib][1].get("_processes", wl.processes))


@dataclass
class Workload:
    name: str
    title: str
    libs: list[str]
    params: dict[str, Any]
    processes: int = 1


def plan(quick: bool, libs: list[str] | None) -> list[Workload]:
    """What runs, with the sizes of a full run (the issue's) or of ``--quick``."""
    q = quick
    w = [
        Workload(
            "publish_seq",
            "Publish, sequential (each waits for its confirm)",
            [
                "aiopika",
                "aiopika-uvloop",
                "leveret",
                "leveret-uvloop",
                "leveret-blocking",
                *ALL_PEERS,
            ],
            {"n": 200 if q else 2000},
        ),
        Workload(
            "publish_pipelined",
            "Publish, pipelined (1,000 confirms in flight)",
            ["aiopika", "aiopika-uvloop", "leveret", "leveret-uvloop", *PIPELINING_PEERS],
            {"n": 1000 if q else 10000, "window": 1000},
        ),
        Workload(
            "publish_batch",
            "Publish, batch API (`publish_many`, 1,000 per batch)",
            ["leveret", "leveret-uvloop", "leveret-blocking"],
            {"n": 1000 if q else 10000, "batch": 1000},
        ),
        Workload(
            "publish_noconfirm",
            "Publish without confirms (reference for the batch target)",
            ["aiopika", "aiopika-uvloop"],
            {"n": 1000 if q else 10000},
        ),
        Workload(
            "consume_noop",
            "Consume no-op jobs, one worker process (prefetch 1,000)",
            [
                "aiopika",
                "aiopika-uvloop",
                "leveret",
                "leveret-uvloop",
                *ALL_PEERS,
                *CLI_ROWS,
                *CEILING[1:],
                *FEATURES,
                *broker_locks(),
                *FEATURES_UVLOOP,
                *RESULT_PEERS,
            ],
            {"n": 500 if q else 20000, "prefetch": 1000, "concurrency": 1},
        ),
        Workload(
            "consume_2proc",
            "Consume no-op jobs, two worker processes on one queue",
            ["aiopika", "aiopika-uvloop", "leveret-uvloop", "leveret-cli-2p", "dramatiq"],
            {"n": 500 if q else 20000, "prefetch": 1000, "concurrency": 1},
            processes=2,
        ),
        Workload(
            "io",
            "I/O-bound: 2,000 jobs × 50 ms at concurrency 100 (ideal 1.0 s)",
            ["aiopika", "leveret", "leveret-uvloop", "dramatiq", "celery", "taskiq-uvloop"],
            {"n": 400 if q else 2000, "io_s": 0.05, "prefetch": 100, "concurrency": 100},
        ),
        Workload(
            "latency",
            "Latency enqueue → handler start at 500 jobs/s (and idle RSS)",
            ["aiopika", "aiopika-uvloop", "leveret", "leveret-uvloop", *ALL_PEERS],
            {"n": 250 if q else 2000, "rate": 500, "prefetch": 100, "concurrency": 1},
        ),
        Workload(
            "retry",
            "Retry: 500 jobs failing once, 1 s backoff",
            ["leveret", "dramatiq", "celery", "taskiq-uvloop"],
            {"n": 100 if q else 500, "backoff_s": 1.0, "prefetch": 500, "concurrency": 4},
        ),
    ]
    if libs:
        for item in w:
            item.libs = [lib for lib in item.libs if lib in libs]
    return [item for item in w if item.libs]


@dataclass
class Run:
    workload: str
    lib: str
    round: int
    ok: bool
    error: str = ""
    figures: dict[str, float] = field(default_factory=dict)


def snapshot(commit: str) -> Path:
    """The repository at ``commit`` in a temporary folder (``git archive``), made once.

    A runner started there imports that commit's own packages and runner (the current
    directory comes first on ``sys.path`` with ``-m``), with this venv's libraries."""
    dest = Path(tempfile.gettempdir()) / f"leveret-{commit}"
    if not (dest / "bench").is_dir():
        tar = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit],
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(dest, filter="data")
    return dest


class Harness:
    def __init__(self, broker: BenchBroker, logdir: Path, timeout_s: float = 180.0) -> None:
        self.broker = broker
        self.logdir = logdir
        self.timeout_s = timeout_s
        self.runs: list[Run] = []

    async def _spawn(self, lib: str, spec: dict[str, Any], tag: str) -> asyncio.subprocess.Process:
        module, extra = RUNNERS[lib]
        extra = {k: v for k, v in extra.items() if not k.startswith("_") or k == "_tree"}
        tree = extra.pop("_tree", None)
        log = open(self.logdir / f"{tag}.log", "wb")  # noqa: SIM115, ASYNC230 - for the child
        # A row's settings are its own: none inherited from LEVERET_* in the caller's shell.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEVERET_")}
        env["PYTHONUNBUFFERED"] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            json.dumps({**spec, **extra}),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            cwd=snapshot(tree) if tree else ROOT,
            env=env,
            limit=2**26,
        )
        log.close()
        return proc

    @staticmethod
    async def _expect(proc: asyncio.subprocess.Process, tag: str, timeout: float) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"runner exited (code {await proc.wait()}) before {tag}")
            word, _, rest = line.decode().partition(" ")
            if word == tag:
                return json.loads(rest) if rest.strip() else {}

    @staticmethod
    def _go(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        proc.stdin.write(b"GO\n")

    async def run(self, wl: Workload, lib: str, rnd: int, profile: Path | None = None) -> Run:
        key = uuid.uuid4().hex[:8]
        queue = f"bq_{wl.name}_{lib.replace('-', '_')}_{key}"
        spec = {
            "workload": wl.name,
            "url": self.broker.url,
            "queue": queue,
            "job": queue,
            **wl.params,
            "processes": consumers(wl, lib),
        }
        if lib in THREADED and wl.name == "io":
            spec["prefetch"] = 100
        watch: ResultWatch | None = None
        kind = RUNNERS[lib][1].get("results")
        if kind and not wl.name.startswith("publish") and wl.name != "latency":
            spec["results_url"] = REDIS_URL
            spec["results_ns"] = f"bench-{key}"
            if kind == "leveret":
                spec["status_url"] = REDIS_URL
            watch = ResultWatch(REDIS_URL, kind, spec)
        procs: list[asyncio.subprocess.Process] = []
        try:
            spawn = 1 if RUNNERS[lib][1].get("_cli") else spec["processes"]
            for p in range(spawn):
                procs.append(await self._spawn(lib, spec, f"{wl.name}-{lib}-r{rnd}-p{p}"))
            figures = await asyncio.wait_for(
                self._drive(wl, lib, spec, procs, profile, watch), self.timeout_s
            )
            run = Run(wl.name, lib, rnd, True, figures=figures)
        except Exception as exc:
            run = Run(wl.name, lib, rnd, False, error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await asyncio.to_thread(self.broker.delete_queues, queue)
            if watch is not None:
                await watch.close()
        self.runs.append(run)
        return run

    async def _drive(
        self,
        wl: Workload,
        lib: str,
        spec: dict[str, Any],
        procs: list[asyncio.subprocess.Process],
        profile: Path | None,
        watch: ResultWatch | None = None,
    ) -> dict[str, float]:
        for proc in procs:
            await self._expect(proc, "READY", 60)
        n = spec["n"]
        if wl.name.startswith("publish"):
            (proc,) = procs
            self._go(proc)
            result = await self._expect(proc, "RESULT", self.timeout_s)
            await proc.wait()
            got = await self.broker.wait_depth(spec["queue"], n)
            if got != n:
                raise RuntimeError(f"queue holds {got} jobs after publishing {n}")
            return {"rate": n / result["elapsed"]}
        if wl.name != "latency":
            wires = [encode(lib, spec["queue"], spec["job"], payload(i)) for i in range(n)]
            if watch is not None:
                await watch.open([w.id for w in wires])
            await self.broker.fill(iter(wires))
        spy = None
        if profile is not None:
            spy = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--pid",
                str(procs[0].pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(profile),
                "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await asyncio.sleep(1.5)
        for proc in procs:
            self._go(proc)
        watching = asyncio.create_task(watch.watch()) if watch is not None else None
        try:
            for proc in procs:
                await self._expect(proc, "CONSUMING", 60)
            figures = await self._consumed(wl, lib, spec, procs, spy, watch, watching)
        finally:
            if watching is not None and not watching.done():
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
        return figures

    async def _consumed(
        self,
        wl: Workload,
        lib: str,
        spec: dict[str, Any],
        procs: list[asyncio.subprocess.Process],
        spy: asyncio.subprocess.Process | None,
        watch: ResultWatch | None,
        watching: asyncio.Task[float] | None,
    ) -> dict[str, float]:
        n = spec["n"]
        figures: dict[str, float] = {}
        if wl.name == "latency":
            await asyncio.sleep(0.5)
            figures["rss_idle_mib"] = _rss_kib(procs[0].pid) / 1024
            await self._paced(lib, spec, wl.params["rate"])
        results = [await self._expect(proc, "RESULT", self.timeout_s) for proc in procs]
        for proc in procs:
            await proc.wait()
        if spy is not None:
            await asyncio.wait_for(spy.wait(), 30)
        handled = sum(r["handled"] for r in results)
        left = await self.broker.depth(spec["queue"])
        if handled != n or left:
            raise RuntimeError(f"handled {handled} of {n} jobs; {left} left in the queue")
        # A process that got no job (another took the queue) has no times of its own.
        busy = [r for r in results if r["handled"]]
        t_first = min(r["t_first"] for r in busy)
        t_last = max(r["t_last"] for r in busy)
        if watching is not None:
            # A job counts once its final status (result) is readable: the run ends then.
            try:
                readable = await asyncio.wait_for(watching, ResultWatch.GRACE_S)
            except TimeoutError:
                assert watch is not None
                unread = await watch.unread()
                raise RuntimeError(
                    f"{unread} of {n} jobs' outcomes not readable in Redis "
                    f"{ResultWatch.GRACE_S:.0f} s after the runner ended"
                ) from None
            figures["readable_lag_ms"] = max(0.0, readable - t_last) * 1000
            t_last = max(t_last, readable)
        span = t_last - t_first
        if wl.name.startswith("consume"):
            figures["rate"] = n / span
            figures["cpu_us_per_job"] = sum(r["cpu_s"] for r in results) / n * 1e6
            figures["rss_loaded_mib"] = max(r["rss_hwm_kib"] for r in results) / 1024
        elif wl.name == "io":
            figures["wall_s"] = span
        elif wl.name == "latency":
            lat = sorted(x for r in results for x in r.get("latencies", []))
            figures["p50_ms"] = _pct(lat, 50) * 1000
            figures["p99_ms"] = _pct(lat, 99) * 1000
        elif wl.name == "retry":
            late = sorted(x for r in results for x in r.get("lateness", []))
            figures["wall_s"] = span
            figures["late_p50_ms"] = _pct(late, 50) * 1000
            figures["late_max_ms"] = late[-1] * 1000 if late else 0.0
        return figures

    async def _paced(self, lib: str, spec: dict[str, Any], rate: float) -> None:
        """Publish at a steady ``rate``, stamping each body with its send time."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending: set[asyncio.Task[None]] = set()
        for i in range(spec["n"]):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            wire = encode(lib, spec["queue"], spec["job"], payload(i, stamp=True))
            task = asyncio.create_task(self.broker.send(wire))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)


class ResultWatch:
    """When every job of a run has its final status (or result) readable in Redis.

    The rows with ``results`` (``leveret-status*``, ``dramatiq-results``, ``celery-results``)
    count a job only once a client could read its outcome: Leveret's status hash reads
    ``state=succeeded``, Dramatiq's result key exists, Celery's result reads ``SUCCESS``. The
    harness reads them itself, as such a client would, from its own connection while the run
    goes on: each poll probes the oldest job still unread (one command every ``POLL_S``), and
    once that one reads done, the ``WINDOW`` oldest unread ones in one pipeline, dropping those
    done; a job not yet done stays for a later poll. So the reads cost about two commands per
    job, the same for the three rows, and the end time is the poll that saw the last one (late
    by at most one poll and one pipeline: a few ms). The run fails if some job's outcome is
    still unreadable ``GRACE_S`` after the runner reported.
    """

    POLL_S = 0.005
    WINDOW = 500
    GRACE_S = 30.0

    def __init__(self, url: str, kind: str, spec: dict[str, Any]) -> None:
        self.url = url
        self.kind = kind
        self.spec = spec
        self.keys: list[str] = []
        self._client: Any = None

    def key(self, job_id: str) -> str:
        if self.kind == "leveret":
            return "leveret:status:" + job_id  # producers.status.DEFAULT_PREFIX
        if self.kind == "dramatiq":  # RedisBackend(use_namespace_prefix_keys=True)
            return f"{self.spec['results_ns']}:{self.spec['queue']}:{self.spec['job']}:{job_id}"
        if self.kind == "celery":
            return "celery-task-meta-" + job_id
        raise ValueError(f"no results kind {self.kind!r}")

    async def open(self, ids: list[str]) -> None:
        import redis.asyncio as aioredis

        self.keys = [self.key(i) for i in ids]
        self._client = aioredis.Redis.from_url(self.url)
        await self._client.delete(*self.keys[:1])  # reachable, and a clean slate (fresh ids)

    async def _done(self, keys: list[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            if self.kind == "leveret":
                pipe.hget(key, "state")
            elif self.kind == "dramatiq":
                pipe.exists(key)
            else:
                pipe.get(key)
        values = await pipe.execute()
        if self.kind == "leveret":
            return [v == b"succeeded" for v in values]
        if self.kind == "dramatiq":
            return [bool(v) for v in values]
        return [v is not None and b'"SUCCESS"' in v for v in values]

    async def watch(self) -> float:
        """``time.time()`` of the poll that found the last job's outcome readable."""
        pending = list(self.keys)
        last = 0.0
        while pending:
            (head,) = await self._done(pending[:1])
            if not head:
                await asyncio.sleep(self.POLL_S)
                continue
            window = pending[: self.WINDOW]
            done = await self._done(window)
            last = time.time()
            pending = [k for k, ok in zip(window, done, strict=True) if not ok] + pending[
                self.WINDOW :
            ]
        return last

    async def unread(self) -> int:
        done = await self._done(self.keys)
        return done.count(False)

    async def close(self) -> None:
        """Delete the run's keys (only its own: fresh ids, its own namespace)."""
        if self._client is None:
            return
        with contextlib.suppress(Exception):
            for first in range(0, len(self.keys), 1000):
                await self._client.delete(*self.keys[first : first + 1000])
        with contextlib.suppress(Exception):
            await self._client.aclose()
        self._client = None


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


async def run_all(
    broker: BenchBroker,
    workloads: list[Workload],
    rounds: int,
    logdir: Path,
    progress: bool = True,
) -> list[Run]:
    harness = Harness(broker, logdir)
    await broker.open()
    try:
        for rnd in range(rounds):
            for wl in workloads:
                shift = rnd % len(wl.libs)
                order = wl.libs[shift:] + wl.libs[:shift]
                for lib in order:
                    started = time.monotonic()
                    run = await harness.run(wl, lib, rnd)
                    if progress:
                        shown = {k: round(v, 3) for k, v in run.figures.items()}
                        status = shown if run.ok else f"FAILED {run.error}"
                        print(
                            f"[round {rnd + 1}/{rounds}] {wl.name:18} {lib:17} "
                            f"{time.monotonic() - started:5.1f}s {status}",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        await broker.close()
    return harness.runs


def summarise(runs: list[Run]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(workload, lib, figure) → median, min, max, n, and the same-round ratio to aio-pika."""
    by_key: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for run in runs:
        if run.ok:
            for name, value in run.figures.items():
                by_key.setdefault((run.workload, run.lib, name), []).append((run.round, value))
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for (wl, lib, name), values in by_key.items():
        xs = [v for _, v in values]
        entry = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
        out[(wl, lib, name)] = entry
    for (wl, lib, name), entry in out.items():
        ref_wl = "publish_noconfirm" if wl == "publish_batch" else wl
        mine = dict(by_key[(wl, lib, name)])
        refs = [
            ("aiopika", "x_aiopika"),
            ("aiopika-uvloop", "x_aiopika_uvloop"),
            ("dramatiq", "x_dramatiq"),
            ("celery", "x_celery"),
            ("dramatiq-results", "x_dramatiq_results"),
            ("celery-results", "x_celery_results"),
            (plain_of(lib), "x_leveret"),
        ]
        if lib in BASE_OF:
            refs.append((BASE_OF[lib], "x_base"))
        for ref_lib, label in refs:
            # The batch API is held against bare aio-pika publishing without confirms.
            _put(entry, label, mine, dict(by_key.get((ref_wl, ref_lib, name), [])))
        if name == "rate":
            _put(entry, "x_ceiling", mine, ceiling(by_key, wl))
    return out


def plain_of(lib: str) -> str:
    """A feature row's plain row: the same worker without the feature, same loop (a uvloop
    feature row against "leveret-uvloop", "leveret-uvloop" itself against "leveret")."""
    if lib in ("leveret-cli", "leveret-cli-2p"):
        return "leveret-uvloop"
    uvloop = lib.endswith("-uvloop") and lib.startswith("leveret-") and lib != "leveret-uvloop"
    return "leveret-uvloop" if uvloop else "leveret"


def ceiling(
    by_key: dict[tuple[str, str, str], list[tuple[int, float]]], wl: str
) -> dict[int, float]:
    """The broker's ceiling per round: the best rate of bare aio-pika on uvloop in 1, 2 or 4
    processes in that round; only rounds that ran a multi-process row have one."""
    per_round: dict[int, float] = {}
    multi: set[int] = set()
    for lib in CEILING:
        for rnd, value in by_key.get((wl, lib, "rate"), []):
            per_round[rnd] = max(per_round.get(rnd, 0.0), value)
            if lib != CEILING[0]:
                multi.add(rnd)
    return {rnd: v for rnd, v in per_round.items() if rnd in multi}


def _put(
    entry: dict[str, float], label: str, mine: dict[int, float], ref: dict[int, float]
) -> None:
    """``label``: the median of the same-round ratios mine / ref, with their min and max."""
    ratios = [mine[r] / ref[r] for r in mine if ref.get(r)]
    if ratios:
        entry[label] = statistics.median(ratios)
        entry[label + "_min"] = min(ratios)
        entry[label + "_max"] = max(ratios)
