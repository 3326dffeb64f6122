"""The web console at ``/ui`` of ``leveret api`` (docs/console.md): queues, workers, jobs, dead
letters and schedules, server-rendered with Jinja2 and kept live with a vendored htmx."""

from __future__ import annotations

from typing import Any

import structlog


def add_console(app: Any, state: Any) -> None:
    """Serve the console at ``/ui`` on the API ``app`` (``create_app`` calls this unless
    ``ui=False``). Without Jinja2 (an install older than the ``api`` extra that names it) the
    API starts without its console and says why, once."""
    try:
        from leveret.consumer.console.app import add_console as add
    except ImportError as exc:
        structlog.get_logger("leveret.console").warning(
            "console.unavailable",
            error=f"{exc.name or exc} is missing",
            hint="pip install 'leveret[api]' (the console needs jinja2); --no-ui silences this",
        )
        return
    add(app, state)


__all__ = ["add_console"]
