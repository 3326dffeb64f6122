"""Worker settings: ``LEVERET_*`` read once by ``Worker()`` or the CLI, then passed down."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from leveret.producers.settings import ConnectionSettings


class WorkerSettings(ConnectionSettings):
    model_config = SettingsConfigDict(env_prefix="LEVERET_", frozen=True, extra="ignore")

    # The most jobs one worker holds unacknowledged at once: its concurrency.
    prefetch: int = Field(default=50, ge=1, le=65535)
    metrics_port: int = Field(default=9808, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    shutdown_grace: float = Field(default=30.0, ge=0)
    management_url: SecretStr | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Bodies above this are dead-lettered as invalid instead of being parsed.
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    queue_type: Literal["classic", "quorum"] = "classic"
    # Deliveries of one message (broker redeliveries, e.g. after crashes) before it is
    # dead-lettered even though no handler run ever finished: stops a job that kills its worker
    # from looping forever.
    max_redeliveries: int = Field(default=5, ge=1)
