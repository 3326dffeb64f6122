"""The user-facing docs and the packaging metadata against what the repository really ships: links
stay inside the repository, examples import what exists, every metric, alert, command, setting
and path the docs name exists, and the dependency floors are the ones CI installs."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

import click
import pytest
import yaml
from prometheus_client import CollectorRegistry

from .conftest import K8S, ROOT

SKIP_DIRS = {".venv", "build", "node_modules", ".git", ".pytest_cache"}
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
METRIC = re.compile(r"\b((?:leveret|rabbitmq|kube)_[a-z_]+[a-z])\b")
PACKAGES = ("topology", "producers", "consumer")
# plugin names and the test kit's pytest fixture: not metrics
NOT_SERIES = {"rabbitmq_prometheus", "rabbitmq_management", "leveret_amqp_url"}


def _markdown_files() -> list[Path]:
    return [
        p for p in ROOT.rglob("*.md")
        if not SKIP_DIRS & set(p.relative_to(ROOT).parts)
        and not any(part.endswith(".egg-info") for part in p.parts)
    ]  # fmt: skip


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks."""
    return FENCE.sub("", text)


def _series(text: str) -> set[str]:
    return set(METRIC.findall(text)) - NOT_SERIES


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", _prose(text)) if p.strip()]


def _alert_rules() -> dict[str, str]:
    rules = yaml.safe_load((ROOT / "alerts" / "leveret.rules.yml").read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def _shipped_queries() -> str:
    """Every PromQL expression shipped: the alert rules and the dashboard's panels."""
    dashboard = (ROOT / "grafana" / "leveret-dashboard.json").read_text()
    exprs = re.findall(r'"expr":\s*("(?:[^"\\]|\\.)*")', dashboard)
    return "\n".join([*_alert_rules().values(), *(json.loads(e) for e in exprs)])


def _exported_series() -> set[str]:
    """The series a worker and a publisher really export, from the metrics code itself."""
    from leveret.consumer.api.middleware import ApiMetrics
    from leveret.consumer.features.resources import Resources
    from leveret.consumer.features.schedules.leader import SchedulerMetrics
    from leveret.consumer.runtime.metrics import WorkerMetrics

    registry = CollectorRegistry()
    WorkerMetrics(registry)
    ApiMetrics.for_registry(registry)  # `leveret api`, on its metrics port
    SchedulerMetrics(registry)  # on the worker's registry when the app has schedules
    Resources(registry)  # the resource close-failure counter, on the worker's registry too
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


# Item 16: the reference lives in the repository.


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_markdown_file_links_outside_the_repository(path: Path) -> None:
    """Every relative link resolves to a file inside the repository: a clone or an install has
    no `../shared`, so such a link is dead for users."""
    text = path.read_text()
    assert "../shared" not in text and "CONTRACT.md" not in text
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(text)):
        if re.match(r"[a-z]+:|#", target):
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{target} leaves the repository"
        assert resolved.exists(), f"{target} does not exist"


def test_the_readme_links_the_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "](docs/reference.md" in readme
    reference = (ROOT / "docs" / "reference.md").read_text()
    for section in ("Wire format", "Queues", "Python API", "Command line", "Settings", "Metrics"):
        assert re.search(rf"^## {section}", reference, re.M), section


def test_code_examples_import_what_leveret_exports() -> None:
    """Examples use the installed package (`from leveret import …`), never the bare folders
    that are no longer importable, and every name they import exists."""
    for path in DOCS:
        for block in FENCE.findall(path.read_text()):
            for module, names in re.findall(r"^\s*from ([\w.]+) import ([\w, ]+)$", block, re.M):
                assert module.split(".")[0] not in PACKAGES, f"{path.name}: from {module}"
                if module.split(".")[0] != "leveret":
                    continue
                imported = importlib.import_module(module)
                for name in (n.strip() for n in names.split(",")):
                    assert hasattr(imported, name), f"{path.name}: {module} has no {name}"


# Item 19: doc drift.


# The job history's PostgreSQL tables, which the docs name beside the metrics.
HISTORY_TABLES = {"leveret_jobs", "leveret_schema_migrations"}


def test_every_metric_the_docs_name_exists() -> None:
    """A `leveret_*` series the docs name is one the code exports; a `rabbitmq_*` or `kube_*`
    series is one the shipped alerts or dashboard query (so CI runs it against Prometheus)."""
    exported = _exported_series()
    shipped = _series(_shipped_queries())
    for path in DOCS:
        for name in _series(path.read_text()) - HISTORY_TABLES:
            if name.startswith("leveret_"):
                assert name in exported, f"{path.name} names {name}, which no code exports"
            else:
                assert name in shipped, f"{path.name} names {name}, which nothing shipped reads"


def test_where_the_docs_speak_of_alerts_they_name_the_shipped_alerts_series() -> None:
    """A paragraph about alerting that names a series names one a shipped alert rule uses:
    docs must not tell an operator to alert on one series while the rule reads another."""
    alerting = _series("\n".join(_alert_rules().values()))
    for path in DOCS:
        for para in _paragraphs(path.read_text()):
            if re.search(r"\balert", para, re.I):
                named = _series(para)
                assert named <= alerting, f"{path.name}: {named - alerting} in {para[:80]!r}"


def test_every_alert_the_docs_name_is_shipped() -> None:
    import leveret

    rules = _alert_rules()
    for path in DOCS:
        for name in re.findall(r"`(Leveret[A-Z]\w+)`", path.read_text()):
            if hasattr(leveret, name):  # LeveretError, a class
                continue
            assert name in rules, f"{path.name} names alert {name}, not in alerts/"


def test_the_operations_guide_names_the_shipped_dlq_alert_and_its_series() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text()
    (series,) = _series(_alert_rules()["LeveretDeadLetterQueueGrowing"])
    para = next(p for p in _paragraphs(ops) if "An alert fires" in p)
    assert "LeveretDeadLetterQueueGrowing" in para and series in para


def _yaml_comments() -> list[tuple[Path, str]]:
    return [
        (path, line.split("#", 1)[1])
        for path in sorted(K8S.rglob("*.yaml"))
        for line in path.read_text().splitlines()
        if "#" in line
    ]


def test_manifest_comments_cite_only_what_exists() -> None:
    """A path a manifest's comment cites exists, and so does a variant it says the docs show."""
    deploy = (ROOT / "docs" / "deploy.md").read_text().lower()
    for path, comment in _yaml_comments():
        for cited in re.findall(r"\b((?:docs|k8s|alerts|grafana)/[\w./-]*\w)", comment):
            assert (ROOT / cited).exists(), f"{path}: cites {cited}"
        for variant in re.findall(r"(?i)(prometheus[- ]adapter|custom metrics api)", comment):
            assert variant.lower() in deploy, f"{path}: cites {variant}, which deploy.md lacks"


def test_paths_the_docs_name_exist() -> None:
    for path in DOCS:
        prose = _prose(path.read_text())
        for cited in re.findall(r"`((?:docs|k8s|alerts|grafana|scripts|tests)/[\w./-]*\w)`", prose):
            assert (ROOT / cited).exists(), f"{path.name}: {cited}"


def _commands() -> set[str]:
    from leveret.consumer.cli import cli

    found: set[str] = set()

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
        else:
            found.add(" ".join(path))

    walk(cli, [])
    return found


def _documented_commands(text: str) -> set[str]:
    """`leveret dlq list|replay|purge Q` → {"dlq list", "dlq replay", "dlq purge"}."""
    found: set[str] = set()
    for span in re.findall(r"`leveret ([a-z][^`]*)`", text):
        words = span.split()
        first = words[0]
        second = words[1] if len(words) > 1 else ""
        if re.fullmatch(r"[a-z]+(\|[a-z]+)*", second):
            found.update(f"{first} {s}" for s in second.split("|"))
        found.add(first)
    return found


def test_the_readme_cli_summary_names_every_command() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    missing = _commands() - _documented_commands(section)
    assert not missing, f"README's command line summary omits {sorted(missing)}"


def test_the_reference_documents_every_command() -> None:
    reference = (ROOT / "docs" / "reference.md").read_text()
    section = reference.split("## Command line", 1)[1].split("\n## ", 1)[0]
    missing = _commands() - _documented_commands(section)
    assert not missing, f"docs/reference.md omits {sorted(missing)}"


# Settings, metrics, commands and public names against docs/reference.md, both ways:
# tests/package/test_reference.py.


def test_the_reference_names_the_job_label_job_name() -> None:
    """The contract's label is `job_name` (Prometheus reserves `job`)."""
    reference = (ROOT / "docs" / "reference.md").read_text()
    section = reference.split("## Metrics", 1)[1]
    rows = [r for r in section.splitlines() if r.startswith("| `leveret_")]
    assert rows and not any("`job`" in r for r in rows)
    for name in ("started_total", "completed_total", "published_total"):
        (row,) = [r for r in rows if r.startswith(f"| `leveret_jobs_{name}`")]
        assert "`job_name`" in row


# Issue 22: the docs as a site.


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    if isinstance(node, list):
        return [p for v in node for p in _nav_pages(v)]
    return []


def test_the_docs_site_lists_every_page_and_ci_builds_it_strictly() -> None:
    """mkdocs.yml's nav has every page of docs/ (a page left out is unreachable on the site),
    link and anchor checks are warnings, and scripts/test.sh builds with --strict (never -q,
    which hides the warnings from --strict's count)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert sorted(_nav_pages(config["nav"])) == sorted(pages)
    links = config["validation"]["links"]
    assert links["not_found"] == "warn" and links["anchors"] == "warn"
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    (build,) = [line for line in test_sh.splitlines() if "bin/mkdocs build" in line]
    assert "--strict" in build and " -q" not in build
    assert re.search(r"^ensure_venv .*\bdocs\b", test_sh, re.M)


# Item 12: dependency floors.


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floors_file() -> dict[str, str]:
    pins = {}
    for raw in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_the_floors_file_pins_every_runtime_dependency_at_its_floor() -> None:
    """.ci/floors.txt is exactly pyproject's `>=` floors, the extras' included: a raised floor
    that is not tested, or a new dependency without a floor, fails here."""
    project = _pyproject()["project"]
    extras = [r for reqs in project["optional-dependencies"].values() for r in reqs]
    floors = {}
    for requirement in [*project["dependencies"], *extras]:
        match = re.fullmatch(
            r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)(?:,<[0-9][0-9.]*)?(?:; .*)?", requirement
        )
        assert match, f"{requirement}: give every runtime dependency a plain `>=` floor"
        floors[match[1].lower()] = match[2]
    assert _floors_file() == floors


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """What the code imports when it loads is a declared dependency (aiormq and yarl were
    imported but undeclared, so their floors were whatever aio-pika happened to pull in)."""
    declared = {
        re.split(r"[<>=\[ ;]", r)[0].lower().replace("_", "-")
        for r in _pyproject()["project"]["dependencies"]
    }
    declared.add("pydantic-core")  # pydantic pins its own core exactly: its floor is pydantic's
    # consumer/api and the console it serves are the `api` extra's feature (only `leveret api`
    # imports them); consumer/history is the `history` extra's (`leveret history`, the API's
    # listing, which import it lazily).
    extras = _pyproject()["project"]["optional-dependencies"]
    api = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in extras["api"]}
    history = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in extras.get("history", [])}
    feature = {"consumer/api/": api, "consumer/console/": api, "consumer/history/": history}
    distributions = importlib.metadata.packages_distributions()
    for package in PACKAGES:
        for source in (ROOT / package).rglob("*.py"):
            text = source.read_text()
            # Module-level imports only: a lazy import inside a function is an optional feature.
            for module in re.findall(r"^(?:from|import) ([a-zA-Z_]\w*)", text, re.M):
                if module in sys.stdlib_module_names or module in ("leveret", "__future__"):
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
                path = source.as_posix()
                allowed = declared.union(*(v for k, v in feature.items() if k in path))
                assert dists & allowed, f"{source.relative_to(ROOT)} imports {module} ({dists})"


def test_ci_runs_the_suite_on_the_floors() -> None:
    """.ci/run → scripts/test.sh → scripts/floors.sh, which installs .ci/floors.txt and runs
    test paths that exist."""
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert re.search(r"^bash \"\$ROOT/scripts/floors.sh\"", test_sh, re.M)
    floors_sh = (ROOT / "scripts" / "floors.sh").read_text()
    assert '-c "$FLOORS" -r "$FLOORS"' in floors_sh
    subset = re.search(r"SUBSET=\(([^)]*)\)", floors_sh)
    assert subset
    paths = subset[1].split()
    assert "tests/consumer" in paths
    for path in paths:
        assert (ROOT / path).exists(), path
