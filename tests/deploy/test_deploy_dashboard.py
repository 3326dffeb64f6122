"""The Grafana dashboard's shape: the house style, and every panel explained and with a unit.
Its queries are run against a real Prometheus in test_deploy_prometheus.py."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from .conftest import K8S, ROOT

DASHBOARD = ROOT / "grafana" / "leveret-dashboard.json"


def _board() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    return [p for p in _board()["panels"] if p["type"] != "row"]


def test_dashboard_is_shareable_and_fixed() -> None:
    """Fixed uid, tag, 15 s refresh, shared crosshair, a DS_PROMETHEUS input."""
    board = _board()
    assert board["uid"] == "leveret-jobs"
    assert "leveret" in board["tags"]
    assert board["refresh"] == "15s"
    assert board["graphTooltip"] == 1
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["id"] is None


def test_variables_chain_datasource_namespace_queue_job() -> None:
    """Datasource, then namespace → queue → job_name from label_values, each narrowing the next."""
    variables = {v["name"]: v for v in _board()["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "vhost", "queue", "job_name"]
    assert variables["datasource"]["query"] == "prometheus"
    assert "$namespace" in variables["queue"]["definition"]
    assert "$queue" in variables["job_name"]["definition"]
    for name in ("namespace", "vhost", "queue", "job_name"):
        assert variables[name]["definition"].startswith("label_values(")


def test_top_row_is_stats_then_jobs_latency_queues_rows() -> None:
    """A row of stat panels, then the rows JOBS, LATENCY, QUEUES and API in that order."""
    panels = _board()["panels"]
    first_row = next(i for i, p in enumerate(panels) if p["type"] == "row")
    assert first_row >= 5
    assert {p["type"] for p in panels[:first_row]} == {"stat"}
    titles = [p["title"] for p in panels[:first_row]]
    for title in ("In progress", "Completed/s", "Retried/s", "Dead-lettered/s", "p95 duration"):
        assert title in titles
    assert [p["title"] for p in panels if p["type"] == "row"] == [
        "JOBS",
        "LATENCY",
        "QUEUES",
        "API",
    ]


def test_every_panel_has_a_unit_a_description_and_the_datasource_variable() -> None:
    """Units, an actionable description, and `${datasource}` on the panel and each target."""
    for panel in _panels():
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert len(panel["description"]) > 60, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_the_panels_cover_what_operators_ask() -> None:
    """Outcomes, retry/failure ratios, percentiles, saturation, DLQ, queue depth, consumers,
    publish rate: each has a panel querying the right series."""
    exprs = "\n".join(t["expr"] for p in _panels() for t in p["targets"])
    for needle in (
        "sum by (outcome) (rate(leveret_jobs_completed_total",
        'outcome="retried"',
        'outcome="dead_lettered"',
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "leveret_jobs_in_progress",
        "leveret_worker_prefetch",
        "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_consumers",
        "leveret_jobs_published_total",
        "leveret_job_queue_wait_seconds_bucket",
        "sum by (route, status) (rate(leveret_api_requests_total",
        'status=~"5.."',
        "leveret_api_request_duration_seconds_bucket",
    ):
        assert needle in exprs, needle
    assert re.search(r"rabbitmq_detailed_queue_messages\{[^}]*\\\\.dlq", exprs)
    rates = re.findall(r"rate\([^\[]*\[([^\]]+)\]", exprs)
    assert rates and set(rates) == {"$__rate_interval"}


def test_panels_do_not_overlap() -> None:
    """The grid positions tile the dashboard without overlap, within 24 columns."""
    taken: set[tuple[int, int]] = set()
    for panel in _board()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not cells & taken, panel["title"]
        taken |= cells
    assert len({p["id"] for p in _board()["panels"]}) == len(_board()["panels"])


def test_the_sidecar_configmap_holds_the_same_dashboard_without_inputs() -> None:
    """The ConfigMap carries the sidecar label and the dashboard less its import-only inputs."""
    cm = yaml.safe_load((K8S / "components/monitoring/grafana-dashboard.yaml").read_text())
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    provisioned = json.loads(cm["data"]["leveret-dashboard.json"])
    board = _board()
    assert "__inputs" not in provisioned
    assert provisioned["panels"] == board["panels"]
    assert provisioned["uid"] == board["uid"]
    assert "${DS_PROMETHEUS}" not in json.dumps(provisioned)


def test_the_provisioning_file_points_at_a_dashboard_folder() -> None:
    """grafana/dashboards.yml is a valid file provider."""
    provider = yaml.safe_load((ROOT / "grafana" / "dashboards.yml").read_text())
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"]
