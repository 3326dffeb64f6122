"""The dashboard and the alert rules against a real Prometheus: Debian's `prometheus` scrapes a
real `leveret worker` (on the probe paths the Deployment uses), a publishing process and the
broker's rabbitmq_prometheus endpoint while jobs succeed, retry and die; then every panel query
of the dashboard must return data through Prometheus's HTTP API, and every alert rule must
evaluate without error."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml
from yarl import URL

from .conftest import ROOT, find, render, tool

HERE = Path(__file__).parent
DASHBOARD = ROOT / "grafana" / "leveret-dashboard.json"
RULES = ROOT / "alerts" / "leveret.rules.yml"
SCRAPE_S = 1
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval becomes at a 1 s scrape interval
JOBS = {"ok_job": 20, "flaky_job": 5, "doomed_job": 3}

pytestmark = pytest.mark.timeout(150)


def _wait(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Broker:
    url: URL  # amqp URL of the default vhost

    @property
    def api(self) -> str:
        return f"http://{self.url.host}:15672/api"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.url.user or "guest", self.url.password or "guest")

    def vhost_url(self, vhost: str) -> str:
        return str(self.url.with_path("/" + vhost))


@pytest.fixture(scope="module")
def broker() -> Broker:
    url = URL(os.environ.get("LEVERET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    broker = Broker(url)
    try:
        httpx.get(f"{broker.api}/overview", auth=broker.auth, timeout=5).raise_for_status()
        httpx.get(f"http://{url.host}:15692/metrics", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        message = (
            f"RabbitMQ's management API (:15672) and rabbitmq_prometheus (:15692) are needed: "
            f"{exc}; run `bash .ci/deploy-tools.sh`"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return broker


@pytest.fixture(scope="module")
def vhost(broker: Broker) -> Iterator[str]:
    """A vhost of this module's own, deleted afterwards."""
    name = f"leveret-deploy-{uuid.uuid4().hex[:8]}"
    path = quote(name, safe="")
    httpx.put(f"{broker.api}/vhosts/{path}", auth=broker.auth, timeout=10).raise_for_status()
    httpx.put(
        f"{broker.api}/permissions/{path}/{quote(broker.auth[0], safe='')}",
        json={"configure": ".*", "write": ".*", "read": ".*"},
        auth=broker.auth,
        timeout=10,
    ).raise_for_status()
    yield name
    httpx.delete(f"{broker.api}/vhosts/{path}", auth=broker.auth, timeout=30)


@pytest.fixture
def queue() -> str:
    return f"deploy_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def probes() -> dict[str, str]:
    """The probe paths of the rendered worker Deployment: what the kubelet will call."""
    deployment = find(render("base"), "Deployment", "leveret-worker")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {
        kind: container[f"{kind}Probe"]["httpGet"]["path"] for kind in ("liveness", "readiness")
    }


@pytest.fixture
def worker(
    broker: Broker, vhost: str, queue: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen, int]]:
    """`leveret worker promapp:worker` as a subprocess, the way the container runs it."""
    port = _free_port()
    env = os.environ | {
        "LEVERET_AMQP_URL": broker.vhost_url(vhost),
        "LEVERET_METRICS_PORT": str(port),
        "LEVERET_PREFETCH": "4",
        "LEVERET_SHUTDOWN_GRACE": "5",
        "DEPLOYTEST_QUEUE": queue,
    }
    env.pop("LEVERET_MANAGEMENT_URL", None)
    log = (tmp_path / "worker.log").open("w")
    leveret = tool("leveret")
    proc = subprocess.Popen(
        [leveret, "worker", "promapp:worker"], cwd=HERE, env=env, stdout=log, stderr=log
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture
def prometheus(tmp_path: Path, broker: Broker) -> Iterator[Callable[[list[int]], str]]:
    """Starts Debian's prometheus on a free loopback port, scraping the given Leveret ports
    and the broker, with the alert rules loaded. Yields a starter returning its base URL."""
    procs: list[subprocess.Popen] = []

    def start(leveret_ports: list[int]) -> str:
        port = _free_port()
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_S}s",
                "scrape_timeout": f"{SCRAPE_S}s",
                "evaluation_interval": f"{SCRAPE_S}s",
            },
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    # As the ServiceMonitor: no honor_labels; the job is in `job_name`.
                    "job_name": "leveret",
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in leveret_ports]}],
                },
                {
                    # As k8s/rabbitmq/servicemonitor.yaml.
                    "job_name": "rabbitmq",
                    "metrics_path": "/metrics/detailed",
                    "params": {"family": ["queue_coarse_metrics", "queue_consumer_count"]},
                    "static_configs": [{"targets": [f"{broker.url.host}:15692"]}],
                },
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("w")
        proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=log,
        )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        _wait(
            lambda: proc.poll() is None and httpx.get(f"{base}/-/ready", timeout=2).is_success,
            f"prometheus to be ready (log: {tmp_path / 'prometheus.log'})",
        )
        return base

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def _scalar(base: str, expr: str) -> float:
    result = _query(base, expr)
    return float(result[0]["value"][1]) if result else 0.0


def _substitute(expr: str, values: dict[str, str]) -> str:
    return re.sub(r"\$([A-Za-z_]\w*)|\$\{(\w+)\}", lambda m: values[m.group(1) or m.group(2)], expr)


async def _publish(url: str, registry: Any) -> None:
    from leveret.producers import Publisher

    async with Publisher(url, registry=registry) as pub:
        for job, count in JOBS.items():
            for n in range(count):
                await pub.publish(job, {"n": n})


def _api_requests(url: str, queue: str, registry: Any) -> None:
    """`leveret api`'s app, its request metrics in the publisher's registry (scraped): jobs
    accepted (202), an unknown job (404), a wrong token (401), a GET without a status store
    (503), so the API row's rate, 4xx/5xx ratios and latency all have data."""
    from prometheus_client import CollectorRegistry

    from leveret.consumer import Worker, WorkerSettings
    from leveret.consumer.api import ApiSettings, create_app
    from leveret.producers.stores.settings import LifecycleSettings
    from tests.api.conftest import serve, wait_connected

    worker = Worker(WorkerSettings(amqp_url=url, metrics_port=0), registry=CollectorRegistry())

    @worker.job("ok_job", queue=queue, max_attempts=2)
    async def ok_job(p: dict[str, Any]) -> None:
        pass

    app = create_app(
        worker,
        ApiSettings(api_token="deploytest-token"),
        registry=registry,
        metrics_port=0,
        lifecycle=LifecycleSettings(status_url=None),
    )
    with serve(app) as served:
        wait_connected(served)
        # Two rounds a few scrapes apart: a labelled series first appears already counted, so
        # rate() sees an increase only from the second round on.
        for _ in range(2):
            with served.client("deploytest-token") as client:
                for n in range(3):
                    assert client.post("/jobs/ok_job", json={"n": n}).status_code == 202
                assert client.post("/jobs/no_such_job", json={}).status_code == 404
                assert client.get("/jobs/some-id").status_code == 503
            with served.client("wrong") as client:
                assert client.get("/jobs/some-id").status_code == 401
            time.sleep(3 * SCRAPE_S)


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    broker: Broker,
    vhost: str,
    queue: str,
    probes: dict[str, str],
    worker: tuple[subprocess.Popen, int],
    prometheus: Callable[[list[int]], str],
) -> None:
    """Jobs succeed, retry and die under a real worker; Prometheus scrapes it, a publisher and
    RabbitMQ; every panel target then returns series with values, the variables list the
    queue and jobs, every alert rule evaluates cleanly, and SIGTERM stops the worker with 0."""
    from prometheus_client import CollectorRegistry, start_http_server

    proc, worker_port = worker
    metrics = f"http://127.0.0.1:{worker_port}"
    _wait(
        lambda: (
            proc.poll() is None
            and httpx.get(metrics + probes["readiness"], timeout=2).status_code == 200
        ),
        "the worker's readiness probe to answer 200",
    )
    assert httpx.get(metrics + probes["liveness"], timeout=2).status_code == 200

    registry = CollectorRegistry()
    publisher_port = _free_port()
    server, thread = start_http_server(publisher_port, addr="127.0.0.1", registry=registry)
    try:
        base = prometheus([worker_port, publisher_port])
        _wait(
            lambda: (
                _scalar(base, 'count(up{job="leveret"} == 1) + count(up{job="rabbitmq"} == 1)') == 3
            ),
            "prometheus to scrape the worker, the publisher and RabbitMQ",
        )
        asyncio.run(_publish(broker.vhost_url(vhost), registry))
        _api_requests(broker.vhost_url(vhost), queue, registry)
        sel = f'queue="{queue}"'
        expected = {
            "succeeded": JOBS["ok_job"] + JOBS["flaky_job"],
            "retried": JOBS["flaky_job"] + JOBS["doomed_job"],
            "dead_lettered": JOBS["doomed_job"],
        }
        for outcome, count in expected.items():
            _wait(
                lambda o=outcome, c=count: (
                    _scalar(base, f'sum(leveret_jobs_completed_total{{{sel}, outcome="{o}"}})') >= c
                ),
                f"{count} {outcome} runs to be scraped",
                timeout=45,
            )
        _wait(
            lambda: (
                _scalar(
                    base,
                    f'sum(rabbitmq_detailed_queue_messages{{queue="{queue}.dlq", '
                    f'vhost="{vhost}"}})',
                )
                >= JOBS["doomed_job"]
            ),
            "RabbitMQ's metrics to show the dead-lettered jobs in the DLQ",
            timeout=45,
        )
        _wait(
            lambda: (
                _scalar(base, 'sum(leveret_jobs_published_total{job_name="ok_job"})')
                >= JOBS["ok_job"]
            ),
            "the publisher's counter to be scraped",
        )
        # A few more scrapes so every rate window after the last job holds two samples.
        end_after = time.time() + 3 * SCRAPE_S
        _wait(lambda: time.time() >= end_after, "three more scrapes", timeout=10)

        _check_panels(base, vhost, queue)
        _check_variables(base, vhost, queue)
        _check_rules(base)
    finally:
        server.shutdown()
        thread.join(5)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, "the worker must exit 0 on SIGTERM"


def _check_panels(base: str, vhost: str, queue: str) -> None:
    board = json.loads(DASHBOARD.read_text())
    values = {
        "namespace": ".*",  # no Kubernetes here: no namespace label, and .* matches its absence
        "vhost": vhost,  # letters, digits and "-": nothing a regex or PromQL string escapes
        "queue": queue,
        "job_name": ".*",
        "__rate_interval": RATE_INTERVAL,
    }
    now = time.time()
    problems: list[str] = []
    checked = 0
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = _substitute(target["expr"], values)
            response = httpx.get(
                f"{base}/api/v1/query_range",
                params={"query": expr, "start": now - 120, "end": now, "step": f"{SCRAPE_S}s"},
                timeout=10,
            )
            body = response.json()
            checked += 1
            where = f"{panel['title']!r} {target['refId']}: {expr}"
            if body.get("status") != "success":
                problems.append(f"{where}\n  error: {body.get('error')}")
                continue
            series = body["data"]["result"]
            finite = [v for s in series for _, v in s["values"] if math.isfinite(float(v))]
            # The v2 per-queue chains still draining on an upgraded vhost: a fresh one has none.
            leftovers = "($queue)" in target["expr"] and "retry" in target["expr"]
            if (not series or not finite) and not leftovers:
                problems.append(f"{where}\n  returned {len(series)} series, no finite value")
    assert checked >= 20
    assert not problems, "dashboard queries without data:\n" + "\n".join(problems)


def _check_variables(base: str, vhost: str, queue: str) -> None:
    """The queue, job and vhost variables' label_values() list what the test ran."""
    board = json.loads(DASHBOARD.read_text())
    wanted = {"queue": {queue}, "job_name": set(JOBS), "vhost": {vhost}}
    values = {"namespace": ".*", "queue": queue}
    for variable in board["templating"]["list"]:
        if variable["name"] not in wanted:
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = _substitute(match.group(1), values), match.group(2)
        response = httpx.get(
            f"{base}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10
        )
        found = set(response.json()["data"])
        assert wanted[variable["name"]] <= found, (variable["name"], found)


def _check_rules(base: str) -> None:
    """Prometheus loaded every alert rule and evaluated it without error on real series."""
    rule_names = {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
    }

    def evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return (
            rules
            if all(
                r.get("lastEvaluation", "").startswith("2")
                and not r["lastEvaluation"].startswith("0001")
                for r in rules
            )
            else []
        )

    rules = _wait(evaluated, "every rule to be evaluated once")
    assert {r["name"] for r in rules} == rule_names
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad
