"""What a handler (and a middleware around it) may learn about the job it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from structlog.typing import FilteringBoundLogger


@dataclass(slots=True)
class JobContext:
    job_id: str
    job: str
    queue: str
    attempt: int  # 1 on the first run
    max_attempts: int
    log: FilteringBoundLogger
    redelivered: bool = False
    priority: int | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    # The validated payload, as the handler receives it; middleware may read it.
    payload: Any = None

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts
