"""Worker settings: ``LEVERET_*`` read once by ``Worker()`` or the CLI, then passed down."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from leveret.producers import ConnectionSettings
from leveret.producers.stores import LifecycleSettings


class WorkerSettings(ConnectionSettings, LifecycleSettings):
    """Everything ``LEVERET_*`` a worker reads, the lifecycle ones (``LEVERET_EVENTS``,
    ``LEVERET_STATUS_URL`` …) included through ``LifecycleSettings``."""

    model_config = SettingsConfigDict(env_prefix="LEVERET_", frozen=True, extra="ignore")

    # The worker's concurrency: the most jobs it runs at once, whichever queues they come from.
    # Set per consumer (never global QoS): each queue's consumer may hold this many
    # unacknowledged, and with several queues the pipeline runs at most this many at once.
    prefetch: int = Field(default=50, ge=1, le=65535)
    metrics_port: int = Field(default=9808, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    shutdown_grace: float = Field(default=30.0, ge=0)
    management_url: SecretStr | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Bodies above this are dead-lettered as invalid instead of being parsed. It bounds
    # parsing, not memory: aiormq has read the whole body before the worker sees it, so the
    # memory held in bodies is bounded by prefetch x the broker's max_message_size (128 MiB on
    # RabbitMQ 3.x: 6.4 GiB at the default prefetch). Set max_message_size on the broker to
    # make this a real bound (docs/reliability.md, "Limits").
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    queue_type: Literal["classic", "quorum"] = "classic"
    # Deliveries of one message (broker redeliveries, e.g. after crashes) before it is
    # dead-lettered even though no handler run ever finished: stops a job that kills its worker
    # from looping forever.
    max_redeliveries: int = Field(default=5, ge=1)
    # A lock (``lock=``) held by a worker that died is free after this many seconds; a living
    # holder renews it every third of it.
    lock_ttl: float = Field(default=60.0, gt=0)
    # How long ``mark_done``/``idempotency_key=`` marks are kept (seconds; a week).
    idempotency_ttl: int = Field(default=604800, gt=0)
