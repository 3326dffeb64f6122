"""HTTP API settings (``LEVERET_API_*``), read once at the edge like the worker's."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_BODY = 1_048_576  # 1 MiB, the contract's default


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEVERET_", frozen=True, extra="ignore")

    # The bearer token every request but /healthz must carry. SecretStr: never in a repr or log.
    # Stripped once here: a token read from a file (a mounted secret, `echo tok > file`) ends in
    # a newline no client sends, and the server compares what it keeps with the header's token.
    api_token: SecretStr | None = None
    # Largest POST body accepted, counted while the body is read (never buffered first).
    api_max_body: int = Field(default=DEFAULT_MAX_BODY, ge=1)
    # Seconds between broker connection attempts while it is unreachable: first, then the cap.
    api_connect_backoff: float = Field(default=0.5, gt=0)
    api_connect_backoff_max: float = Field(default=30.0, gt=0)

    @field_validator("api_token", mode="before")
    @classmethod
    def _strip_token(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            return SecretStr(value.get_secret_value().strip())
        return value.strip() if isinstance(value, str) else value
