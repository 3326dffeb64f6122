"""Where a Leveret worker's time goes: py-spy on the real worker draining no-op jobs.

``python -m bench --profile`` runs the ``consume_noop`` workload for Leveret with py-spy
attached (sampling at 250 Hz, idle time excluded, so the figures are shares of CPU time) and
writes ``PROFILE.md`` beside ``--out``: shares by component (a sample counts for a component
when any frame of its stack is in it) and the functions that are on CPU themselves.

``--libs leveret,leveret-outcomes --rounds 3`` profiles several rows in the same
conditions (rounds interleaved, rotated order, each round's samples merged per row) and adds a
table of worker CPU per job by component in µs (share × measured CPU per job), so the cost of a
feature shows up as the difference between two columns.
"""

from __future__ import annotations

import asyncio
import re
import statistics
from collections import Counter
from pathlib import Path

from bench.broker import BenchBroker
from bench.harness import ROOT, Harness, plan

# Needles are matched against "function (file" of every frame of a stack.
GROUPS = [
    ("pydantic validation (`model_validate_json`)", ("pydantic",)),
    ("structlog (context binding, log lines)", ("structlog/",)),
    ("prometheus-client (counters, histogram, gauge)", ("prometheus_client/",)),
    ("Acker (coalesced acks)", ("consumer/delivery/acker.py",)),
    ("Settler (outcome copies)", ("consumer/delivery/settle.py",)),
    (
        "— its event bodies (`Settler._event`, producers/wire/events.py)",
        (
            f"_event ({ROOT}/consumer/settle.py",
            "producers/wire/events.py",
        ),
    ),
    (
        "— `publish_batch` (producers/broker/batch.py: frames, tag bookkeeping)",
        ("producers/broker/batch.py", "producers/broker/adapter.py"),
    ),
    ("aiormq (frames, channel, delivery tasks)", ("aiormq/",)),
    (
        "— aiormq confirm handling (`_on_confirm_frame`, `_confirm_delivery`)",
        (
            "_on_confirm_frame (",
            "_confirm_delivery (",
        ),
    ),
    ("pamqp (AMQP encode/decode)", ("pamqp/",)),
    ("the bench's handler and tally", ("bench/runners/common.py", "handle (bench/runners")),
    ("Redis status keeper (leveret-status)", ("status_keeper.py", "redis/")),
]
# Frames of start-up and housekeeping, not of the per-job path: samples in them are left out.
STARTUP = (
    "consumer/ops/",
    "_connect_session",
    "HealthServer.start",
    "topology/declare.py",
    "declare_topology",
    "wait_go",
    "ssl.py",
    "_open_session",
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for frame in stack.split(";"):
        m = _FRAME.match(frame.strip())
        out.append((m["func"], m["file"]) if m else (frame, ""))
    return out


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


class Samples:
    """py-spy's raw stacks of one row, counted by component, leaf and innermost Leveret frame."""

    def __init__(self) -> None:
        self.total = 0
        self.startup = 0
        self.groups: Counter[str] = Counter()
        self.leaves: Counter[str] = Counter()
        self.own: Counter[str] = Counter()

    def add(self, raw: Path) -> None:
        _count(raw, self)

    def asyncio_self(self) -> int:
        return sum(c for k, c in self.leaves.items() if "asyncio/" in k or "selectors" in k)


def _count(raw: Path, into: Samples) -> None:
    groups, leaves, own = into.groups, into.leaves, into.own
    total = startup = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if any(marker in stack for marker in STARTUP):
            startup += count
            continue
        frames = _frames(stack)
        total += count
        joined = [f"{fn} ({f}" for fn, f in frames]
        for name, needles in GROUPS:
            if any(n in f for f in joined for n in needles):
                groups[name] += count
        func, file = frames[-1]
        leaves[f"`{func}` ({_short(file)})"] += count
        for func, file in reversed(frames):
            if "consumer/" in file or "producers/" in file:
                own[f"`{func}` ({_short(file)})"] += count
                break
    into.total += total
    into.startup += startup


def analyse(raw: Path, cpu_us_per_job: float, rate: float) -> str:
    samples = Samples()
    samples.add(raw)
    return render(samples, cpu_us_per_job, rate)


def render(samples: Samples, cpu_us_per_job: float, rate: float, title: str = "") -> str:
    total, startup = samples.total, samples.startup
    groups, leaves, own = samples.groups, samples.leaves, samples.own
    if not total:
        return "py-spy recorded no samples (is ptrace allowed here?)\n"
    out = [
        title or "# Where a Leveret worker's time goes\n",
        "Written by `python -m bench --profile`: py-spy (250 Hz, idle excluded) attached to the "
        f"real `consumer.Worker` draining no-op jobs. This run: {rate:,.0f} jobs/s, "
        f"{cpu_us_per_job:.0f} µs of worker CPU per job, {total:,} samples "
        f"({startup:,} more in start-up and housekeeping left out).\n",
        "## By component (share of CPU samples whose stack passes through it)\n",
        "| component | share |",
        "|---|---|",
    ]
    for name, _ in GROUPS:
        out.append(f"| {name} | {groups[name] / total:.1%} |")
    asyncio_self = samples.asyncio_self()
    out.append(f"| asyncio / selectors themselves (leaf frames) | {asyncio_self / total:.1%} |")
    out.append("\n## Innermost Leveret frame (time spent in or below it, by Leveret function)\n")
    out.append("| function | share |")
    out.append("|---|---|")
    for name, count in own.most_common(12):
        out.append(f"| {name} | {count / total:.1%} |")
    out.append("\n## Hottest functions (self time)\n")
    out.append("| function | share |")
    out.append("|---|---|")
    for name, count in leaves.most_common(25):
        out.append(f"| {name} | {count / total:.1%} |")
    return "\n".join(out) + "\n"


def compare(rows: list[tuple[str, Samples, float, float]]) -> str:
    """Worker CPU per job by component, in µs, one column per profiled row.

    A component's µs per job is its share of the row's samples times the row's measured CPU
    per job (the components overlap: a sample counts for each one its stack passes through).
    The last column is the second row minus the first: where a feature's extra time goes.
    """
    names = [name for name, *_ in rows]
    head = ["component", *(f"`{n}` µs/job" for n in names)]
    if len(rows) >= 2:
        head.append(f"`{names[1]}` − `{names[0]}`")
    out = [
        "## CPU per job by component, µs (same run, rounds interleaved)\n",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def line(label: str, values: list[float]) -> None:
        cells = [label, *(f"{v:.1f}" for v in values)]
        if len(values) >= 2:
            cells.append(f"{values[1] - values[0]:+.1f}")
        out.append("| " + " | ".join(cells) + " |")

    line("**worker CPU per job (measured)**", [cpu for _, _, cpu, _ in rows])
    line("jobs/s (median of rounds)", [rate for _, _, _, rate in rows])
    for group, _ in GROUPS:
        line(group, [s.groups[group] / max(s.total, 1) * cpu for _, s, cpu, _ in rows])
    line(
        "asyncio / selectors themselves (leaf frames)",
        [s.asyncio_self() / max(s.total, 1) * cpu for _, s, cpu, _ in rows],
    )
    seen = {name for _, s, _, _ in rows for name in s.leaves}  # every leaf of any row
    diffs: list[tuple[float, str, list[float]]] = []
    for name in seen:
        values = [s.leaves[name] / max(s.total, 1) * cpu for _, s, cpu, _ in rows]
        diffs.append((values[-1] - values[0] if len(values) > 1 else values[0], name, values))
    diffs.sort(reverse=True)
    out.append("\n### Self time per job, µs: the leaf functions that grew most\n")
    out.append("| " + " | ".join(["function", *head[1:]]) + " |")
    out.append("|" + "---|" * len(head))
    for _, name, values in diffs[:20]:
        cells = [name, *(f"{v:.1f}" for v in values)]
        if len(values) >= 2:
            cells.append(f"{values[1] - values[0]:+.1f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def profile(broker: BenchBroker, out: Path, libs: list[str] | None = None, rounds: int = 1) -> None:
    """Profile ``libs`` (default: the plain ``leveret`` row), ``rounds`` interleaved rounds."""
    libs = libs or ["leveret"]
    (wl,) = [w for w in plan(False, libs) if w.name == "consume_noop"]
    if wl.libs != libs:
        raise SystemExit(f"not consume_noop rows: {sorted(set(libs) - set(wl.libs))}")

    async def go() -> None:
        harness = Harness(broker, Path("/tmp"))
        samples = {lib: Samples() for lib in libs}
        figures: dict[str, list[tuple[float, float]]] = {lib: [] for lib in libs}
        await broker.open()
        try:
            for rnd in range(rounds):
                shift = rnd % len(libs)
                for lib in libs[shift:] + libs[:shift]:
                    raw = Path("/tmp") / f"leveret-profile-{broker.vhost}-{lib}-{rnd}.txt"
                    run = await harness.run(wl, lib, rnd, profile=raw)
                    if not run.ok:
                        raise SystemExit(f"profiled run of {lib} failed: {run.error}")
                    samples[lib].add(raw)
                    figures[lib].append((run.figures["cpu_us_per_job"], run.figures["rate"]))
        finally:
            await broker.close()
        rows = [
            (
                lib,
                samples[lib],
                statistics.median(c for c, _ in figures[lib]),
                statistics.median(r for _, r in figures[lib]),
            )
            for lib in libs
        ]
        if len(libs) == 1:
            text = render(rows[0][1], rows[0][2], rows[0][3])
        else:
            text = "# Where a Leveret worker's time goes, row by row\n\n" + compare(rows)
            for lib, s, cpu, rate in rows:
                text += "\n" + render(s, cpu, rate, title=f"# `{lib}`\n").replace("\n## ", "\n### ")
        notes = out.parent / "PROFILE_NOTES.md"
        if notes.exists() and out.parent == notes.parent and len(libs) == 1:
            text += "\n" + notes.read_text()
        out.write_text(text)  # noqa: ASYNC240 - once, after the run

    asyncio.run(go())
