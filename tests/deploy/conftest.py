"""Shared helpers for the deployment tests: the repository's paths, the real tools they run,
and the rendered kustomize overlays."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# Every kustomization a user applies: the two overlays, the base alone, and the broker example.
KUSTOMIZATIONS = ("overlays/dev", "overlays/prod", "base", "rabbitmq")


def tool(name: str) -> str:
    """The path of a real tool the tests need. Outside CI a missing tool skips the test; in CI
    (where `.ci/deploy-tools.sh` installs them) it fails it, so nothing passes by not running."""
    candidates = [Path(sys.executable).parent / name, shutil.which(name)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    message = f"{name} is not installed: run `bash .ci/deploy-tools.sh`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(args: list[str], *, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a tool; on failure show its output in the assertion."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False,
                          **kwargs)  # fmt: skip
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


def render(kustomization: str) -> list[dict[str, Any]]:
    proc = run([tool("kubectl"), "kustomize", str(K8S / kustomization)])
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """kustomization → its rendered objects, rendered once per session."""
    return {name: render(name) for name in KUSTOMIZATIONS}


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]
