"""``python -m bench [--quick] [--rounds N] [--libs a,b] [--only w1,w2] [--jobs N] [--profile]``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench import report
from bench.broker import BenchBroker
from bench.harness import Run, Workload, loadavg, plan, run_all, summarise

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, or 1 with --quick)")
    parser.add_argument("--libs", help="comma-separated libraries to run (default: all)")
    parser.add_argument("--only", help="comma-separated workloads to run (default: all)")
    parser.add_argument(
        "--jobs",
        type=int,
        help="jobs per run for every workload run (a smoke run's size; default: the workload's)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild RESULTS.md from the raw figures of the last run (bench/results.json)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile Leveret workers with py-spy (consume_noop; the rows in --libs, default "
        "leveret; --rounds N interleaved) and write PROFILE.md beside --out",
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument(
        "--management-url", default=os.environ.get("BENCH_MANAGEMENT_URL", "http://127.0.0.1:15672")
    )
    args = parser.parse_args(argv)
    raw = args.out.with_name("results.json")
    if args.report_only:
        saved = json.loads(raw.read_text())
        runs = [Run(**r) for r in saved["runs"]]
        workloads = [Workload(**w) for w in saved["workloads"]]
        report.write(args.out, summarise(runs), runs, workloads, saved["meta"])
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    broker = BenchBroker(args.amqp_url, args.management_url)
    broker.create()
    try:
        if args.profile:
            from bench.profile import profile

            profile(
                broker,
                args.out.with_name("PROFILE.md"),
                args.libs.split(",") if args.libs else None,
                args.rounds or 1,
            )
            return 0
        rounds = args.rounds or (1 if args.quick else 3)
        libs = args.libs.split(",") if args.libs else None
        workloads = plan(args.quick, libs)
        if args.only:
            wanted = set(args.only.split(","))
            workloads = [w for w in workloads if w.name in wanted]
        if args.jobs:
            for w in workloads:
                w.params["n"] = args.jobs
        meta = {
            "machine": report.machine_line(),
            "rabbitmq": broker.rabbitmq_version(),
            "load_start": loadavg(),
            "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
            "rounds": rounds,
            "command": " ".join(["python -m bench", *map(shlex.quote, argv or sys.argv[1:])]),
            "versions": report.versions(),
        }
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="leveret-bench-") as logdir:
            keep = os.environ.get("BENCH_LOG_DIR")
            target = Path(keep) if keep else Path(logdir)
            target.mkdir(parents=True, exist_ok=True)
            runs = asyncio.run(run_all(broker, workloads, rounds, target))
        meta["duration_s"] = time.monotonic() - started
        meta["load_end"] = loadavg()
        summary = summarise(runs)
        raw.write_text(
            json.dumps(
                {
                    "meta": meta,
                    "workloads": [asdict(w) for w in workloads],
                    "runs": [asdict(r) for r in runs],
                },
                indent=1,
            )
        )
        report.write(args.out, summary, runs, workloads, meta)
        print(args.out, file=sys.stderr)
        return 0 if all(r.ok for r in runs) else 1
    finally:
        broker.delete()


if __name__ == "__main__":
    sys.exit(main())
