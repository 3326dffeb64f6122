"""The benchmark harness still runs end to end: a tiny run, two libraries, every job counted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

# Bare aio-pika and Leveret need nothing beyond the runtime and test dependencies, so this runs
# in CI without the `bench` extra (the peers).


@pytest.mark.slow
def test_quick_run_writes_results_with_no_failed_run(tmp_path: Path) -> None:
    """`python -m bench --quick` for bare aio-pika and Leveret finishes and reports every target."""
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--libs",
         "aiopika,aiopika-uvloop,leveret,leveret-uvloop",
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
    ):
        assert row in text
    # Every row says which loop it ran on.
    assert "| leveret | asyncio |" in text and "| aiopika | asyncio |" in text
    assert "| leveret-uvloop | uvloop |" in text and "| aiopika-uvloop | uvloop |" in text


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


def _peers_and_redis() -> bool:
    import importlib.util
    import socket

    if not all(importlib.util.find_spec(m) for m in ("dramatiq", "celery", "redis")):
        return False
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _peers_and_redis(), reason="needs the bench group and Redis on :6379")
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
