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
    """One full run holds every feature row in consume_noop, next to bare aio-pika (issue 16)."""
    from bench.harness import FEATURE_SETTINGS, FEATURES, loop_of, plan

    (noop,) = [w for w in plan(False, None) if w.name == "consume_noop"]
    assert {"aiopika", "aiopika-uvloop", "leveret", *FEATURES} <= set(noop.libs)
    for lib in FEATURES:
        assert loop_of(lib) == "asyncio" and FEATURE_SETTINGS[lib]
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
