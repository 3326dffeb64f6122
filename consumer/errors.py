"""Errors of the worker side (see ``leveret.topology.errors`` for the whole tree)."""

from __future__ import annotations

from datetime import timedelta

from leveret.topology.errors import LeveretError


class Reject(Exception):
    """Raise from a handler to send the job straight to its DLQ (``x-reason: rejected``).

    Control flow, not a failure of Leveret, so it stays outside the ``LeveretError`` tree.
    """

    def __init__(self, reason: str = "rejected by handler") -> None:
        self.reason = reason
        super().__init__(reason)


class Retry(Exception):
    """Raise from a handler to retry the job after ``after`` seconds (a number or a
    ``timedelta``) instead of its backoff: ``raise Retry(after=30)``.

    The retry is a run like any other: it counts as an attempt, so a job out of attempts is
    dead-lettered ``exhausted``; it is retried whatever the job's ``retry_on`` says. The delay
    chain runs it no earlier than ``after`` (see ``leveret.topology.delay``). Without ``after``
    the job's own backoff applies.
    """

    def __init__(
        self, reason: str = "retry asked by handler", *, after: float | timedelta | None = None
    ) -> None:
        seconds = after.total_seconds() if isinstance(after, timedelta) else after
        if seconds is not None and (
            isinstance(seconds, bool) or not 0 <= float(seconds) < float("inf")
        ):
            raise ValueError(f"Retry(after=) must be 0 or more seconds, got {after!r}")
        self.reason = reason
        self.after = None if seconds is None else float(seconds)
        super().__init__(reason)


class ConfigError(LeveretError, ValueError):
    """A worker application, job registration or setting cannot be used as given."""
