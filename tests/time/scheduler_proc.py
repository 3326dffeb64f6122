"""One replica for the multi-process tests: a Scheduler alone, its log as JSON lines on stdout.

Usage: python -m tests.time.scheduler_proc URL EXCHANGE APP JOB EVERY_S MISSED [EXTRA]
APP ``-`` gives no ``name=`` (the default identity); EXTRA is a comma-separated list of more
schedule names, each firing JOB every EVERY_S beside ``tick``.
SIGTERM stops it gracefully (a last heartbeat); SIGKILL is the crash.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog
from prometheus_client import CollectorRegistry

from leveret.consumer.features.schedules.leader import Scheduler
from leveret.consumer.features.schedules.spec import make_schedule


async def main(
    url: str, exchange: str, app: str, job: str, every: str, missed: str, extra: str = ""
) -> None:
    names = ["tick", *(n for n in extra.split(",") if n)]
    schedules = [make_schedule(job, every=float(every), name=n, missed=missed) for n in names]
    scheduler = Scheduler(
        url,
        schedules,
        exchange=exchange,
        name=None if app == "-" else app,
        registry=CollectorRegistry(),
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, scheduler.stop)
    await scheduler.run()


if __name__ == "__main__":
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
    )
    asyncio.run(main(*sys.argv[1:8]))
