"""docs/reference.md against the code, both ways.

Every setting (the pydantic settings classes' fields, as ``LEVERET_<FIELD>``), every metric (built
on a fresh registry from the metric definitions), every CLI command (walked from the click group)
and every public name (``leveret.__all__``, ``leveret.testing.__all__``) appears in the
reference; and every ``LEVERET_*`` variable, ``leveret_*`` metric and ``leveret <command>`` the
reference names exists in the code. A setting, metric or command added without its doc line
fails here; so does a doc line left behind for one that was removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference.md"
SOURCES = ("consumer", "producers", "topology", "leveret")

SETTING = re.compile(r"\bLEVERET_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
METRIC = re.compile(r"\bleveret_[a-z][a-z0-9_]*[a-z0-9]\b")
# `leveret dlq list Q`, `leveret topology export|schema APP`: the command words of a code span.
COMMAND = re.compile(r"`leveret ([a-z][^`]*)`")
# Names that look like metrics but are not: the test kit's pytest fixture.
NOT_METRICS = {"leveret_amqp_url"}
# Read straight from the environment by the supervisor for its own children: not a user setting.
INTERNAL_SETTINGS = {"LEVERET_SUPERVISED"}


def _reference() -> str:
    return REFERENCE.read_text()


def _section(text: str, title: str) -> str:
    """The body of the `## <title>…` section."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/reference.md has no '## {title}' section"
    return match[1]


# --- what the code has -----------------------------------------------------------------------


def code_settings() -> set[str]:
    """``LEVERET_*`` names of every field of the settings classes."""
    from leveret.consumer.api.settings import ApiSettings
    from leveret.consumer.settings import WorkerSettings
    from leveret.producers.settings import ConnectionSettings
    from leveret.producers.stores.settings import LifecycleSettings

    names: set[str] = set()
    for cls in (WorkerSettings, ConnectionSettings, LifecycleSettings, ApiSettings):
        prefix = cls.model_config.get("env_prefix", "")
        assert prefix == "LEVERET_", f"{cls.__name__} reads {prefix}*"
        names.update(f"{prefix}{field}".upper() for field in cls.model_fields)
    return names


def _metric_names(registry: CollectorRegistry) -> set[str]:
    """Documented names: a counter with `_total`, the others by their family name."""
    return {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in registry.collect()
    }


def code_metrics() -> set[str]:
    """Every series the worker, the publisher, the scheduler, the resources and the HTTP API
    define, built on a fresh registry."""
    from leveret.consumer.api.middleware import ApiMetrics
    from leveret.consumer.features.resources import Resources
    from leveret.consumer.features.schedules.leader import SchedulerMetrics
    from leveret.consumer.runtime.metrics import WorkerMetrics
    from leveret.producers.metrics import published_counter

    registry = CollectorRegistry()
    WorkerMetrics(registry)
    published_counter(registry)
    SchedulerMetrics(registry)
    Resources(registry)
    ApiMetrics(registry)
    return _metric_names(registry)


def source_metric_literals() -> set[str]:
    """The metric names written in the source as the first argument of a metric constructor:
    so a metric defined in a class this test does not build is still seen."""
    found: set[str] = set()
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"(leveret_\w+)\"")
    for package in SOURCES:
        for path in (ROOT / package).rglob("*.py"):
            for kind, name in pattern.findall(path.read_text()):
                found.add(f"{name.removesuffix('_total')}_total" if kind == "Counter" else name)
    return found


def code_commands() -> set[str]:
    """Every command path of the CLI, `dlq replay` style, groups included."""
    from leveret.consumer.cli import cli

    found: set[str] = set()

    def walk(command: click.Command, path: list[str]) -> None:
        if path:
            found.add(" ".join(path))
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(cli, [])
    return found


def leaf_commands() -> set[str]:
    from leveret.consumer.cli import cli

    groups = {name for name, c in cli.commands.items() if isinstance(c, click.Group)}
    return {c for c in code_commands() if c not in groups}


def public_names() -> set[str]:
    import leveret
    import leveret.testing

    return set(leveret.__all__) | set(leveret.testing.__all__)


# --- what the reference says -----------------------------------------------------------------


def documented_settings(text: str) -> set[str]:
    return set(SETTING.findall(text))


def documented_metrics(text: str) -> set[str]:
    return set(METRIC.findall(text)) - NOT_METRICS


def documented_commands(text: str) -> set[str]:
    """`leveret dlq list|replay|purge Q` → {"dlq", "dlq list", "dlq replay", "dlq purge"}."""
    found: set[str] = set()
    for span in COMMAND.findall(text):
        words = span.split()
        found.add(words[0])
        if len(words) > 1 and re.fullmatch(r"[a-z]+(\|[a-z]+)*", words[1]):
            found.update(f"{words[0]} {w}" for w in words[1].split("|"))
    return found


def documented_names(text: str) -> set[str]:
    return set(re.findall(r"`([A-Za-z_]\w*)`", text))


# --- the checks, as functions so the self-test below can run them on an edited text -----------


def missing_settings(text: str) -> set[str]:
    return code_settings() - documented_settings(_section(text, "Settings"))


def missing_metrics(text: str) -> set[str]:
    return code_metrics() - documented_metrics(_section(text, "Metrics"))


def missing_commands(text: str) -> set[str]:
    return leaf_commands() - documented_commands(_section(text, "Command line"))


def missing_names(text: str) -> set[str]:
    return public_names() - documented_names(text)


# --- code → reference ------------------------------------------------------------------------


def test_every_setting_is_in_the_reference_settings() -> None:
    assert not missing_settings(_reference()), "undocumented settings"


def test_every_metric_is_in_the_reference_metrics() -> None:
    assert not missing_metrics(_reference()), "undocumented metrics"


def test_every_metric_the_source_defines_is_built_by_this_test() -> None:
    """A metric defined somewhere this test does not construct would escape the check above."""
    assert source_metric_literals() <= code_metrics(), source_metric_literals() - code_metrics()


def test_every_command_is_in_the_reference_command_line() -> None:
    assert not missing_commands(_reference()), "undocumented commands"


def test_every_public_name_is_in_the_reference() -> None:
    assert not missing_names(_reference()), "public names the reference does not name"


# --- reference → code ------------------------------------------------------------------------


def test_every_setting_the_reference_names_exists() -> None:
    unknown = documented_settings(_reference()) - code_settings()
    assert not unknown, f"docs/reference.md names settings no code reads: {sorted(unknown)}"


def test_every_metric_the_reference_names_exists() -> None:
    unknown = documented_metrics(_reference()) - code_metrics()
    assert not unknown, f"docs/reference.md names metrics no code exports: {sorted(unknown)}"


def test_every_command_the_reference_names_exists() -> None:
    unknown = documented_commands(_reference()) - code_commands()
    assert not unknown, f"docs/reference.md names commands the CLI lacks: {sorted(unknown)}"


def test_internal_settings_stay_out_of_the_reference() -> None:
    assert not INTERNAL_SETTINGS & documented_settings(_reference())


# --- the checks catch what they are for ------------------------------------------------------


def _without_lines_naming(text: str, needle: str) -> str:
    return "\n".join(line for line in text.splitlines() if needle not in line)


@pytest.mark.parametrize(
    ("check", "item"),
    [
        (missing_settings, "LEVERET_STATUS_TIMEOUT"),
        (missing_settings, "LEVERET_API_CONNECT_BACKOFF_MAX"),
        (missing_metrics, "leveret_job_queue_wait_seconds"),
        (missing_commands, "leveret dlq replay"),
        (missing_names, "DuplicateJobIdError"),
    ],
)
def test_a_removed_doc_line_is_caught(check: Callable[[str], set[str]], item: str) -> None:
    """Deleting the lines that name an item makes its check report exactly that item."""
    text = _reference()
    assert not check(text)
    needle = item if not item.startswith("leveret ") else f"`{item}"
    reported = check(_without_lines_naming(text, needle))
    expected = item.removeprefix("leveret ")
    assert expected in reported, (item, reported)


def test_a_new_setting_without_a_doc_line_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field added to a settings class and not to the reference fails the check."""
    from leveret.producers.stores.settings import LifecycleSettings

    fields = dict(LifecycleSettings.model_fields)
    fields["brand_new_knob"] = fields["status_ttl"]
    monkeypatch.setattr(LifecycleSettings, "model_fields", fields)
    assert missing_settings(_reference()) == {"LEVERET_BRAND_NEW_KNOB"}
