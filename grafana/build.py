"""Build the Leveret Grafana dashboard: grafana/leveret-dashboard.json and its ConfigMap.

The dashboard is written as code so that every panel is sure to have a unit and a description
and the queries share one set of filters. Two outputs, kept in the repository:

- grafana/leveret-dashboard.json: exported "for sharing externally" (a DS_PROMETHEUS input), to
  import in the UI or provision from files with grafana/dashboards.yml;
- k8s/components/monitoring/grafana-dashboard.yaml: the same dashboard as a ConfigMap labelled
  for Grafana's dashboard sidecar (kube-prometheus-stack), which does not resolve inputs, so the
  datasource variable starts on the default Prometheus instead.

Run `python grafana/build.py` after a change; tests/deploy checks both files are current and
runs every query against a real Prometheus.
"""

import copy
import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "leveret-dashboard.json"
CONFIGMAP = ROOT / "k8s" / "components" / "monitoring" / "grafana-dashboard.yaml"

UID = "leveret-jobs"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Filters shared by the queries. RabbitMQ's series come from the broker's namespace, so they are
# filtered by vhost and queue name, never by the workers' namespace.
LEV = 'namespace=~"$namespace", queue=~"$queue"'
LEV_JOB = LEV + ', job_name=~"$job_name"'
# The shared delay chain's queues, ``<exchange>.delay.<ttl>`` (leveret.topology.delay).
DELAY_QUEUE = ".+\\\\.delay\\\\.[0-9]+m?s"
WORK_QUEUES = (
    f'vhost=~"$vhost", queue=~"$queue", queue!~".+\\\\.(retry\\\\..+|dlq)", queue!~"{DELAY_QUEUE}"'
)
DELAY_QUEUES = f'vhost=~"$vhost", queue=~"{DELAY_QUEUE}"'
# v2 per-queue retry queues, ``Q.retry.<ttl>``: leftovers draining after the upgrade.
RETRY_QUEUES = 'vhost=~"$vhost", queue=~"($queue)\\\\.retry\\\\..+"'
DLQS = 'vhost=~"$vhost", queue=~"($queue)\\\\.dlq"'
RATE = "[$__rate_interval]"
API = 'namespace=~"$namespace"'


def _target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    return {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "refId": ref,
        "range": True,
        "instant": False,
    }


def _targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


class Layout:
    """Hands out ids and grid positions, left to right, top to bottom."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._row_h = 0

    def _place(self, w: int, h: int) -> dict[str, int]:
        if self._x + w > 24:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        pos = {"h": h, "w": w, "x": self._x, "y": self._y}
        self._x += w
        self._row_h = max(self._row_h, h)
        return pos

    def row(self, title: str) -> None:
        self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "id": len(self.panels) + 1,
                "gridPos": self._place(24, 1),
            }
        )
        self._x, self._y, self._row_h = 0, self._y + 1, 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = self._place(w, h)
        self.panels.append(panel)


def stat(
    title: str,
    description: str,
    expr: str,
    unit: str,
    *,
    red_above: float | None = None,
    decimals: int | None = None,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if red_above is not None:
        steps.append({"color": "red", "value": red_above})
    defaults: dict[str, Any] = {
        "unit": unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "color": {"mode": "thresholds"},
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [_target(expr)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
    }


def timeseries(
    title: str, description: str, targets: list[dict[str, Any]], unit: str, *, stack: bool = False
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10,
        "showPoints": "never",
        "spanNulls": False,
    }
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": custom}, "overrides": []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["mean", "max", "lastNotNull"],
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def _completed(outcome: str) -> str:
    return f'sum(rate(leveret_jobs_completed_total{{{LEV_JOB}, outcome="{outcome}"}}{RATE}))'


def _quantile(q: str, by: str) -> str:
    return (
        f"histogram_quantile({q}, sum by ({by}le) "
        f"(rate(leveret_job_duration_seconds_bucket{{{LEV_JOB}}}{RATE})))"
    )


def panels() -> list[dict[str, Any]]:
    lay = Layout()
    lay.add(
        stat(
            "In progress",
            "Jobs running right now on all selected workers. Flat at the "
            "workers' total prefetch means they are saturated: see the saturation panel.",
            f"sum(leveret_jobs_in_progress{{{LEV}}})",
            "short",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Completed/s",
            "Runs that succeeded per second. Dropping to zero while queues "
            "fill up: check the consumers panel and the workers' readiness.",
            _completed("succeeded"),
            "ops",
            decimals=2,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Retried/s",
            "Runs that raised and will run again after their backoff. A "
            "sustained rate points at a failing dependency: read the job_retried log lines.",
            _completed("retried"),
            "ops",
            decimals=2,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Dead-lettered/s",
            "Jobs that went to a DLQ (exhausted, rejected, invalid or "
            "unknown job). Anything above zero needs a look: `leveret dlq list <queue>`.",
            _completed("dead_lettered"),
            "ops",
            red_above=0.0001,
            decimals=2,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "p95 duration",
            "95th percentile of handler run time. Above your objective: "
            "compare with saturation, and with the p99 per job below.",
            _quantile("0.95", ""),
            "s",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "DLQ depth",
            "Jobs waiting in the selected queues' DLQs. Inspect with `leveret "
            "dlq list`, then replay after the fix or purge.",
            f"sum(rabbitmq_detailed_queue_messages{{{DLQS}}})",
            "short",
            red_above=1,
        ),
        4,
        4,
    )

    lay.row("JOBS")
    lay.add(
        timeseries(
            "Throughput by outcome",
            "Handler runs per second by how they ended. Retried or "
            "dead_lettered growing against succeeded: look at the failure ratio per job.",
            _targets(
                (
                    f"sum by (outcome) (rate(leveret_jobs_completed_total{{{LEV_JOB}}}{RATE}))",
                    "{{outcome}}",
                )
            ),
            "ops",
            stack=True,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Started by job",
            "Runs started per second per job. Far below the publish rate for long: "
            "the workers fall behind; scale them out or raise LEVERET_PREFETCH.",
            _targets(
                (
                    f"sum by (job_name) (rate(leveret_jobs_started_total{{{LEV_JOB}}}{RATE}))",
                    "{{job_name}}",
                )
            ),
            "ops",
        ),
        12,
        8,
    )
    by_job = f"sum by (job_name) (rate(leveret_jobs_completed_total{{{LEV_JOB}}}{RATE}))"
    lay.add(
        timeseries(
            "Retry and failure ratio",
            "Share of runs per job that were retried, and that ended in "
            "the DLQ. A high retry ratio with a low failure ratio is a flaky dependency that the "
            "backoff absorbs; a high failure ratio loses work to the DLQ.",
            _targets(
                (
                    f"sum by (job_name) (rate(leveret_jobs_completed_total{{{LEV_JOB}, "
                    f'outcome="retried"}}{RATE})) / {by_job}',
                    "{{job_name}} retried",
                ),
                (
                    f"sum by (job_name) (rate(leveret_jobs_completed_total{{{LEV_JOB}, "
                    f'outcome="dead_lettered"}}{RATE})) / {by_job}',
                    "{{job_name}} dead-lettered",
                ),
            ),
            "percentunit",
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Publish rate",
            "Jobs published per second by job, counted by the producers' Publisher "
            "(producers must be scraped too). Publishes without matching starts pile up in the "
            "queues.",
            _targets(
                (
                    'sum by (job_name) (rate(leveret_jobs_published_total{namespace=~"$namespace", '
                    f'job_name=~"$job_name"}}{RATE}))',
                    "{{job_name}}",
                )
            ),
            "ops",
        ),
        12,
        8,
    )

    lay.row("LATENCY")
    lay.add(
        timeseries(
            "Duration p50 / p95 / p99 by job",
            "Handler run time percentiles per job, from the "
            "leveret_job_duration_seconds histogram. A p99 far above p95 is a few slow runs: "
            "timeouts on a dependency, or big payloads.",
            _targets(
                (_quantile("0.5", "job_name, "), "{{job_name}} p50"),
                (_quantile("0.95", "job_name, "), "{{job_name}} p95"),
                (_quantile("0.99", "job_name, "), "{{job_name}} p99"),
            ),
            "s",
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Average duration by job",
            "Mean run time per job. Rising together for every job at "
            "once: the workers are short of CPU (check limits and throttling).",
            _targets(
                (
                    "sum by (job_name) "
                    f"(rate(leveret_job_duration_seconds_sum{{{LEV_JOB}}}{RATE})) / "
                    "sum by (job_name) "
                    f"(rate(leveret_job_duration_seconds_count{{{LEV_JOB}}}{RATE}))",
                    "{{job_name}}",
                )
            ),
            "s",
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Queue wait p50 / p95 / p99 by job",
            "Time from publish to the start of a job's first run, from the "
            "leveret_job_queue_wait_seconds histogram (the publisher's x-published-at header, in "
            "ms; else the AMQP timestamp, whole seconds). Rising while durations stay flat: "
            "too few workers for the load; add workers or raise the prefetch. A delayed publish "
            "counts its delay.",
            _targets(
                *(
                    (
                        f"histogram_quantile({q}, sum by (job_name, le) "
                        f"(rate(leveret_job_queue_wait_seconds_bucket{{{LEV_JOB}}}{RATE})))",
                        f"{{{{job_name}}}} p{label}",
                    )
                    for q, label in (("0.5", "50"), ("0.95", "95"), ("0.99", "99"))
                )
            ),
            "s",
        ),
        24,
        8,
    )

    lay.row("QUEUES")
    lay.add(
        timeseries(
            "Saturation: in progress against prefetch",
            "Jobs running against the workers' capacity (the sum of their LEVERET_PREFETCH). "
            "In progress at capacity while ready messages grow: add workers (the autoscaler's "
            "max) or raise the prefetch for I/O-bound jobs.",
            _targets(
                (f"sum by (queue) (leveret_jobs_in_progress{{{LEV}}})", "{{queue}} in progress"),
                (
                    f"sum by (queue) (leveret_worker_prefetch{{{LEV}}})",
                    "{{queue}} capacity (prefetch)",
                ),
            ),
            "short",
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Queue depth (RabbitMQ)",
            "Ready and unacknowledged messages per work queue, from "
            "RabbitMQ's own metrics. Ready growing steadily: consumers cannot keep up or are gone.",
            _targets(
                (
                    f"sum by (queue) (rabbitmq_detailed_queue_messages_ready{{{WORK_QUEUES}}})",
                    "{{queue}} ready",
                ),
                (
                    f"sum by (queue) (rabbitmq_detailed_queue_messages_unacked{{{WORK_QUEUES}}})",
                    "{{queue}} unacked",
                ),
            ),
            "short",
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Workers connected",
            "Workers connected to the broker and consuming (leveret_worker_ready, what /readyz "
            "reports). Below the pod count: some workers lost the broker; their logs say why.",
            _targets(('sum(leveret_worker_ready{namespace=~"$namespace"})', "ready workers")),
            "short",
        ),
        6,
        8,
    )
    lay.add(
        timeseries(
            "Consumers (RabbitMQ)",
            "Consumers per work queue: one per worker. Zero with ready "
            "messages fires LeveretQueueHasNoConsumers: workers down, crash-looping or not ready.",
            _targets(
                (
                    f"sum by (queue) (rabbitmq_detailed_queue_consumers{{{WORK_QUEUES}}})",
                    "{{queue}}",
                )
            ),
            "short",
        ),
        6,
        8,
    )
    lay.add(
        timeseries(
            "Waiting in the delay chain (RabbitMQ)",
            "Retries and delayed jobs waiting out their delay in the shared delay chain "
            "(<exchange>.delay.*, one chain per exchange for every work queue), and what still "
            "drains from v2 per-queue retry queues (Q.retry.*) after an upgrade. A pile that keeps "
            "growing means jobs fail faster than they age out: look at the retry ratio.",
            _targets(
                (
                    "sum by (vhost, exchange) (label_replace(rabbitmq_detailed_queue_messages"
                    f'{{{DELAY_QUEUES}}}, "exchange", "$1", "queue", "(.+)\\\\.delay\\\\..+"))',
                    "{{exchange}} delay chain ({{vhost}})",
                ),
                (
                    f"sum by (queue) (rabbitmq_detailed_queue_messages{{{RETRY_QUEUES}}})",
                    "{{queue}} (v2, draining)",
                ),
            ),
            "short",
        ),
        6,
        8,
    )
    lay.add(
        timeseries(
            "DLQ depth (RabbitMQ)",
            "Messages in each dead-letter queue (Q.dlq). It only grows: "
            "inspect with `leveret dlq list`, replay after a fix or purge.",
            _targets((f"sum by (queue) (rabbitmq_detailed_queue_messages{{{DLQS}}})", "{{queue}}")),
            "short",
        ),
        6,
        8,
    )

    # The HTTP API (k8s/components/api), scraped on its metrics port. Empty without it.
    lay.row("API")
    lay.add(
        timeseries(
            "API requests by route and status",
            "Requests per second to `leveret api`, by route template and status code "
            "(leveret_api_requests_total). 202 on POST /jobs/{job} is jobs accepted; a wave of "
            "401 is a client with a wrong token; 503 is the broker or Redis unreachable.",
            _targets(
                (
                    f"sum by (route, status) (rate(leveret_api_requests_total{{{API}}}{RATE}))",
                    "{{route}} {{status}}",
                )
            ),
            "reqps",
        ),
        8,
        8,
    )
    lay.add(
        timeseries(
            "API error ratio",
            "Share of API requests answered 5xx (the server's or the broker's fault: 503 means "
            "the broker or Redis is unreachable, see the API's logs) and 4xx (the clients': bad "
            "payloads, unknown jobs or ids, wrong tokens).",
            _targets(
                (_api_ratio('status=~"5.."'), "5xx"),
                (_api_ratio('status=~"4.."'), "4xx"),
            ),
            "percentunit",
        ),
        8,
        8,
    )
    lay.add(
        timeseries(
            "API p95 latency by route",
            "95th percentile of request time per route "
            "(leveret_api_request_duration_seconds). A POST waits for the broker's confirm: "
            "rising with the broker's load, or at LEVERET_PUBLISH_TIMEOUT during an outage.",
            _targets(
                (
                    "histogram_quantile(0.95, sum by (route, le) "
                    f"(rate(leveret_api_request_duration_seconds_bucket{{{API}}}{RATE})))",
                    "{{route}} p95",
                )
            ),
            "s",
        ),
        8,
        8,
    )
    return lay.panels


def _api_ratio(status: str) -> str:
    """Requests with ``status`` over all requests; 0, not nothing, while there are none."""
    return (
        f"(sum(rate(leveret_api_requests_total{{{API}, {status}}}{RATE})) or vector(0)) / "
        f"sum(rate(leveret_api_requests_total{{{API}}}{RATE}))"
    )


def _query_var(name: str, label: str, query: str, all_value: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": all_value,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
        "skipUrlSync": False,
    }


def dashboard() -> dict[str, Any]:
    variables = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"text": "${DS_PROMETHEUS}", "value": "${DS_PROMETHEUS}"},
            "hide": 0,
            "includeAll": False,
            "multi": False,
            "options": [],
            "refresh": 1,
            "regex": "",
            "skipUrlSync": False,
        },
        _query_var(
            "namespace", "Namespace", "label_values(leveret_jobs_in_progress, namespace)", ".*"
        ),
        _query_var("vhost", "Vhost", "label_values(rabbitmq_detailed_queue_messages, vhost)", ".*"),
        _query_var(
            "queue",
            "Queue",
            'label_values(leveret_jobs_in_progress{namespace=~"$namespace"}, queue)',
            ".*",
        ),
        _query_var(
            "job_name",
            "Job",
            'label_values(leveret_jobs_started_total{namespace=~"$namespace", '
            'queue=~"$queue"}, job_name)',
            ".*",
        ),
    ]
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "Leveret background jobs: throughput, failures, latency, saturation and "
        "RabbitMQ queues.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "liveNow": False,
        "panels": panels(),
        "refresh": "15s",
        "schemaVersion": 39,
        "tags": ["leveret", "rabbitmq"],
        "templating": {"list": variables},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "Leveret jobs",
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


def for_sidecar(board: dict[str, Any]) -> dict[str, Any]:
    """The dashboard as provisioning needs it: no inputs, the default datasource selected."""
    board = copy.deepcopy(board)
    board.pop("__inputs")
    board.pop("__requires")
    board["templating"]["list"][0]["current"] = {}
    return board


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the dashboard JSON) as a readable `|` block."""


def _block_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _block_str)


def configmap(board: dict[str, Any]) -> str:
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "leveret-grafana-dashboard",
            "labels": {
                "app.kubernetes.io/name": "leveret",
                "app.kubernetes.io/component": "monitoring",
                "app.kubernetes.io/part-of": "leveret",
                # The label Grafana's sidecar watches (kube-prometheus-stack default).
                "grafana_dashboard": "1",
            },
            "annotations": {"grafana_folder": "Leveret"},
        },
        "data": {"leveret-dashboard.json": json.dumps(for_sidecar(board), indent=2) + "\n"},
    }
    head = "# Generated by `python grafana/build.py`: edit that, not this file.\n"
    return head + yaml.dump(cm, Dumper=_BlockDumper, sort_keys=False, width=100)


def render() -> dict[Path, str]:
    board = dashboard()
    return {DASHBOARD: json.dumps(board, indent=2) + "\n", CONFIGMAP: configmap(board)}


def main() -> None:
    for path, text in render().items():
        path.write_text(text)


if __name__ == "__main__":
    main()
