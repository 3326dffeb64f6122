"""Alert rules: promtool accepts them, each alert has a unit test that passes, and the
PrometheusRule carries exactly the same rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from .conftest import K8S, ROOT, run, tool

ALERTS = ROOT / "alerts"
RULES = ALERTS / "leveret.rules.yml"
UNIT_TESTS = ALERTS / "leveret.rules.test.yml"
EXPECTED = {
    "LeveretDeadLetterQueueGrowing",
    "LeveretQueueHasNoConsumers",
    "LeveretJobFailureRatioHigh",
    "LeveretJobLatencyOverObjective",
    "LeveretWorkersNotReady",
}


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` finds every rule well-formed."""
    out = run([tool("promtool"), "check", "rules", str(RULES)]).stdout
    assert f"SUCCESS: {len(_rules())} rules found" in out


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules` passes the unit tests of every alert."""
    run([tool("promtool"), "test", "rules", str(UNIT_TESTS)], cwd=ALERTS)


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a rule with a wrong threshold fails them."""
    broken = RULES.read_text().replace(") > 0.2", ") > 0.9")
    assert broken != RULES.read_text()
    (tmp_path / "leveret.rules.yml").write_text(broken)
    (tmp_path / "t.yml").write_text(UNIT_TESTS.read_text())
    proc = subprocess.run(
        [tool("promtool"), "test", "rules", "t.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "LeveretJobFailureRatioHigh" in proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test_that_expects_it_to_fire() -> None:
    """Each alert is covered: one test case expects it firing, and one expects it quiet."""
    assert {r["alert"] for r in _rules()} == EXPECTED
    firing, quiet = set(), set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == EXPECTED
    assert quiet == EXPECTED


def test_every_alert_says_what_and_what_to_do() -> None:
    """Each alert has a severity, a `for`, a summary and a description."""
    for rule in _rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["for"]
        assert rule["annotations"]["summary"]
        assert len(rule["annotations"]["description"]) > 40


def test_the_prometheus_rule_carries_the_same_rules() -> None:
    """k8s/components/monitoring/prometheusrule.yaml has the rules file's groups, unchanged."""
    rule = yaml.safe_load((K8S / "components/monitoring/prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
