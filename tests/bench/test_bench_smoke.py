"""The benchmark harness still runs end to end: a tiny run, two libraries, every job counted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

# Bare aio-pika and Leveret need nothing beyond the runtime and test dependencies, so this runs
# in CI without the `bench` extra (the peers).


# Issue 26's rows that need neither a peer library nor Redis, one per code path (the plan's
# test holds the rest: the 4-process row runs the 2-process row's code, the uvloop twins theirs).
ISSUE_26_ROWS = ["leveret-cli", "aiopika-uvloop-2p", "leveret-ratelimit", "leveret-resource-uvloop"]


@pytest.mark.slow
def test_quick_run_writes_results_with_no_failed_run(tmp_path: Path) -> None:
    """`python -m bench --quick` for bare aio-pika and Leveret finishes and reports every target,
    issue 26's included: the real `leveret worker` CLI, the broker's ceiling, the rate-limit and
    resource rows, each target with its verdict."""
    out = tmp_path / "RESULTS.md"
    libs = ",".join(["aiopika", "aiopika-uvloop", "leveret", "leveret-uvloop", *ISSUE_26_ROWS])
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--libs", libs,
         "--only", "publish_pipelined,publish_batch,publish_noconfirm,consume_noop,retry",
         "--out", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "FAILED" not in done.stderr
    assert "## Failed runs" not in text
    for row in (
        "consume no-op, one process (uvloop)",
        "`publish_many` with confirms (uvloop)",
        "publish pipelined, confirms (uvloop)",
        "retry, 500 jobs failing once",
        # Issue 26's budgets, each with its verdict (met, or missed by how much).
        "consume no-op, `leveret-cli`: `leveret worker`, default `--loop auto` = uvloop",
        "≥ 1.3× bare aio-pika on uvloop, same run",
        "CPU per job ≤ 0.6× bare aio-pika's on uvloop, same run",
        "≥ 95% of the broker's ceiling",
        "consume no-op, `leveret-ratelimit` (asyncio; issue 26)",
        "consume no-op, `leveret-resource-uvloop` (uvloop; issue 26)",
        "## Broker ceiling (issue 26)",
        "## What each feature costs, beside the rival's same feature",
    ):
        assert row in text, row
    targets = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in targets.splitlines() if line.startswith("| ")][1:]  # no header
    assert rows
    for line in rows:
        assert line.endswith(" | **met** |") or " | missed by " in line, line
    # Every row says which loop it ran on, the new ones included.
    assert "| leveret | asyncio |" in text and "| aiopika | asyncio |" in text
    assert "| leveret-uvloop | uvloop |" in text and "| aiopika-uvloop | uvloop |" in text
    assert "| leveret-cli | uvloop (`--loop auto`) |" in text
    assert "| aiopika-uvloop-2p | uvloop | 2 |" in text  # the ceiling table's process count
    assert "| leveret-resource-uvloop | uvloop |" in text
    assert "| leveret-ratelimit | asyncio |" in text


@pytest.mark.slow
def test_cli_processes_tiny_run(tmp_path: Path) -> None:
    """`leveret worker --processes 2` (a supervisor and two workers) beside two aio-pika
    processes on one queue: every job counted once over both."""
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "consume_2proc",
         "--libs", "aiopika-uvloop,leveret-cli-2p", "--rounds", "1", "--jobs", "500",
         "--out", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "## Failed runs" not in text
    table = text.split("## Consume no-op jobs, two worker processes", 1)[1]
    assert "| aiopika-uvloop | uvloop |" in table
    assert "| leveret-cli-2p | uvloop (`--loop auto`) |" in table


def test_summary_takes_ratios_within_a_round() -> None:
    """Ratios divide by bare aio-pika's figure from the same round, then take the median."""
    from bench.harness import Run, summarise

    runs = [
        Run("consume_noop", "aiopika", 0, True, figures={"rate": 100.0}),
        Run("consume_noop", "leveret", 0, True, figures={"rate": 150.0}),
        Run("consume_noop", "aiopika", 1, True, figures={"rate": 50.0}),
        Run("consume_noop", "leveret", 1, True, figures={"rate": 70.0}),
        Run("consume_noop", "leveret", 2, False, error="lost"),
        Run("publish_noconfirm", "aiopika", 0, True, figures={"rate": 10.0}),
        Run("publish_batch", "leveret", 0, True, figures={"rate": 9.0}),
        Run("consume_noop", "aiopika-uvloop", 0, True, figures={"rate": 120.0}),
        Run("publish_noconfirm", "aiopika-uvloop", 0, True, figures={"rate": 12.0}),
    ]
    summary = summarise(runs)
    entry = summary[("consume_noop", "leveret", "rate")]
    assert entry["median"] == 110.0 and entry["n"] == 2
    assert entry["x_aiopika"] == pytest.approx((1.5 + 1.4) / 2)
    assert summary[("publish_batch", "leveret", "rate")]["x_aiopika"] == pytest.approx(0.9)
    # The uvloop reference is its own column, also same-round (round 1 has no uvloop figure).
    assert entry["x_aiopika_uvloop"] == pytest.approx(1.25)
    assert summary[("publish_batch", "leveret", "rate")]["x_aiopika_uvloop"] == pytest.approx(0.75)


def test_feature_rows_run_by_default_beside_bare_aiopika() -> None:
    """One full run holds every feature row in consume_noop, next to bare aio-pika (issue 16),
    and issue 20's rows: the lifecycle rows on uvloop too, the peers with results kept."""
    from bench.harness import (
        FEATURE_SETTINGS,
        FEATURES,
        FEATURES_UVLOOP,
        RESULT_PEERS,
        RUNNERS,
        loop_of,
        plan,
    )

    (noop,) = [w for w in plan(False, None) if w.name == "consume_noop"]
    assert {"aiopika", "aiopika-uvloop", "leveret", *FEATURES} <= set(noop.libs)
    assert {*FEATURES_UVLOOP, *RESULT_PEERS} <= set(noop.libs)
    for lib in FEATURES:
        assert loop_of(lib) == "asyncio" and FEATURE_SETTINGS[lib]
    for lib in FEATURES_UVLOOP:
        assert loop_of(lib) == "uvloop" and FEATURE_SETTINGS[lib]
    for lib in RESULT_PEERS:
        assert loop_of(lib) == "threads (no loop)" and FEATURE_SETTINGS[lib]
    # The plain row runs the defaults (events off, no store); the lifecycle rows say theirs.
    assert RUNNERS["leveret"][1] == {}
    assert RUNNERS["leveret-outcomes"][1]["events"] == "outcomes"
    status = RUNNERS["leveret-status"][1]
    assert status["events"] == "off" and status["results"] == "leveret"
    # Results rows only where the budget asks: no other workload runs them.
    others = {lib for w in plan(False, None) if w.name != "consume_noop" for lib in w.libs}
    assert not others & {"leveret-status", "leveret-status-uvloop", *RESULT_PEERS}
    # Asked for by name, a feature row runs on its own too.
    (only,) = plan(True, ["leveret-outcomes"])
    assert only.name == "consume_noop" and only.libs == ["leveret-outcomes"]


def test_feature_budgets_use_same_round_ratios() -> None:
    """Outcomes is held against bare aio-pika, the resource row against plain Leveret."""
    from bench.harness import Run, Workload, summarise
    from bench.report import feature_table, feature_targets

    runs = [
        Run("consume_noop", "aiopika", 0, True, figures={"rate": 100.0}),
        Run("consume_noop", "leveret", 0, True, figures={"rate": 120.0}),
        Run("consume_noop", "leveret-outcomes", 0, True, figures={"rate": 95.0}),
        Run("consume_noop", "leveret-resource", 0, True, figures={"rate": 114.0}),
        Run("consume_noop", "aiopika", 1, True, figures={"rate": 50.0}),
        Run("consume_noop", "leveret", 1, True, figures={"rate": 100.0}),
        Run("consume_noop", "leveret-outcomes", 1, True, figures={"rate": 55.0}),
        Run("consume_noop", "leveret-resource", 1, True, figures={"rate": 80.0}),
    ]
    summary = summarise(runs)
    rows = {row[0]: row for row in feature_targets(summary)}
    outcomes = rows["consume no-op, `LEVERET_EVENTS=outcomes` (asyncio; issue 12)"]
    assert outcomes[2].startswith("1.02×") and outcomes[3] == "**met**"  # median of .95, 1.1
    resource = rows["consume no-op, one job-scoped resource (asyncio; issue 14)"]
    assert resource[2].startswith("0.88×") and resource[3].startswith("missed by")  # .95, .8
    wl = Workload("consume_noop", "t", ["aiopika", "leveret", "leveret-outcomes"], {"prefetch": 7})
    table = "\n".join(feature_table(summary, [wl]))
    assert "| leveret-outcomes | asyncio | 7 |" in table


def test_results_rows_wire_names_each_job() -> None:
    """The harness reads each job's outcome by the id its own wire format carries; Celery's
    results row asks for its result, the plain row does not."""
    import json

    from bench.harness import ResultWatch
    from bench.wire import encode, payload

    plain = encode("celery", "q", "j", payload(0))
    kept = encode("celery-results", "q", "j", payload(0))
    assert plain.headers and plain.headers["ignore_result"] is True
    assert kept.headers and kept.headers["ignore_result"] is False and kept.id == kept.headers["id"]
    drama = encode("dramatiq-results", "q", "j", payload(0))
    assert drama.id == json.loads(drama.body)["message_id"]
    lev = encode("leveret-status-uvloop", "q", "j", payload(0))
    assert lev.exchange == "jobs" and lev.id == lev.props["message_id"]
    spec = {"results_ns": "bench-x", "queue": "q", "job": "j"}
    assert ResultWatch("redis://", "leveret", spec).key("a") == "leveret:status:a"
    assert ResultWatch("redis://", "dramatiq", spec).key("a") == "bench-x:q:j:a"
    assert ResultWatch("redis://", "celery", spec).key("a") == "celery-task-meta-a"


def test_issue_20_budget_rows() -> None:
    """Status against aio-pika on uvloop, Dramatiq + Results and Celery + backend + events;
    outcomes against aio-pika on uvloop; each same-round, for each loop the run has."""
    from bench.harness import Run, Workload, summarise
    from bench.report import feature_table, targets

    def rnd(r: int, **rates: float) -> list[Run]:
        return [
            Run("consume_noop", lib.replace("_", "-"), r, True, figures={"rate": v})
            for lib, v in rates.items()
        ]

    runs = [
        *rnd(
            0,
            aiopika_uvloop=100.0,
            leveret_status=90.0,
            leveret_status_uvloop=110.0,
            leveret_outcomes_uvloop=85.0,
            dramatiq_results=30.0,
            celery_results=20.0,
        ),
        *rnd(
            1,
            aiopika_uvloop=100.0,
            leveret_status=70.0,
            leveret_status_uvloop=100.0,
            leveret_outcomes_uvloop=75.0,
            dramatiq_results=40.0,
            celery_results=10.0,
        ),
    ]
    rows = {row[0] + " / " + row[1]: row for row in targets(summarise(runs))}
    uv = "consume no-op, `leveret-status-uvloop` (uvloop; issue 20)"
    assert rows[f"{uv} / ≥ 1.0× bare aio-pika on uvloop, same run"][2].startswith("1.05×")
    assert rows[f"{uv} / ≥ 1.0× bare aio-pika on uvloop, same run"][3] == "**met**"
    dr = rows[f"{uv} / ≥ 3.0× Dramatiq + `Results` (Redis), same run"]
    assert dr[2].startswith("3.08×") and dr[3] == "**met**"  # median of 110/30 and 100/40
    ce = rows[f"{uv} / ≥ 6.0× Celery + Redis backend + events, same run"]
    assert ce[2].startswith("7.75×") and ce[3] == "**met**"  # median of 5.5 and 10
    asy = "consume no-op, `leveret-status` (asyncio; issue 20)"
    assert rows[f"{asy} / ≥ 1.0× bare aio-pika on uvloop, same run"][3].startswith("missed by")
    out = rows[
        "consume no-op, `leveret-outcomes-uvloop` (uvloop; issue 20) / "
        "≥ 0.8× bare aio-pika on uvloop, same run"
    ]
    assert out[2].startswith("0.80×") and out[3] == "**met**"
    libs = ["aiopika-uvloop", "leveret-status", "leveret-status-uvloop", "dramatiq-results"]
    table = "\n".join(feature_table(summarise(runs), [Workload("consume_noop", "t", libs, {})]))
    assert "| leveret-status-uvloop | uvloop |" in table
    assert "| dramatiq-results | threads (no loop) |" in table


def _with_redis(*modules: str) -> bool:
    """``modules`` importable and a Redis answering on :6379 (the rows that keep outcomes)."""
    import importlib.util
    import socket

    if not all(importlib.util.find_spec(m) for m in modules):
        return False
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not _with_redis("dramatiq", "celery", "redis"), reason="needs the bench group and Redis"
)
def test_results_rows_tiny_run(tmp_path: Path) -> None:
    """Issue 20's rows end to end on 100 jobs: each run ends with every outcome readable."""
    out = tmp_path / "RESULTS.md"
    libs = "aiopika-uvloop,leveret-outcomes,leveret-status,dramatiq-results,celery-results"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "consume_noop", "--libs", libs,
         "--rounds", "1", "--jobs", "100", "--out", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FAILED" not in done.stderr
    text = out.read_text()
    assert "## Failed runs" not in text
    for lib in libs.split(","):
        assert f"| {lib} |" in text
    assert "≥ 3.0× Dramatiq + `Results` (Redis)" in text
    assert "≥ 6.0× Celery + Redis backend + events" in text
    assert "≥ 0.8× bare aio-pika on uvloop" in text


@pytest.mark.slow
@pytest.mark.skipif(not _with_redis("redis"), reason="needs redis-py and Redis on :6379")
def test_lock_rows_tiny_run(tmp_path: Path) -> None:
    """Issue 26's lock rows on 200 jobs (Redis only, no peers): every job's lock taken and its
    status readable; the budget against the status row and plain Leveret both printed."""
    out = tmp_path / "RESULTS.md"
    libs = "leveret,leveret-status,leveret-lock"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "consume_noop", "--libs", libs,
         "--rounds", "1", "--jobs", "200", "--out", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "## Failed runs" not in text
    assert "| leveret-lock | asyncio |" in text
    row = next(line for line in text.splitlines() if "`leveret-lock` (asyncio; issue 26)" in line)
    assert "≤ 20% slower than `leveret-status`" in row and "× `leveret`:" in row
    assert row.endswith(" | **met** |") or " | missed by " in row


def test_issue_26_rows_in_the_plan() -> None:
    """A full run holds issue 26's rows in consume_noop beside the plain worker (same prefetch)
    and `leveret worker --processes 2` beside two-process aio-pika; each row says its loop."""
    from bench.harness import (
        CEILING,
        CLI_ROWS,
        FEATURE_SETTINGS,
        RUNNERS,
        consumers,
        loop_of,
        plan,
    )

    work = {w.name: w for w in plan(False, None)}
    noop, two = work["consume_noop"], work["consume_2proc"]
    new = {"leveret-lock", "leveret-lock-uvloop", "leveret-ratelimit", "leveret-ratelimit-uvloop"}
    assert {"leveret", *CLI_ROWS, *CEILING, *new, "leveret-resource-uvloop"} <= set(noop.libs)
    assert {"aiopika-uvloop", "leveret-cli-2p"} <= set(two.libs)
    assert [consumers(noop, lib) for lib in CEILING] == [1, 2, 4]
    assert consumers(noop, "leveret-cli") == 1 and consumers(two, "leveret-cli-2p") == 2
    assert loop_of("leveret-cli") == "uvloop (`--loop auto`)" and loop_of("aiopika-uvloop-4p") == (
        "uvloop"
    )
    for lib in [*CLI_ROWS, *new]:
        assert FEATURE_SETTINGS[lib]
    # The lock rows are the status row plus a lock per job; the rate limit never binds.
    lock = RUNNERS["leveret-lock"][1]
    assert {k: v for k, v in lock.items() if k != "lock"} == RUNNERS["leveret-status"][1]
    assert lock["lock"] == "{i}"
    assert RUNNERS["leveret-ratelimit"][1] == {"rate_limit": "100000/s"}
    # Lock rows only where the budget asks, like the other status rows.
    others = {lib for w in work.values() if w.name != "consume_noop" for lib in w.libs}
    assert not others & new


def test_issue_26_ratios_and_verdicts() -> None:
    """Same-round ratios: the CLI row against aio-pika on uvloop, Dramatiq, aio-pika's CPU per
    job and the ceiling (best of 1, 2, 4 aio-pika processes that round); the lock row against
    the status row; every target printed with its budget and met or missed by how much."""
    from bench.harness import Run, Workload, summarise
    from bench.report import ceiling_table, feature_table, rival_table, targets

    def rnd(r: int, **rows: tuple[float, float]) -> list[Run]:
        return [
            Run(
                "consume_noop",
                lib.replace("_", "-"),
                r,
                True,
                figures={"rate": rate, "cpu_us_per_job": cpu},
            )
            for lib, (rate, cpu) in rows.items()
        ]

    runs = [
        *rnd(
            0,
            aiopika_uvloop=(100.0, 100.0),
            aiopika_uvloop_2p=(150.0, 110.0),
            aiopika_uvloop_4p=(140.0, 120.0),
            dramatiq=(80.0, 120.0),
            leveret=(130.0, 60.0),
            leveret_uvloop=(140.0, 55.0),
            leveret_cli=(145.0, 50.0),
            leveret_status=(100.0, 90.0),
            leveret_lock=(70.0, 110.0),
            leveret_ratelimit=(125.0, 62.0),
            dramatiq_results=(30.0, 300.0),
        ),
        *rnd(
            1,
            aiopika_uvloop=(100.0, 100.0),
            aiopika_uvloop_2p=(120.0, 110.0),
            dramatiq=(100.0, 120.0),
            leveret=(120.0, 60.0),
            leveret_uvloop=(120.0, 55.0),
            leveret_cli=(120.0, 70.0),
            leveret_status=(100.0, 90.0),
            leveret_lock=(90.0, 100.0),
            leveret_ratelimit=(100.0, 62.0),
            dramatiq_results=(40.0, 300.0),
        ),
        # A round without a multi-process aio-pika row has no ceiling.
        *rnd(2, aiopika_uvloop=(100.0, 100.0), leveret_cli=(300.0, 50.0)),
    ]
    summary = summarise(runs)
    cli = summary[("consume_noop", "leveret-cli", "rate")]
    assert cli["x_ceiling"] == pytest.approx((145 / 150 + 120 / 120) / 2)
    assert cli["x_ceiling_max"] == pytest.approx(1.0)
    assert cli["x_base"] == pytest.approx((145 / 140 + 1.0) / 2)  # the same worker in-process
    assert summary[("consume_noop", "leveret-lock", "rate")]["x_base"] == pytest.approx(0.8)
    assert summary[("consume_noop", "dramatiq-results", "rate")]["x_dramatiq"] == pytest.approx(
        (30 / 80 + 0.4) / 2
    )
    rows = {r[0] + " / " + r[1]: r for r in targets(summary)}
    where = "consume no-op, `leveret-cli`: `leveret worker`, default `--loop auto` = uvloop"
    where += " (issue 26)"
    fast = rows[f"{where} / ≥ 1.3× bare aio-pika on uvloop, same run"]
    assert fast[2].startswith("1.45×") and fast[3] == "**met**"  # 1.45, 1.2, 3.0
    drama = rows[f"{where} / ≥ 1.5× Dramatiq's best, same run"]
    assert drama[2].startswith("1.51× (1.20–1.81)") and drama[3] == "**met**"
    cpu = rows[f"{where} / CPU per job ≤ 0.6× bare aio-pika's on uvloop, same run"]
    assert cpu[2].endswith("µs: 0.50× (0.50–0.70)") and cpu[3] == "**met**"  # lower is better
    ceiling = next(r for k, r in rows.items() if k.startswith(where) and "ceiling" in k)
    assert ceiling[2].startswith("98.3% (96.7%–100.0%)") and ceiling[3] == "**met**"
    lock = rows[
        "consume no-op, `leveret-lock` (asyncio; issue 26) / ≤ 20% slower than `leveret-status` "
        "(same settings, no lock; ≥ 0.80×), same run"
    ]
    assert lock[2].startswith("0.80× (0.70–0.90); × `leveret`: 0.64×") and lock[3] == "**met**"
    rate = rows[
        "consume no-op, `leveret-ratelimit` (asyncio; issue 26) / ≤ 10% slower than `leveret` "
        "(no rate limit; ≥ 0.90×), same run"
    ]
    assert rate[2].startswith("0.90× (0.83–0.96)") and rate[3] == "missed by 0.3%"  # 0.897
    libs = [
        "aiopika-uvloop",
        "aiopika-uvloop-2p",
        "aiopika-uvloop-4p",
        "dramatiq",
        "leveret",
        "leveret-uvloop",
        "leveret-cli",
        "leveret-status",
        "leveret-lock",
        "dramatiq-results",
    ]
    wl = [Workload("consume_noop", "t", libs, {"prefetch": 7})]
    table = "\n".join(ceiling_table(summary, wl))
    assert "| aiopika-uvloop-4p | uvloop | 4 |" in table and "| leveret-cli | uvloop" in table
    rivals = "\n".join(rival_table(summary, wl))
    assert "`dramatiq-results` × `dramatiq`: jobs/s 0.39×" in rivals
    assert "`leveret-lock` × `leveret-status`: jobs/s 0.80×" in rivals
    assert "| leveret-cli | uvloop (`--loop auto`) | 7 |" in "\n".join(feature_table(summary, wl))


def test_cli_runner_adds_up_its_processes() -> None:
    """`leveret worker --processes N`: one report from N processes' own, a process that got no
    job leaving the times alone; the supervisor's CPU added."""
    from bench.runners.leveret_cli_runner import merge

    busy = {"handled": 10, "t_first": 5.0, "t_last": 6.0, "cpu_s": 0.5, "rss_hwm_kib": 100}
    idle = {"handled": 0, "t_first": 0.0, "t_last": 0.0, "cpu_s": 0.01, "rss_hwm_kib": 90}
    merged = merge([busy, idle], 0.02)
    assert merged["handled"] == 10 and merged["processes"] == 2
    assert (merged["t_first"], merged["t_last"]) == (5.0, 6.0)
    assert merged["cpu_s"] == pytest.approx(0.53)
    from bench.wire import encode, payload

    assert encode("aiopika-uvloop-4p", "q", "j", payload(0)).routing_key == "q"
    assert encode("leveret-cli-2p", "q", "j", payload(0)).exchange == "jobs"
