"""``bench/RESULTS.md``: machine, versions, command, targets, then one table per workload."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.harness import (
    BASE_OF,
    CEILING,
    CLI_ROWS,
    FEATURE_SETTINGS,
    FEATURES,
    FEATURES_UVLOOP,
    RESULT_PEERS,
    Run,
    Workload,
    consumers,
    loop_of,
    plain_of,
)

Summary = dict[tuple[str, str, str], dict[str, float]]

UNITS = {
    "rate": ("jobs/s", 0),
    "cpu_us_per_job": ("µs CPU/job", 0),
    "rss_loaded_mib": ("MiB peak", 1),
    "wall_s": ("s", 3),
    "p50_ms": ("ms p50", 2),
    "p99_ms": ("ms p99", 2),
    "rss_idle_mib": ("MiB idle", 1),
    "late_p50_ms": ("ms late p50", 0),
    "late_max_ms": ("ms late max", 0),
    "readable_lag_ms": ("ms last outcome readable after last handler", 0),
}
HIGHER_IS_BETTER = {"rate"}
PACKAGES = [
    "leveret",
    "aio-pika",
    "aiormq",
    "pydantic",
    "structlog",
    "prometheus-client",
    "dramatiq",
    "pika",
    "celery",
    "kombu",
    "faststream",
    "taskiq",
    "taskiq-aio-pika",
    "uvloop",
    "redis",
]
SETTINGS = """\
| library | how it runs here |
|---|---|
| aio-pika (bare) | `aio_pika.connect`, `channel.set_qos(prefetch)`, `queue.consume(callback)`, `json.loads`, one `message.ack()` per job after the handler; publishing: persistent, `mandatory`, confirms (sequential, or 1,000 lanes in flight), or a channel without confirms |
| leveret | the real `consumer.Worker` (`prefetch` as below, metrics served on a free port, structlog JSON at info to a log file, pydantic `Item` model validated from bytes, `max_attempts=3`, confirmed retries); `producers.Publisher` (`publish` sequential or 1,000 lanes, `publish_many` in batches of 1,000) |
| aio-pika-uvloop | the same code under `uvloop.run` (the reference the targets name) |
| leveret-uvloop | the same worker and publisher under `uvloop.run` |
| leveret-blocking | `producers.BlockingPublisher` |
| leveret-outcomes, -status, -resource, -lock, -ratelimit, -lock-broker | the `leveret` worker with one setting changed (table "Feature rows" above); asyncio's loop, the workload's prefetch; `leveret` itself runs the defaults (events off, no status store) |
| leveret-outcomes-uvloop, -status-, -resource-, -lock-, -ratelimit-uvloop | the same rows under `uvloop.run` |
| leveret-cli | the same app through the real CLI, as a user runs it: `leveret worker bench.runners.leveret_app:worker --prefetch N` in a subprocess (default `--loop auto`, so uvloop), settings from `LEVERET_*` (same values as `leveret`); the app registers the same job and handler and counts with the same tally; the CLI is stopped with SIGTERM once every job ran |
| leveret-cli-2p | the same with `--processes 2` (consume_2proc): the supervisor and two worker processes; CPU per job adds the supervisor's own CPU while they consume |
| aiopika-uvloop-2p, -4p | bare aio-pika on uvloop in 2 and 4 consumer processes on one queue, each with the workload's prefetch: the broker's ceiling is the best of 1, 2 and 4 processes in the same round |
| leveret-lock, -lock-uvloop | `leveret-status` (Redis status store, events off) + `lock="{i}"`: every job takes, renews and releases its own Redis lock (distinct keys, never contended); counted once every job reads `succeeded` |
| leveret-ratelimit, -ratelimit-uvloop | `rate_limit="100000/s"` per process: far above this machine's rate, so it never binds; the cost of admitting each start |
| leveret-status, -status-uvloop | `LEVERET_STATUS_URL` = the bench's Redis database (14, or `BENCH_REDIS_URL`), events `off`: the worker writes each job's status itself before its ack; the run ends when the harness reads `state=succeeded` for every job (`ResultWatch` in `bench/harness.py`) |
| dramatiq | `RabbitmqBroker(confirm_delivery=True)`, `Worker(worker_threads=1)` with `dramatiq_queue_prefetch` = prefetch (100 threads for I/O, 4 for retries); `min_backoff=500, max_backoff=2000` (its jitter is not optional: the first retry waits 1–2 s), `actor.send` |
| celery | py-amqp, `task_acks_late`, results ignored, `confirm_publish`, solo pool with `worker_prefetch_multiplier` = prefetch (threads pool: ×100 for I/O, ×4 for retries, where the solo pool ran the 500 ETA retries ~10/s, 50 s in all), without gossip/mingle/heartbeat; `apply_async`; `self.retry(countdown=1)` |
| dramatiq-results | `dramatiq` as above + `Results` middleware on a `RedisBackend` (same Redis database), `store_results=True`; the run ends when the harness reads every job's result key |
| celery-results | `celery` as above (solo pool, prefetch ×1000) + Redis result backend (`task_ignore_result=False`), `task_track_started=True`, task events on (`worker_send_task_events`, `-E`; sent without publisher confirms, fire-and-forget as Celery sends them); the run ends when the harness reads `SUCCESS` for every job |
| faststream-uvloop | `RabbitBroker`, subscriber on a `Channel(prefetch_count=…)`, default ack policy (ack after the handler), `publish(persist=True)` with its default confirms |
| taskiq-uvloop | `AioPikaBroker(qos=…)` on a classic queue, receiver with `max_async_tasks`, `ack_time=WHEN_EXECUTED`, `SmartRetryMiddleware(delay=1 s, no jitter)`, `task.kiq` with confirms |
"""  # noqa: E501 - a Markdown table


def _fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _cell(entry: dict[str, float] | None, digits: int) -> str:
    if not entry:
        return "—"
    return (
        f"{_fmt(entry['median'], digits)} ({_fmt(entry['min'], digits)}–"
        f"{_fmt(entry['max'], digits)})"
    )


def _ratio(entry: dict[str, float] | None, label: str = "x_aiopika") -> str:
    if not entry or label not in entry:
        return "—"
    return f"{entry[label]:.2f}× ({entry[label + '_min']:.2f}–{entry[label + '_max']:.2f})"


def machine_line() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import os

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem} RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def targets(summary: Summary) -> list[tuple[str, str, str, str]]:
    """(workload, target, measured, verdict) for the issue's targets table.

    Every library at its best configuration: Leveret's verdicts are its uvloop rows
    (``leveret-uvloop``, what ``--loop auto`` picks where uvloop is installed), held against
    bare aio-pika on uvloop (``x_aiopika_uvloop``) of the same round.
    """
    rows = []
    best = "leveret-uvloop"

    def get(wl: str, lib: str, fig: str) -> dict[str, float] | None:
        return summary.get((wl, lib, fig))

    def verdict(value: float, goal: float, higher: bool) -> str:
        met = value >= goal if higher else value <= goal
        if met:
            return "**met**"
        miss = (goal - value) / goal if higher else (value - goal) / goal
        return f"missed by {miss:.1%}"

    uv = "x_aiopika_uvloop"
    c = get("consume_noop", best, "rate")
    if c and uv in c:
        rows.append(
            (
                "consume no-op, one process (uvloop)",
                "≥ 1.6× bare aio-pika on uvloop",
                _ratio(c, uv),
                verdict(c[uv], 1.6, True),
            )
        )
    if c and "x_dramatiq" in c:
        rows.append(
            (
                "consume no-op, one process (uvloop)",
                "≥ 1.5× Dramatiq's best, same run",
                _ratio(c, "x_dramatiq"),
                verdict(c["x_dramatiq"], 1.5, True),
            )
        )
    p = get("publish_pipelined", best, "rate")
    if p and uv in p:
        rows.append(
            (
                "publish pipelined, confirms (uvloop)",
                "≥ 1.2× bare aio-pika on uvloop, window 1,000",
                _ratio(p, uv),
                verdict(p[uv], 1.2, True),
            )
        )
    b = get("publish_batch", best, "rate")
    if b and uv in b:
        rows.append(
            (
                "`publish_many` with confirms (uvloop)",
                "≥ 0.9× bare aio-pika on uvloop without confirms",
                _ratio(b, uv),
                verdict(b[uv], 0.9, True),
            )
        )
    for lib in (best, "leveret"):
        lat = get("latency", lib, "p99_ms")
        if lat:
            rows.append(
                (
                    f"latency at 500 jobs/s ({lib})",
                    "p99 ≤ 2.5 ms",
                    _cell(lat, 2) + " ms",
                    verdict(lat["median"], 2.5, False),
                )
            )
    for lib in (best, "leveret"):
        rss = get("latency", lib, "rss_idle_mib")
        if rss:
            rows.append(
                (
                    f"worker idle RSS, metrics on ({lib})",
                    "≤ 45 MiB",
                    _cell(rss, 1) + " MiB",
                    verdict(rss["median"], 45, False),
                )
            )
    rows.extend(feature_targets(summary))
    rows.extend(issue26_targets(summary))
    for lib in ("leveret", "leveret-uvloop"):
        io = get("io", lib, "wall_s")
        if io:
            rows.append(
                (
                    f"I/O-bound 2,000 × 50 ms, concurrency 100 ({lib}; issue 26)",
                    "≤ 1.05 s (ideal 1.0 s)",
                    _cell(io, 3) + " s",
                    verdict(io["median"], 1.05, False),
                )
            )
    r = get("retry", "leveret", "wall_s")
    if r:
        rows.append(
            (
                "retry, 500 jobs failing once, 1 s backoff (issue 26)",
                "≤ 1.25 s wall",
                _cell(r, 3) + " s",
                verdict(r["median"], 1.25, False),
            )
        )
    return rows


# Issue 12 quotes "today" as Leveret without events at 1.57x bare aio-pika (asyncio, the run of
# 2026-11-23); same-round ratios move by about +-15 % on this shared machine (bench/NOTES.md).
EVENTS_OFF_TODAY = 1.57
NOISE = 0.15


def feature_targets(summary: Summary) -> list[tuple[str, str, str, str]]:
    """The feature rows' budgets (issues 12, 14 and 20), each from the same run's rounds.

    Feature rows run on asyncio's loop like ``leveret``; they are held against bare aio-pika on
    asyncio (same loop, ``x_aiopika``) or against ``leveret`` itself (``x_leveret``, the same
    worker without the feature, same round). Issue 20's budget: ``budget_targets``.
    """
    rows: list[tuple[str, str, str, str]] = []

    def rate(lib: str) -> dict[str, float] | None:
        return summary.get(("consume_noop", lib, "rate"))

    def at_least(value: float, goal: float) -> str:
        return "**met**" if value >= goal else f"missed by {(goal - value) / goal:.1%}"

    out = rate("leveret-outcomes")
    if out and "x_aiopika" in out:
        rows.append(
            (
                "consume no-op, `LEVERET_EVENTS=outcomes` (asyncio; issue 12)",
                "≥ 1.0× bare aio-pika (asyncio), same run",
                _ratio(out),
                at_least(out["x_aiopika"], 1.0),
            )
        )
    off = rate("leveret")
    if off and "x_aiopika" in off:
        floor = EVENTS_OFF_TODAY * (1 - NOISE)
        rows.append(
            (
                "consume no-op, defaults = events off (asyncio; issue 12)",
                f"within noise of {EVENTS_OFF_TODAY:.2f}× bare aio-pika (≥ {floor:.2f}×)",
                _ratio(off),
                at_least(off["x_aiopika"], floor),
            )
        )
    rows.extend(budget_targets(summary))
    res = rate("leveret-resource")
    if res and "x_leveret" in res:
        rows.append(
            (
                "consume no-op, one job-scoped resource (asyncio; issue 14)",
                "≤ 10 % slower than `leveret` (≥ 0.90×), same run",
                _ratio(res, "x_leveret"),
                at_least(res["x_leveret"], 0.9),
            )
        )
    return rows


def _verdict(value: float, goal: float, higher: bool = True) -> str:
    met = value >= goal if higher else value <= goal
    if met:
        return "**met**"
    miss = (goal - value) / goal if higher else (value - goal) / goal
    return f"missed by {miss:.1%}"


def _pct(entry: dict[str, float], label: str) -> str:
    return (
        f"{entry[label]:.1%} ({entry[label + '_min']:.1%}–{entry[label + '_max']:.1%}) "
        "of the ceiling"
    )


# Issue 26's feature budgets: (row, reference label, what the reference row lacks, goal), each
# against the same worker without the feature on the same loop (``x_base``: ``BASE_OF``, a lock
# row against the status row, since locks need its Redis; ``x_leveret``: the plain row).
FEATURE_BUDGET_26 = [
    ("leveret-lock", "x_base", "same settings, no lock", 0.8),
    ("leveret-lock-uvloop", "x_base", "same settings, no lock", 0.8),
    ("leveret-ratelimit", "x_leveret", "no rate limit", 0.9),
    ("leveret-ratelimit-uvloop", "x_leveret", "no rate limit", 0.9),
    ("leveret-resource-uvloop", "x_leveret", "no resource", 0.9),
]
CLI_GOALS = {"x_aiopika_uvloop": 1.3, "x_dramatiq": 1.5, "cpu": 0.6, "ceiling": 0.95}


def issue26_targets(summary: Summary) -> list[tuple[str, str, str, str]]:
    """Issue 26's rows, same-round ratios of consume_noop: the default worker through the real
    CLI (``leveret-cli``: uvloop by ``--loop auto``) against bare aio-pika on uvloop, Dramatiq,
    aio-pika's CPU per job and the broker's ceiling; then each feature row against the same
    worker without it (a lock row against the status row: locks need its Redis)."""
    rows: list[tuple[str, str, str, str]] = []

    def get(lib: str, fig: str = "rate") -> dict[str, float] | None:
        return summary.get(("consume_noop", lib, fig))

    for lib in CLI_ROWS:
        where = (
            f"consume no-op, `{lib}`: `leveret worker`, default `--loop auto` = uvloop (issue 26)"
        )
        c = get(lib)
        for label, name in (
            ("x_aiopika_uvloop", "bare aio-pika on uvloop"),
            ("x_dramatiq", "Dramatiq's best"),
        ):
            if c and label in c:
                goal = CLI_GOALS[label]
                rows.append(
                    (
                        where,
                        f"≥ {goal:.1f}× {name}, same run",
                        _ratio(c, label),
                        _verdict(c[label], goal),
                    )
                )
        cpu = get(lib, "cpu_us_per_job")
        if cpu and "x_aiopika_uvloop" in cpu:
            goal = CLI_GOALS["cpu"]
            rows.append(
                (
                    where,
                    f"CPU per job ≤ {goal:.1f}× bare aio-pika's on uvloop, same run",
                    f"{_cell(cpu, 0)} µs: {_ratio(cpu, 'x_aiopika_uvloop')}",
                    _verdict(cpu["x_aiopika_uvloop"], goal, higher=False),
                )
            )
        if c and "x_ceiling" in c:
            goal = CLI_GOALS["ceiling"]
            rows.append(
                (
                    where,
                    f"≥ {goal:.0%} of the broker's ceiling (best of bare aio-pika on uvloop in "
                    "1, 2, 4 processes), same round",
                    _pct(c, "x_ceiling"),
                    _verdict(c["x_ceiling"], goal),
                )
            )
    for lib, label, lacks, goal in FEATURE_BUDGET_26:
        entry = get(lib)
        if not entry or label not in entry:
            continue
        ref = BASE_OF[lib] if label == "x_base" else plain_of(lib)
        measured = _ratio(entry, label)
        if label == "x_base" and "x_leveret" in entry:  # a lock row: plain Leveret beside
            measured += f"; × `{plain_of(lib)}`: {_ratio(entry, 'x_leveret')}"
        rows.append(
            (
                f"consume no-op, `{lib}` ({loop_of(lib)}; issue 26)",
                f"≤ {1 - goal:.0%} slower than `{ref}` ({lacks}; ≥ {goal:.2f}×), same run",
                measured,
                _verdict(entry[label], goal),
            )
        )
    return rows


# Issue 20's performance budget: (row, reference label, reference name, goal).
BUDGET = [
    ("leveret-status", "x_aiopika_uvloop", "bare aio-pika on uvloop", 1.0),
    ("leveret-status", "x_dramatiq_results", "Dramatiq + `Results` (Redis)", 3.0),
    ("leveret-status", "x_celery_results", "Celery + Redis backend + events", 6.0),
    ("leveret-outcomes", "x_aiopika_uvloop", "bare aio-pika on uvloop", 0.8),
]


def budget_targets(summary: Summary) -> list[tuple[str, str, str, str]]:
    """Issue 20's budget, same-round ratios of consume_noop, in one run.

    Each Leveret row the run has: its uvloop variant (what ``--loop auto`` picks, against
    aio-pika on uvloop like for like) and the asyncio feature row (the same worker as plain
    ``leveret``); the row's name says which. The peers are threaded (no loop). Status and
    result rows count a job once its outcome is readable in Redis.
    """
    rows: list[tuple[str, str, str, str]] = []
    for base, label, name, goal in BUDGET:
        for lib in (base + "-uvloop", base):
            entry = summary.get(("consume_noop", lib, "rate"))
            if entry and label in entry:
                rows.append(
                    (
                        f"consume no-op, `{lib}` ({loop_of(lib)}; issue 20)",
                        f"≥ {goal:.1f}× {name}, same run",
                        _ratio(entry, label),
                        "**met**"
                        if entry[label] >= goal
                        else f"missed by {(goal - entry[label]) / goal:.1%}",
                    )
                )
    return rows


def feature_table(summary: Summary, workloads: list[Workload]) -> list[str]:
    """Every feature row of consume_noop with its settings, loop and same-round ratios."""
    noop = next((w for w in workloads if w.name == "consume_noop"), None)
    if noop is None:
        return []
    rows = (
        "leveret",
        "leveret-uvloop",
        *CLI_ROWS,
        *FEATURES,
        "leveret-lock-broker",
        *FEATURES_UVLOOP,
        *RESULT_PEERS,
    )
    libs = [lib for lib in rows if lib in noop.libs]
    if not any(lib not in ("leveret", "leveret-uvloop", *RESULT_PEERS) for lib in libs):
        return []
    prefetch = noop.params.get("prefetch")
    out = [
        "## Feature rows (issues 12, 14, 16, 20, 26): consume no-op, beside bare aio-pika\n",
        f"Every `leveret-*` row is the `leveret` worker and handler with one setting changed; all "
        f"use the workload's prefetch ({prefetch}) and nothing else tuned per row. The peers "
        "with results kept run their best settings otherwise. Rows that keep a status or "
        "result are counted only once every job's outcome is readable in Redis. Ratios are "
        "same-round medians (min–max); `× leveret` is against the plain row of the same round "
        "and loop (`leveret-uvloop` for a uvloop feature row and for the CLI row); `× base` is "
        "against the row with the same settings but the feature (a lock row against the status "
        "row: locks need its Redis; the CLI row against the same worker in-process).\n",
        "| library | loop | prefetch | setting | jobs/s | µs CPU/job | × aio-pika (asyncio) "
        "| × aio-pika (uvloop) | × leveret | × base | × dramatiq-results | × celery-results |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lib in libs:
        entry = summary.get(("consume_noop", lib, "rate"))
        cpu = summary.get(("consume_noop", lib, "cpu_us_per_job"))
        peer = lib in RESULT_PEERS
        cells = [
            lib,
            loop_of(lib),
            str(prefetch),
            FEATURE_SETTINGS.get(lib, ""),
            _cell(entry, 0),
            _cell(cpu, 0),
            _ratio(entry),
            _ratio(entry, "x_aiopika_uvloop"),
            "1.00×" if lib == "leveret" else "—" if peer else _ratio(entry, "x_leveret"),
            f"{_ratio(entry, 'x_base')} `{BASE_OF[lib]}`" if lib in BASE_OF else "—",
            "—" if peer else _ratio(entry, "x_dramatiq_results"),
            "—" if peer else _ratio(entry, "x_celery_results"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def ceiling_table(summary: Summary, workloads: list[Workload]) -> list[str]:
    """Issue 26: the broker's ceiling (bare aio-pika on uvloop in 1, 2, 4 processes), and each
    Leveret row of consume_noop as a share of it, same round."""
    noop = next((w for w in workloads if w.name == "consume_noop"), None)
    if noop is None or not any(lib in noop.libs for lib in CEILING[1:]):
        return []
    leveret = [lib for lib in ("leveret-cli", "leveret-uvloop", "leveret") if lib in noop.libs]
    out = [
        "## Broker ceiling (issue 26): consume no-op, one queue\n",
        "The ceiling of a round is the best rate of bare aio-pika on uvloop in 1, 2 or 4 "
        "consumer processes on the one queue (each process with the workload's prefetch), in "
        "that round; every share is the median over rounds of a row's rate divided by its "
        "round's ceiling. On this machine the broker and the clients share the cores. A share "
        "above 100 % means the row outran every bare aio-pika configuration: there the clients, "
        "not the broker, set the pace, and this ceiling is only a lower bound of the broker's.\n",
        "| library | loop | processes | jobs/s | µs CPU/job | share of the ceiling |",
        "|---|---|---|---|---|---|",
    ]
    for lib in [*[c for c in CEILING if c in noop.libs], *leveret]:
        entry = summary.get(("consume_noop", lib, "rate"))
        cpu = summary.get(("consume_noop", lib, "cpu_us_per_job"))
        share = (
            _pct(entry, "x_ceiling").removesuffix(" of the ceiling")
            if entry and ("x_ceiling" in entry)
            else "—"
        )
        procs = consumers(noop, lib)
        out.append(
            f"| {lib} | {loop_of(lib)} | {procs} | {_cell(entry, 0)} | {_cell(cpu, 0)} | {share} |"
        )
    out.append("")
    return out


# What each Leveret feature row measures, and the rivals' rows measuring the same feature:
# (feature, Leveret rows, {peer: (its row with the feature, its plain row) or why none}).
RIVALS: list[tuple[str, list[str], dict[str, tuple[str, str] | str]]] = [
    (
        "each job's outcome kept in Redis, readable by a client",
        ["leveret-status", "leveret-status-uvloop"],
        {"Dramatiq": ("dramatiq-results", "dramatiq"), "Celery": ("celery-results", "celery")},
    ),
    (
        "a lock per job (distinct keys; Redis, or the broker alone)",
        ["leveret-lock", "leveret-lock-uvloop", "leveret-lock-broker"],
        {
            "Dramatiq": "no job lock option (a `ConcurrentRateLimiter` called in the actor's "
            "code is the nearest): not measured",
            "Celery": "no job lock: not measured",
        },
    ),
    (
        "a per-process rate limit that does not bind",
        ["leveret-ratelimit", "leveret-ratelimit-uvloop"],
        {
            "Dramatiq": "rate limiters are called in the actor's code, no option: not measured",
            "Celery": "`rate_limit=` on the task (per worker): no row yet, not measured",
        },
    ),
    (
        "one job-scoped resource",
        ["leveret-resource", "leveret-resource-uvloop"],
        {"Dramatiq": "no equivalent", "Celery": "no equivalent"},
    ),
    (
        "run through the CLI rather than in-process",
        ["leveret-cli"],
        {
            "Dramatiq": "its rows embed `dramatiq.Worker` as its CLI does: no separate row",
            "Celery": "its rows embed `app.Worker` as `celery worker` does: no separate row",
        },
    ),
]


def rival_table(summary: Summary, workloads: list[Workload]) -> list[str]:
    """Each Leveret feature's cost (its row against the same worker without it, same round and
    loop) beside the rival's same feature (its row against its plain row, same round)."""
    noop = next((w for w in workloads if w.name == "consume_noop"), None)
    if noop is None:
        return []

    def cost(lib: str, label: str) -> str:
        rate = summary.get(("consume_noop", lib, "rate"))
        cpu = summary.get(("consume_noop", lib, "cpu_us_per_job"))
        if not rate or label not in rate:
            return "—"
        text = f"jobs/s {_ratio(rate, label)}"
        if cpu and label in cpu:
            text += f", CPU/job {_ratio(cpu, label)}"
        return text

    lines = []
    for feature, rows, peers in RIVALS:
        ran = [lib for lib in rows if lib in noop.libs]
        if not ran:
            continue
        ours = "; ".join(
            f"`{lib}` × `{BASE_OF.get(lib, plain_of(lib))}`: "
            f"{cost(lib, 'x_base' if lib in BASE_OF else 'x_leveret')}"
            + (
                f"; × `{plain_of(lib)}`: {cost(lib, 'x_leveret')}"
                if BASE_OF.get(lib, plain_of(lib)) != plain_of(lib)
                else ""
            )
            for lib in ran
        )
        cells = [feature, ours]
        for peer in ("Dramatiq", "Celery"):
            what = peers[peer]
            if isinstance(what, str):
                cells.append(what)
            else:
                row, plain = what
                label = "x_" + plain
                cells.append(
                    f"`{row}` × `{plain}`: {cost(row, label)}"
                    if row in noop.libs
                    else f"`{row}` not in this run"
                )
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return []
    return [
        "## What each feature costs, beside the rival's same feature (consume no-op)\n",
        "Each cost is a row against the same library without the feature, same round (median "
        "of the same-round ratios, min–max): below 1.00× for jobs/s, or above it for CPU per "
        "job, is what the feature costs. A Leveret lock row is against the status row (locks "
        "need its Redis) and against plain Leveret.\n",
        "| feature | Leveret | Dramatiq | Celery |",
        "|---|---|---|---|",
        *lines,
        "",
    ]


def write(
    path: Path,
    summary: Summary,
    runs: list[Run],
    workloads: list[Workload],
    meta: dict[str, Any],
) -> None:
    out: list[str] = []
    out.append("# Leveret benchmark results\n")
    out.append(
        "Written by `bench/` (`python -m bench`); do not edit by hand. Method: "
        "`bench/harness.py` docstring. Where the time goes: `bench/PROFILE.md`.\n"
    )
    out.append(
        f"- **Machine:** {meta['machine']}; RabbitMQ {meta['rabbitmq']} on the same "
        "machine, sharing its cores with the clients (the load average says what else ran)"
    )
    out.append(
        f"- **Load average (1/5/15 min):** {meta['load_start']} at start, {meta['load_end']} at end"
    )
    out.append(
        f"- **When:** {meta['started']} UTC, {meta['duration_s'] / 60:.1f} min, "
        f"{meta['rounds']} round(s), libraries interleaved (rotated order per round)"
    )
    out.append(f"- **Command:** `{meta['command']}`")
    out.append(f"- **Versions:** {meta['versions']}")
    out.append(
        "- **Payload:** JSON object of about 512 bytes, persistent messages, durable "
        "classic queues, a vhost of the run's own, unique queue names per run\n"
    )
    out.append(
        "Each cell: median over rounds (min–max). Ratios: the library's figure divided "
        "by bare aio-pika's **in the same round** (on asyncio's loop, and on uvloop), median "
        "of those ratios (min–max). Every row says which loop it ran on: `-uvloop` rows run "
        "under `uvloop.run`; FastStream and taskiq run on uvloop only (their best "
        "configuration), Dramatiq and Celery on threads.\n"
    )

    out.append("## Targets (Leveret with validation, metrics, logs and confirmed retries on)\n")
    out.append("| workload | target | measured | verdict |")
    out.append("|---|---|---|---|")
    for row in targets(summary):
        out.append("| " + " | ".join(row) + " |")
    out.append("")

    out.extend(feature_table(summary, workloads))
    out.extend(rival_table(summary, workloads))
    out.extend(ceiling_table(summary, workloads))

    failed = [r for r in runs if not r.ok]
    for wl in workloads:
        figs: list[str] = []
        for lib in wl.libs:
            for w, lb, fig in summary:
                if w == wl.name and lb == lib and fig not in figs:
                    figs.append(fig)
        out.append(f"## {wl.title}\n")
        params = ", ".join(f"{k}={v}" for k, v in wl.params.items())
        out.append(
            f"`{wl.name}`: {params}"
            + (f", {wl.processes} processes" if wl.processes > 1 else "")
            + "\n"
        )
        head = ["library", "loop"]
        for fig in figs:
            unit, _ = UNITS.get(fig, (fig, 2))
            head.append(unit)
            if fig in HIGHER_IS_BETTER or fig in ("wall_s", "p99_ms"):
                base = "aio-pika without confirms" if wl.name == "publish_batch" else "aio-pika"
                head.append(f"× {base} (asyncio)")
                head.append(f"× {base} (uvloop)")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for lib in wl.libs:
            cells = [lib, loop_of(lib)]
            for fig in figs:
                entry = summary.get((wl.name, lib, fig))
                cells.append(_cell(entry, UNITS.get(fig, ("", 2))[1]))
                if fig in HIGHER_IS_BETTER or fig in ("wall_s", "p99_ms"):
                    cells.append(_ratio(entry))
                    cells.append(_ratio(entry, "x_aiopika_uvloop"))
            ok = sum(1 for r in runs if r.workload == wl.name and r.lib == lib and r.ok)
            bad = [r for r in failed if r.workload == wl.name and r.lib == lib]
            if bad:
                cells[0] += f" ({ok} ok, {len(bad)} failed)"
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append("## Not run, and why\n")
    out.append(
        "- Dramatiq and Celery publish through blocking clients that wait for each "
        "confirm, and have no batch API: sequential only. FastStream and taskiq have no "
        "batch publish for RabbitMQ: pipelined is their best."
    )
    out.append(
        "- FastStream 0.7: a RabbitMQ subscriber handles one message at a time with no "
        "documented concurrency option, and there is no delayed retry: not in the I/O "
        "and retry workloads. Bare aio-pika has no retry either."
    )
    out.append(
        "- Two processes: Leveret (in-process on uvloop, and `leveret worker --processes 2`) "
        "beside bare aio-pika and Dramatiq (the fastest peer)."
    )
    out.append(
        "- Locks and rate limits: neither Dramatiq nor Celery has a job option measured beside "
        "them (table above)."
        + (
            ""
            if any("leveret-lock-broker" in w.libs for w in workloads)
            else " No `leveret-lock-broker`: the broker-only lock store is not in this tree."
        )
    )
    out.append(
        "- Rows that keep a status or result (`leveret-status*`, `dramatiq-results`, "
        "`celery-results`): consume no-op only, the workload issue 20's budget names.\n"
    )
    if failed:
        out.append("## Failed runs\n")
        for r in failed:
            out.append(f"- {r.workload} / {r.lib} / round {r.round + 1}: {r.error}")
        out.append("")
    out.append("## Settings per library\n")
    out.append(SETTINGS)
    notes = path.parent / "NOTES.md"
    if notes.exists():
        out.append(notes.read_text())
    path.write_text("\n".join(out).rstrip() + "\n")
