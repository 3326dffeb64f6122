"""Where a Leveret worker's time goes: py-spy on the real worker draining no-op jobs.

``python -m bench --profile`` runs the ``consume_noop`` workload for Leveret once with py-spy
attached (sampling at 250 Hz, idle time excluded, so the figures are shares of CPU time) and
writes ``bench/PROFILE.md``: shares by component (a sample counts for a component when any frame
of its stack is in it) and the functions that are on CPU themselves.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

from bench.broker import BenchBroker
from bench.harness import Harness, plan

GROUPS = [
    ("pydantic validation (`model_validate_json`)", ("pydantic",)),
    ("structlog (context binding, log lines)", ("structlog/",)),
    ("prometheus-client (counters, histogram, gauge)", ("prometheus_client/",)),
    ("Acker (coalesced acks)", ("consumer/acker.py",)),
    ("Settler (outcome copies)", ("consumer/settle.py",)),
    ("aiormq (frames, channel, delivery tasks)", ("aiormq/",)),
    ("pamqp (AMQP encode/decode)", ("pamqp/",)),
    ("the bench's handler and tally", ("bench/runners/common.py", "handle (bench/runners")),
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


def analyse(raw: Path, cpu_us_per_job: float, rate: float) -> str:
    total = 0
    startup = 0
    groups: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    own: Counter[str] = Counter()
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
    if not total:
        return "py-spy recorded no samples (is ptrace allowed here?)\n"
    out = [
        "# Where a Leveret worker's time goes\n",
        "Written by `python -m bench --profile`: py-spy (250 Hz, idle excluded) attached to the "
        f"real `consumer.Worker` draining no-op jobs, defaults on. This run: {rate:,.0f} jobs/s, "
        f"{cpu_us_per_job:.0f} µs of worker CPU per job, {total:,} samples "
        f"({startup:,} more in start-up and housekeeping left out).\n",
        "## By component (share of CPU samples whose stack passes through it)\n",
        "| component | share |",
        "|---|---|",
    ]
    for name, _ in GROUPS:
        out.append(f"| {name} | {groups[name] / total:.1%} |")
    asyncio_self = sum(c for k, c in leaves.items() if "asyncio/" in k or "selectors" in k)
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


def profile(broker: BenchBroker, out: Path) -> None:
    (wl,) = [w for w in plan(False, ["leveret"]) if w.name == "consume_noop"]
    raw = Path("/tmp") / f"leveret-profile-{broker.vhost}.txt"

    async def go() -> None:
        harness = Harness(broker, Path("/tmp"))
        await broker.open()
        try:
            run = await harness.run(wl, "leveret", 0, profile=raw)
        finally:
            await broker.close()
        if not run.ok:
            raise SystemExit(f"profiled run failed: {run.error}")
        text = analyse(raw, run.figures["cpu_us_per_job"], run.figures["rate"])
        notes = out.parent / "PROFILE_NOTES.md"
        if notes.exists():
            text += "\n" + notes.read_text()
        out.write_text(text)  # noqa: ASYNC240 - once, after the run

    asyncio.run(go())
