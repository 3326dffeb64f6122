"""Regenerate the CRD schemas kept here as test data (not run by the tests).

The CRDs of KEDA and the Prometheus Operator are published as generated pydantic models on
PyPI (`cloudcoil-models-keda`, `cloudcoil-models-prometheus-operator`). Their JSON schema is the
CRD's openAPIV3Schema, less its descriptions. We make it strict the way the API server's
`fieldValidation=Strict` is (an unknown field is an error, not silently pruned), so a typo such as
`scaleTargetRefs` fails the test instead of vanishing in the cluster:

    python -m venv /tmp/crd && /tmp/crd/bin/pip install cloudcoil-models-keda \
        cloudcoil-models-prometheus-operator
    /tmp/crd/bin/python tests/deploy/schemas/regenerate.py

`rabbitmqcluster.json` is written by hand (no package carries it); see its `description`.
"""

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _tidy(node: Any) -> Any:
    if isinstance(node, list):
        return [_tidy(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _tidy(v) for k, v in node.items() if k not in ("title", "default", "description")}
    any_of = node.get("anyOf")
    if isinstance(any_of, list):
        # Optional[X] in pydantic is anyOf [X, null]; a manifest never writes null.
        rest = [s for s in any_of if s != {"type": "null"}]
        if len(rest) == 1:
            node.pop("anyOf")
            node.update(rest[0])
        else:
            node["anyOf"] = rest
    pattern = node.get("pattern")
    if isinstance(pattern, str) and pattern.startswith("^(?i)"):
        # Go's regexp takes a flag group anywhere; Python's only at the start.
        node["pattern"] = "(?i)^" + pattern[len("^(?i)") :]
    if node.get("type") == "object" and "properties" in node:
        node.setdefault("additionalProperties", False)
    return node


def _prune(schema: dict[str, Any]) -> None:
    """Drop the definitions nothing refers to any more (ObjectMeta, status types)."""
    while True:
        text = json.dumps({k: v for k, v in schema.items()})
        unused = [name for name in schema.get("$defs", {}) if f'"#/$defs/{name}"' not in text]
        if not unused:
            return
        for name in unused:
            del schema["$defs"][name]


def _schema(model: Any, api_version: str, kind: str) -> dict[str, Any]:
    schema = _tidy(model.model_json_schema(by_alias=True))
    props = schema["properties"]
    props["apiVersion"] = {"const": api_version}
    props["kind"] = {"const": kind}
    props["metadata"] = {"type": "object"}  # ObjectMeta is checked by the core tests
    props.pop("status", None)
    schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec"})
    _prune(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = f"{kind} ({api_version}) from {model.__module__}, made strict"
    return schema


def main() -> None:
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as prom

    targets = {
        "scaledobject.json": (keda.ScaledObject, "keda.sh/v1alpha1", "ScaledObject"),
        "triggerauthentication.json": (
            keda.TriggerAuthentication,
            "keda.sh/v1alpha1",
            "TriggerAuthentication",
        ),
        "servicemonitor.json": (prom.ServiceMonitor, "monitoring.coreos.com/v1", "ServiceMonitor"),
        "prometheusrule.json": (prom.PrometheusRule, "monitoring.coreos.com/v1", "PrometheusRule"),
    }
    for name, (model, api_version, kind) in targets.items():
        text = json.dumps(_schema(model, api_version, kind), indent=1, sort_keys=True)
        (HERE / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
