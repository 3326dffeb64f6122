"""structlog set-up: JSON lines for machines, readable lines for people, both on stderr.

stdout stays clean for what commands print (ids, counts, definitions JSON). Job context
(job_id, job, queue, attempt) rides in contextvars, bound per delivery task, so every line a
handler logs carries it without the handler passing anything around.

Standard-library ``logging`` goes the same way: a handler's ``logging.getLogger(__name__)``, and
libraries such as httpx or SQLAlchemy, are rendered by structlog's ``ProcessorFormatter`` into
the same lines, with the same job context. The AMQP client libraries (aio-pika, aiormq, pamqp)
are quieted below debug: Leveret reports what they go through in its own words. The HTTP client
libraries (httpx, httpcore, urllib3) keep only their warnings and errors below debug: their line
per request (``HTTP Request: GET …`` from every ``leveret status``) is chatter, not an event.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from leveret.producers.broker import mask_secrets

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip

# Their connection chatter duplicates what Leveret logs (with the URL masked).
AMQP_LOGGERS = ("aio_pika", "aiormq", "pamqp")

# One INFO line per request (httpx) or per connection step (httpcore, urllib3): WARNING and up
# only, unless the level is debug.
HTTP_LOGGERS = ("httpx", "httpcore", "urllib3", "requests", "h11", "hpack")

# Marks the handler this module installs, so configuring twice replaces rather than doubles it.
_HANDLER_NAME = "leveret-stderr"


def _masker(url: str | None) -> structlog.typing.Processor:
    """Last step of every chain: mask the broker URL's credentials in the rendered line."""

    def mask(_logger: Any, _name: str, line: Any) -> Any:
        return mask_secrets(line, url) if url and isinstance(line, str) else line

    return mask


def configure_logging(
    level: str = "info", *, json: bool | None = None, secret_url: str | None = None
) -> None:
    """Configure once, at the edge (the CLI); ``json`` defaults to "stderr is not a terminal".

    ``secret_url`` is the broker URL whose ``user:password@`` no line may show.
    """
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
    mask = _masker(secret_url)
    structlog.configure(
        processors=[*shared, renderer, mask],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),
                *shared,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer, mask],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    for name in AMQP_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
    for name in HTTP_LOGGERS:
        quiet = max(logging.WARNING, _LEVELS[level])
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else quiet)
