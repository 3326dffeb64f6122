"""The API component (k8s/components/api): it renders with real kustomize on top of the base and
of each overlay, every object validates strictly, and the invariants the API depends on hold
(probes on /healthz, the token from a Secret, the worker's lockdown, its own ingress)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from .conftest import K8S, find, render
from .test_deploy_k8s import _matches, _validate

API = K8S / "components" / "api"


def _with_api(tmp_path: Path, kustomization: str, images: bool = False) -> list[dict[str, Any]]:
    """``kustomization`` plus the API component, rendered as a user's overlay would be."""
    rel = Path(os.path.relpath(K8S, tmp_path))
    text = (
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel / kustomization}\n"
        f"components:\n  - {rel / 'components' / 'api'}\n"
    )
    if images:
        text += "images:\n  - name: leveret\n    newName: registry.example.com/leveret\n"
    (tmp_path / "kustomization.yaml").write_text(text)
    return render(str(tmp_path))


def _api(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment", "leveret-api")


@pytest.mark.parametrize("kustomization", ["base", "overlays/dev", "overlays/prod"])
def test_the_api_component_renders_and_validates(tmp_path: Path, kustomization: str) -> None:
    objects = _with_api(tmp_path, kustomization)
    for obj in objects:
        _validate(obj)
    find(objects, "Service", "leveret-api")
    find(objects, "NetworkPolicy", "leveret-api")
    # The workers are untouched by it.
    find(objects, "Deployment", "leveret-worker")


def test_probes_command_and_ports(tmp_path: Path) -> None:
    objects = _with_api(tmp_path, "base")
    (container,) = _api(objects)["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["api", "$(LEVERET_APP)"]
    assert container["args"][2:] == ["--host", "0.0.0.0", "--port", "8000"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "metrics": 9808}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    assert container["image"] == "leveret:0.1.0", "pinned even without an overlay's images"


def test_an_overlays_image_still_applies(tmp_path: Path) -> None:
    (container,) = _api(_with_api(tmp_path, "base", images=True))["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["image"] == "registry.example.com/leveret:0.1.0"


def test_the_token_and_the_broker_url_come_from_secrets(tmp_path: Path) -> None:
    objects = _with_api(tmp_path, "base")
    (container,) = _api(objects)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    token = env["LEVERET_API_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (token["name"], token["key"]) == ("leveret-api", "token")
    assert not token.get("optional"), "without a token the API must not start"
    amqp = env["LEVERET_AMQP_URL"]["valueFrom"]["secretKeyRef"]
    assert (amqp["name"], amqp["key"]) == ("leveret-amqp", "amqp-url")
    assert env["LEVERET_STATUS_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert all("value" not in e for e in env.values()), "no secret as a literal"
    # The settings ConfigMap is the same generated (hashed) one the workers use.
    (ref,) = container["envFrom"]
    worker = find(objects, "Deployment", "leveret-worker")
    (worker_container,) = worker["spec"]["template"]["spec"]["containers"]
    assert ref == worker_container["envFrom"][0]
    assert ref["configMapRef"]["name"].startswith("leveret-settings-")


def test_the_pod_is_locked_down_like_the_worker(tmp_path: Path) -> None:
    objects = _with_api(tmp_path, "base")
    api_pod = _api(objects)["spec"]["template"]["spec"]
    worker_pod = find(objects, "Deployment", "leveret-worker")["spec"]["template"]["spec"]
    assert api_pod["securityContext"] == worker_pod["securityContext"]
    assert api_pod["automountServiceAccountToken"] is False
    assert api_pod["serviceAccountName"] == worker_pod["serviceAccountName"]
    (api_c,) = api_pod["containers"]
    (worker_c,) = worker_pod["containers"]
    assert api_c["securityContext"] == worker_c["securityContext"]
    assert api_c["volumeMounts"] == worker_c["volumeMounts"]
    for kind in ("requests", "limits"):
        assert set(api_c["resources"][kind]) == {"cpu", "memory"}


def test_selectors_keep_api_and_worker_pods_apart(tmp_path: Path) -> None:
    objects = _with_api(tmp_path, "overlays/prod")
    api_labels = _api(objects)["spec"]["template"]["metadata"]["labels"]
    worker_labels = find(objects, "Deployment", "leveret-worker")["spec"]["template"]["metadata"][
        "labels"
    ]
    api_service = find(objects, "Service", "leveret-api")
    assert _matches(api_service["spec"]["selector"], api_labels)
    assert not _matches(api_service["spec"]["selector"], worker_labels)
    assert {p["targetPort"] for p in api_service["spec"]["ports"]} == {"http", "metrics"}
    worker_service = find(objects, "Service", "leveret-worker")
    assert not _matches(worker_service["spec"]["selector"], api_labels)
    # The workers' PDB and autoscaler do not count the API pods.
    assert not _matches(find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                        api_labels)  # fmt: skip
    assert find(objects, "ScaledObject")["spec"]["scaleTargetRef"]["name"] == "leveret-worker"
    # Ingress: the base opens metrics on every Leveret pod, the component adds http on the API's.
    policy = find(objects, "NetworkPolicy", "leveret-api")["spec"]
    assert _matches(policy["podSelector"]["matchLabels"], api_labels)
    assert not _matches(policy["podSelector"]["matchLabels"], worker_labels)
    assert policy["policyTypes"] == ["Ingress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert "egress" not in policy


def test_the_component_says_how_to_create_the_token() -> None:
    text = (API / "kustomization.yaml").read_text()
    assert "kubectl create secret generic leveret-api --from-literal=token=" in text
