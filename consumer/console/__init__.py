"""The web console at ``/ui`` of ``leveret api`` (docs/console.md): queues, workers, jobs, dead
letters and schedules, server-rendered with Jinja2 and kept live with a vendored htmx."""

from leveret.consumer.console.app import add_console

__all__ = ["add_console"]
