"""The Kubernetes manifests: every kustomization renders with real kustomize, every object is
valid against the Kubernetes or CRD schema, and the invariants the worker depends on hold."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from .conftest import K8S, KUSTOMIZATIONS, ROOT, find, render

SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmqcluster.json",
}
# The oldest Kubernetes still commonly run, and the newest the validator knows.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
OVERLAYS = ("overlays/dev", "overlays/prod")
SECRET = "leveret-amqp"


def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _validate(obj: dict[str, Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        errors = sorted(_crd_validator(*key).iter_errors(obj), key=str)
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def _settings(objects: list[dict[str, Any]]) -> dict[str, str]:
    return find(objects, "ConfigMap", _settings_name(objects))["data"]


def _settings_name(objects: list[dict[str, Any]]) -> str:
    names = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("leveret-settings")
    ]
    assert len(names) == 1, names
    return names[0]


def _worker(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment", "leveret-worker")


def _pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_of_every_kustomization_is_schema_valid(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    """Each rendered object passes strict Kubernetes validation, or its CRD's schema."""
    objects = rendered[kustomization]
    assert objects
    for obj in objects:
        _validate(obj)


def test_the_crd_schemas_reject_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A typo in a custom resource fails validation instead of being pruned silently."""
    scaled = copy.deepcopy(find(rendered["overlays/prod"], "ScaledObject"))
    scaled["spec"]["scaleTargetRefs"] = scaled["spec"].pop("scaleTargetRef")
    with pytest.raises(AssertionError, match="scaleTargetRef"):
        _validate(scaled)
    monitor = copy.deepcopy(find(rendered["overlays/prod"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["honourLabels"] = True
    with pytest.raises(AssertionError, match="honourLabels"):
        _validate(monitor)


def test_a_misspelt_core_field_fails_kubernetes_validation(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Strict validation catches an unknown field in a core object too."""
    worker = copy.deepcopy(_worker(rendered["overlays/prod"]))
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(worker)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_match_the_worker(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """Liveness is /healthz, readiness /readyz, both on the named metrics port set by settings."""
    objects = rendered[overlay]
    settings = _settings(objects)
    (container,) = _worker(objects)["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(settings["LEVERET_METRICS_PORT"]) == 9808
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    service = find(objects, "Service", "leveret-worker")
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["targetPort"]) == ("metrics", "metrics")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_exceeds_the_shutdown_grace(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """The kubelet waits longer than the worker's own grace, so in-flight jobs can finish."""
    objects = rendered[overlay]
    grace = float(_settings(objects)["LEVERET_SHUTDOWN_GRACE"])
    pod = _worker(objects)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= grace + 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_amqp_url_comes_from_the_secret_and_nowhere_else(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """LEVERET_AMQP_URL is a secretKeyRef; no URL or password is inlined in any object."""
    objects = rendered[overlay]
    for pod in _pod_specs(objects):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            ref = env["LEVERET_AMQP_URL"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (SECRET, "amqp-url")
            assert "value" not in env["LEVERET_AMQP_URL"]
            refs = [f["configMapRef"]["name"] for f in container["envFrom"]]
            assert refs == [_settings_name(objects)]
    assert not [o for o in objects if o["kind"] == "Secret"], "secrets are created, not committed"
    text = json.dumps(objects)
    assert not re.search(r"amqps?://", text), "an AMQP URL is inlined"
    assert "password" not in text.lower().replace("user:password", "")
    assert not {"LEVERET_AMQP_URL", "LEVERET_MANAGEMENT_URL"} & set(_settings(objects))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_is_one_the_worker_reads(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """Each LEVERET_* key in the ConfigMap names a worker setting (a typo would be ignored)."""
    from leveret.consumer.settings import WorkerSettings

    known = {f"LEVERET_{name.upper()}" for name in WorkerSettings.model_fields}
    # LEVERET_APP is ours: the worker's APP argument, passed as $(LEVERET_APP).
    unknown = set(_settings(rendered[overlay])) - known - {"LEVERET_APP"}
    assert not unknown


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_and_topology_job_run_the_right_commands(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """The worker runs `leveret worker APP`, the Job `leveret topology declare APP`, same image."""
    objects = rendered[overlay]
    assert "LEVERET_APP" in _settings(objects)
    (worker,) = _worker(objects)["spec"]["template"]["spec"]["containers"]
    (declare,) = find(objects, "Job", "leveret-topology")["spec"]["template"]["spec"]["containers"]
    assert worker["args"] == ["worker", "$(LEVERET_APP)"]
    assert declare["args"] == ["topology", "declare", "$(LEVERET_APP)"]
    assert "command" not in worker and "command" not in declare  # the image's ENTRYPOINT
    assert worker["image"] == declare["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Every image has a tag or digest, and never `latest`."""
    for pod in _pod_specs(rendered[overlay]):
        for container in pod["containers"]:
            image = container["image"]
            name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
            assert name and tag and "/" not in tag, f"{image} has no tag"
            assert tag != "latest", image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down_and_sized(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """Non-root, seccomp, read-only root, no capabilities, requests and limits, no API token."""
    for pod in _pod_specs(rendered[overlay]):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            sec = container["securityContext"]
            assert sec["readOnlyRootFilesystem"] is True
            assert sec["allowPrivilegeEscalation"] is False
            assert sec["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_worker_pods(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """Deployment, Service, PDB, spread constraints and NetworkPolicy all select the workers."""
    objects = rendered[overlay]
    deployment = _worker(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert {"app.kubernetes.io/name", "app.kubernetes.io/component",
            "app.kubernetes.io/part-of"} <= set(labels)  # fmt: skip
    assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)
    assert "app.kubernetes.io/name" in deployment["spec"]["selector"]["matchLabels"]
    assert _matches(find(objects, "Service", "leveret-worker")["spec"]["selector"], labels)
    pdb = find(objects, "PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert "kubernetes.io/hostname" in {c["topologyKey"] for c in spread}
    assert all(_matches(c["labelSelector"]["matchLabels"], labels) for c in spread)
    policy = find(objects, "NetworkPolicy")
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    job_labels = find(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], job_labels)
    assert not _matches(deployment["spec"]["selector"]["matchLabels"], job_labels)
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


EGRESS_LOCKDOWN = K8S / "components" / "egress-lockdown"


def _with_egress_lockdown(tmp_path: Path) -> list[dict[str, Any]]:
    """The base plus the opt-in egress component, rendered as a user's overlay would be."""
    rel = Path(os.path.relpath(K8S, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel / 'base'}\n"
        f"components:\n  - {rel / 'components' / 'egress-lockdown'}\n"
    )
    return render(str(tmp_path))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_shipped_kustomization_restricts_egress(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    """Handlers reach SMTP, HTTP APIs, databases: by default no NetworkPolicy limits egress
    (an Egress policy type with no rule for it would cut a `send_email` job off)."""
    for obj in rendered[kustomization]:
        if obj["kind"] == "NetworkPolicy":
            assert "Egress" not in obj["spec"].get("policyTypes", []), obj["metadata"]["name"]
            assert "egress" not in obj["spec"], obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_base_network_policy_opens_only_the_metrics_port(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    spec = find(rendered[overlay], "NetworkPolicy", "leveret")["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    (ingress,) = spec["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_the_egress_lockdown_component_allows_the_broker_and_dns_only(tmp_path: Path) -> None:
    """Opt-in: with the component, egress is AMQP(S) and management ports to RabbitMQ pods and
    port 53 to kube-dns, for every Leveret pod (workers and the topology Job); it renders and
    validates strictly, and keeps the base's ingress policy."""
    objects = _with_egress_lockdown(tmp_path)
    for obj in objects:
        _validate(obj)
    find(objects, "NetworkPolicy", "leveret")
    policy = find(objects, "NetworkPolicy", "leveret-egress")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Egress"]
    assert policy["metadata"]["labels"]["app.kubernetes.io/component"] == "config"
    broker, dns = spec["egress"]
    assert {p["port"] for p in broker["ports"]} == {5672, 5671, 15672, 15671}
    assert broker["to"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/component": "rabbitmq"
    }
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    selector = spec["podSelector"]["matchLabels"]
    assert _matches(selector, _worker(objects)["spec"]["template"]["metadata"]["labels"])
    assert _matches(selector, find(objects, "Job")["spec"]["template"]["metadata"]["labels"])


def test_deploy_md_shows_how_to_opt_into_the_egress_lockdown() -> None:
    """The step a user needs: the component's path in an overlay's components, and a policy of
    their own for SMTP."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "../../components/egress-lockdown" in text
    assert EGRESS_LOCKDOWN.is_dir()
    assert re.search(r"## Locking down egress\n(.|\n)*port: 587", text)


def test_dev_scales_with_a_plain_hpa(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The dev overlay needs no CRD: a HorizontalPodAutoscaler scales the worker Deployment."""
    objects = rendered["overlays/dev"]
    hpa = find(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "leveret-worker",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert not [
        o
        for o in objects
        if "." in o["apiVersion"].split("/")[0]
        and not o["apiVersion"].startswith(
            ("apps/", "batch/", "policy/", "networking.k8s.io/", "autoscaling/")
        )
    ]


def test_prod_scales_on_queue_depth_with_keda(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The ScaledObject targets the workers, counts unacked jobs too, and authenticates through
    the same Secret the workers use."""
    objects = rendered["overlays/prod"]
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    scaled = find(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == _worker(objects)["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 2  # the PDB leaves one up during a drain
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["protocol"] == "http"
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert int(trigger["metadata"]["value"]) >= int(_settings(objects)["LEVERET_PREFETCH"])
    assert "host" not in trigger["metadata"], "the broker URL comes from the TriggerAuthentication"
    assert trigger["metadata"]["vhostName"], "the vhost is named, not read from the URL's path"
    auth = find(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"], ref["key"]) == ("host", SECRET, "management-url")


def test_prod_is_scraped_and_alerted_on(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The ServiceMonitor scrapes the Service's metrics port (no honorLabels: the job is in
    `job_name`, which collides with nothing), and the PrometheusRule and dashboard ConfigMap
    ship with the overlay."""
    objects = rendered["overlays/prod"]
    service = find(objects, "Service", "leveret-worker")
    monitor = find(objects, "ServiceMonitor", "leveret-worker")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert "honorLabels" not in endpoint
    assert find(objects, "PrometheusRule", "leveret")["spec"]["groups"]
    dashboard = find(objects, "ConfigMap", "leveret-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert _settings(objects)["LEVERET_QUEUE_TYPE"] == "quorum"


def test_the_example_broker_is_a_three_node_cluster_with_queue_metrics(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Three replicas keep a quorum queue's majority through one lost node; its ServiceMonitor
    scrapes the per-queue families the dashboard and alerts query."""
    objects = rendered["rabbitmq"]
    cluster = find(objects, "RabbitmqCluster")
    assert cluster["spec"]["replicas"] == 3
    (endpoint,) = find(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "prometheus"
    assert endpoint["path"] == "/metrics/detailed"
    assert set(endpoint["params"]["family"]) == {"queue_coarse_metrics", "queue_consumer_count"}


# The broker release the test suite runs against (`rabbitmqctl version` on the CI machine), which
# docs/deploy.md names as the tested one.
TESTED_BROKER = "3.10.8"


def test_the_example_broker_pins_the_tested_release_and_has_a_disruption_budget(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The RabbitmqCluster runs the exact release the tests ran (no floating tag, no operator
    default), and a PodDisruptionBudget selecting its pods lets one of three go at a time, so a
    drain never takes a quorum queue's majority."""
    objects = rendered["rabbitmq"]
    cluster = find(objects, "RabbitmqCluster")
    image = cluster["spec"]["image"]
    name, _, tag = image.partition("@")[0].rpartition(":")
    assert name == "rabbitmq", image
    assert re.fullmatch(rf"{re.escape(TESTED_BROKER)}(-management)?", tag), image
    assert TESTED_BROKER in (ROOT / "docs" / "deploy.md").read_text()
    pdb = find(objects, "PodDisruptionBudget", "rabbitmq")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert pdb["metadata"]["namespace"] == "rabbitmq"
    # The operator labels the cluster's pods app.kubernetes.io/name=<RabbitmqCluster name>.
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": cluster["metadata"]["name"]
    }
    assert (
        cluster["spec"]["replicas"] - pdb["spec"]["maxUnavailable"]
        > cluster["spec"]["replicas"] // 2
    ), "a drain must leave a majority"


def test_prod_runs_quorum_queues_as_the_tests_did(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Prod's queue type is the one the parametrised round-trip, retry, DLQ and fault tests run
    as `quorum`, and it leaves the redelivery guard at the default those tests used."""
    settings = _settings(rendered["overlays/prod"])
    assert settings["LEVERET_QUEUE_TYPE"] == "quorum"
    assert "LEVERET_MAX_REDELIVERIES" not in settings


def test_generated_manifests_are_current() -> None:
    """The PrometheusRule and the dashboard ConfigMap match their sources (alerts/, grafana/)."""
    import importlib.util

    for script in ("alerts/build.py", "grafana/build.py"):
        spec = importlib.util.spec_from_file_location(
            Path(script).parent.name + "_build", ROOT / script
        )
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        outputs = module.render()
        if isinstance(outputs, str):
            outputs = {module.TARGET: outputs}
        for path, text in outputs.items():
            assert path.read_text() == text, f"{path} is stale: run `python {script}`"


def test_a_broken_kustomization_fails_to_render(tmp_path: Path) -> None:
    """The renderer is real: a kustomization naming a missing file is an error, not empty."""
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(AssertionError, match=r"missing\.yaml"):
        render(str(tmp_path))
