"""Errors of the worker side (see ``leveret.topology.errors`` for the whole tree)."""

from __future__ import annotations

from leveret.topology.errors import LeveretError


class Reject(Exception):
    """Raise from a handler to send the job straight to its DLQ (``x-reason: rejected``).

    Control flow, not a failure of Leveret, so it stays outside the ``LeveretError`` tree.
    """

    def __init__(self, reason: str = "rejected by handler") -> None:
        self.reason = reason
        super().__init__(reason)


class ConfigError(LeveretError, ValueError):
    """A worker application, job registration or setting cannot be used as given."""
