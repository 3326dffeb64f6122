"""Lifecycle settings (``LEVERET_EVENTS``, ``LEVERET_STATUS_URL`` …), read once at the edge.

Kept apart from ``ConnectionSettings`` so a publisher that never asks for a status does not need
to know about them; the worker's and the publisher's settings can inherit from this class.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from leveret.producers.wire.events import DEFAULT_RESULT_MAX_BYTES, EventsMode, default_events_mode

DEFAULT_STATUS_TTL = 604800  # one week


class LifecycleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEVERET_", frozen=True, extra="ignore")

    # None: the contract's default, ``off`` (``outcomes`` where a job history is kept).
    events: EventsMode | None = None
    status_url: SecretStr | None = None
    status_ttl: int = Field(default=DEFAULT_STATUS_TTL, gt=0)
    # How long a worker waits for an unreachable status store before it reports not ready.
    status_timeout: float = Field(default=10.0, gt=0)
    history_url: SecretStr | None = None
    # Rows of the job history older than this many days are deleted by `leveret history`.
    history_days: int = Field(default=30, gt=0)
    result_max_bytes: int = Field(default=DEFAULT_RESULT_MAX_BYTES, ge=0)

    @property
    def events_mode(self) -> EventsMode:
        if self.events is not None:
            return self.events
        history = self.history_url.get_secret_value() if self.history_url else None
        return default_events_mode(history)
