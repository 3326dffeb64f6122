"""The installed shape of Leveret: one top-level name, a sorted public API, ``python -m``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import leveret

ROOT = Path(__file__).resolve().parents[2]


def test_all_is_sorted_and_importable() -> None:
    assert leveret.__all__ == sorted(leveret.__all__)
    for name in leveret.__all__:
        assert getattr(leveret, name) is not None
    for needed in ("Worker", "JobContext", "Reject", "Publisher", "BlockingPublisher",
                   "LeveretError", "PublishError", "UnroutableError", "RefusedError",
                   "PublishTimeout", "BrokerUnavailable", "ConfigError"):
        assert needed in leveret.__all__


def test_python_dash_m_leveret_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "leveret", "--help"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "worker" in result.stdout


def test_wheel_installs_only_the_leveret_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = tmp_path.glob("leveret-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"leveret"}
    for module in ("leveret/py.typed", "leveret/consumer/worker.py",
                   "leveret/producers/publisher.py", "leveret/topology/model.py"):
        assert module in names
    metadata = next(
        zipfile.ZipFile(wheel).read(n).decode()
        for n in names
        if n.endswith(".dist-info/METADATA")
    )
    # Dev tools and bench peers are dependency groups, never published extras.
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines()
              if line.startswith("Provides-Extra:")}
    assert extras == {"api", "history", "otel", "status"}, extras
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Classifier: Typing :: Typed" in metadata


def test_the_operator_tools_are_not_loaded_by_the_runtime() -> None:
    """A worker or publisher process never imports consumer.ops (nor its HTTP client)."""
    code = (
        "import sys, leveret, leveret.consumer.worker; "
        "print(sorted(m for m in sys.modules if m.startswith('leveret.consumer.ops') "
        "or m.split('.')[0] in ('httpx', 'click')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout
