"""structlog set-up: JSON lines for machines, readable lines for people, both on stderr.

stdout stays clean for what commands print (ids, counts, definitions JSON). Job context
(job_id, job, queue, attempt) rides in contextvars, bound per delivery task, so every line a
handler logs carries it without the handler passing anything around.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure once, at the edge (the CLI); ``json`` defaults to "stderr is not a terminal"."""
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if json:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aio-pika/aiormq log through stdlib logging: keep their chatter (which we report in our
    # own words, URL masked) out of the output unless debugging.
    logging.basicConfig(
        level=logging.DEBUG if level == "debug" else logging.CRITICAL, stream=sys.stderr
    )
