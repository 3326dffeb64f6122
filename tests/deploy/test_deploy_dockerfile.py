"""The Dockerfile: hadolint finds nothing, the image follows the house rules, and its install
steps, replayed in a fresh directory tree and virtualenv (no Docker engine here), produce a
working `leveret`."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"
HERE = Path(__file__).parent


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


def _stages() -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
            stages.append(Stage(base.strip(), name.strip() or None))
        else:
            stages[-1].steps.append((keyword, rest))
    return args, stages


def _dockerignore_allows(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if pattern.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        if hit:
            allowed = negate
    return allowed


def test_hadolint_finds_nothing() -> None:
    """hadolint reports no finding at any level on the Dockerfile."""
    run([tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)])


def test_hadolint_is_real(tmp_path: Path) -> None:
    """The linter does catch an unpinned base and a shell-form entrypoint."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nENTRYPOINT leveret worker\n")
    with pytest.raises(AssertionError, match="DL3007"):
        run([tool("hadolint"), str(bad)])


def test_image_is_multi_stage_pinned_slim_and_non_root() -> None:
    """Two stages on the same pinned slim base; the final one runs as a numeric non-root user
    with an exec-form `leveret` entrypoint and installs no compiler."""
    _, stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim(-\w+)?", final.base), final.base
    assert stages[0].base == final.base
    steps = dict(final.steps)
    user = steps["USER"].split(":")[0]
    assert user.isdigit() and int(user) > 0
    assert json.loads(steps["ENTRYPOINT"]) == ["leveret"]
    assert "9808" in steps["EXPOSE"].split()
    final_runs = " ".join(rest for keyword, rest in final.steps if keyword == "RUN")
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang|make)\b", final_runs)
    assert any(k == "COPY" and rest.startswith("--from=") for k, rest in final.steps)


def test_no_secret_is_baked_into_the_image() -> None:
    """No ARG or ENV sets a URL, password or token."""
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword in ("ARG", "ENV"):
            assert not re.search(r"AMQP_URL|MANAGEMENT_URL|PASSWORD|SECRET|TOKEN|://", rest), rest


def test_dockerignore_keeps_the_context_to_what_is_installed() -> None:
    """Sources and metadata go in; history, virtualenvs, tests and .env files stay out."""
    kept = ["pyproject.toml", "README.md", "consumer/worker.py", "topology/model.py"]
    left_out = [".git/config", ".venv/bin/python", "tests/deploy/conftest.py", "k8s/base", ".env"]
    left_out += ["consumer/__pycache__/worker.cpython-311.pyc", "consumer/.env"]
    for path in kept:
        assert _dockerignore_allows(path), path
    for path in left_out:
        assert not _dockerignore_allows(path), path


@pytest.mark.timeout(240)
def test_the_install_steps_build_a_working_leveret(tmp_path: Path) -> None:
    """Replays the build stage's COPY and RUN steps in a scratch root with a fresh virtualenv,
    then runs the final stage's entrypoint and `leveret topology export` of a test app from
    another directory: a broken step, a missing file in the context or a package left out of
    the wheel fails here."""
    _, stages = _stages()
    build = stages[0]
    root = tmp_path / "root"
    root.mkdir()

    def rooted(text: str) -> str:
        # Absolute paths in the image (/opt, /src, /app) live under the scratch root.
        return re.sub(r"(?<![\w./-])/(opt|src|app)\b", lambda m: f"{root}/{m.group(1)}", text)

    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)
    env = {"PATH": f"{shim}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONFIG_FILE", "PIP_FIND_LINKS"):
        if var in os.environ:
            env[var] = os.environ[var]
    workdir = root
    for keyword, rest in build.steps:
        if keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = rooted(value).replace("$PATH", env["PATH"])
        elif keyword == "WORKDIR":
            workdir = Path(rooted(rest))
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = rest.split()
            for source in sources:
                _copy_context(source.rstrip("/"), workdir / dest)
        elif keyword == "RUN":
            run(["sh", "-ec", rooted(rest)], cwd=workdir, env=env, timeout=200)
    venv_bin = root / "opt" / "leveret" / "bin"
    final_steps = stages[-1].steps
    entrypoint = json.loads(dict(final_steps)["ENTRYPOINT"])
    cmd = json.loads(dict(final_steps)["CMD"])
    app_dir = tmp_path / "app"  # the image's WORKDIR, holding a user's module
    app_dir.mkdir()
    shutil.copy(HERE / "promapp.py", app_dir / "promapp.py")
    clean = {"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    run([str(venv_bin / entrypoint[0]), *cmd], cwd=app_dir, env=clean)
    export = run([str(venv_bin / "leveret"), "topology", "export", "promapp:worker"],
                 cwd=app_dir, env=clean | {"DEPLOYTEST_QUEUE": "imagecheck"})  # fmt: skip
    definitions = json.loads(export.stdout)
    names = {q["name"] for q in definitions["queues"]}
    assert {"imagecheck", "imagecheck.dlq"} <= names
    # A regular install: nothing points back at the source tree.
    assert not list((root / "opt").rglob("__editable__*"))


def _copy_context(source: str, dest: Path) -> None:
    """COPY from the build context, honouring .dockerignore."""
    src = ROOT / source
    assert src.exists(), f"COPY {source}: not in the build context"
    assert _dockerignore_allows(source), f"COPY {source}: excluded by .dockerignore"
    if src.is_file():
        target = dest / src.name if dest.is_dir() else dest
        shutil.copy(src, target)
        return
    for path in src.rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_symlink():
            # Docker copies a symlink as a link (leveret/consumer -> ../consumer).
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(path))
        elif path.is_file() and _dockerignore_allows(relative) and not _under_symlink(path, src):
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


def _under_symlink(path: Path, top: Path) -> bool:
    """True for a file reached through a symlinked folder (copied as the link itself)."""
    return any((top / p).is_symlink() for p in path.relative_to(top).parents if p != Path("."))
