"""The layering: topology ← producers ← consumer, and the worker reaches the publisher side only
through its public packages (``leveret.producers`` and its shared ``wire``, ``stores``,
``broker``), each with an ``__all__`` whose every name loads."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = (
    "leveret.producers",
    "leveret.producers.wire",
    "leveret.producers.stores",
    "leveret.producers.broker",
)


def _imports(package: str) -> list[tuple[str, int, str]]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((str(path.relative_to(ROOT)), node.lineno, node.module))
            elif isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), node.lineno, a.name) for a in node.names]
    return found


def test_the_worker_imports_the_publisher_side_only_through_public_packages() -> None:
    deeper = [
        f"{where}:{line}: {module}"
        for where, line, module in _imports("consumer")
        if module.startswith("leveret.producers") and module not in PUBLIC
    ]
    assert not deeper, "\n".join(deeper)


@pytest.mark.parametrize("package", ["topology", "producers"])
def test_imports_point_one_way(package: str) -> None:
    """topology imports neither producers nor consumer; producers never imports consumer."""
    banned = ("leveret.producers", "leveret.consumer") if package == "topology" else ()
    banned += ("leveret.consumer",)
    wrong = [
        f"{where}:{line}: {module}"
        for where, line, module in _imports(package)
        if module.startswith(banned)
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", PUBLIC[1:])
def test_each_shared_package_exports_a_loadable_all(name: str) -> None:
    """Every exported name loads (its order is ruff's RUF022, checked by the lint)."""
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported))
    for attribute in exported:
        assert getattr(module, attribute) is not None, attribute
