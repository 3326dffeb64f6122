"""Coordination tests: Redis db 7 (no other suite uses it), every key removed after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis

from leveret.consumer import Worker
from leveret.consumer.registry import DEFAULT_QUEUE

STATUS_URL = "redis://127.0.0.1:6379/7"

F = TypeVar("F", bound=Callable[..., Any])


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(STATUS_URL, decode_responses=True)
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def job(
    worker: Worker,
    name: str,
    *,
    queue: str = DEFAULT_QUEUE,
    max_attempts: int = 3,
    backoff: float = 0,
    timeout: float | None = None,
    **coordination: Any,
) -> Callable[[F], F]:
    """``@worker.job(name, ..., lock=/idempotency_key=/retry_on=)`` with the tests' defaults."""
    return worker.job(
        name,
        queue=queue,
        max_attempts=max_attempts,
        backoff=backoff,
        timeout=timeout,
        **coordination,
    )
