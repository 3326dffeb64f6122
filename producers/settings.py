"""Connection settings, read once from ``LEVERET_*`` at the edge and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# How long a confirm may take before a publish counts as failed: the one default every
# confirmed publish (publisher, outcome copies, DLQ replay, scheduler) starts from.
DEFAULT_PUBLISH_TIMEOUT = 30.0


class ConnectionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEVERET_", frozen=True, extra="ignore")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    exchange: str = "jobs"
    # Bounded waits: a publish never hangs on a blocked or vanished broker.
    publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT
    connect_timeout: float = 10.0
    # TLS for amqps:// URLs; the server certificate is verified by default.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
