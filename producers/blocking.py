"""A blocking facade over ``Publisher`` for Flask, Django, scripts.

It runs one event loop in a daemon thread and hands each call to it, so a synchronous caller
gets the same confirms, pipelining and errors as the async API.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import structlog
from pydantic import JsonValue

from leveret.producers.eventloop import LoopChoice, loop_factory, loop_name
from leveret.producers.groups import GroupId, GroupStatus
from leveret.producers.publisher import Delay, Job, Payload, Publisher
from leveret.producers.schedules import RuntimeSchedule
from leveret.producers.settings import ConnectionSettings
from leveret.producers.stores.status import JobStatus

T = TypeVar("T")
log = structlog.get_logger("leveret.publisher")


class BlockingPublisher:
    """``with BlockingPublisher(url) as pub: pub.publish("job", {...})``; thread-safe."""

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: ConnectionSettings | None = None,
        loop: LoopChoice = "auto",
        status_url: str | None = None,
    ):
        self._publisher = Publisher(url, settings=settings, status_url=status_url)
        # The loop thread's loop: uvloop where installed (``auto``), like the worker's --loop.
        self._loop = loop_factory(loop)()
        log.debug("event_loop", loop=loop_name(self._loop), asked=loop)
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="leveret-publisher", daemon=True
        )
        self._thread.start()
        self._run(self._publisher.connect())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def publish(
        self,
        job: str,
        payload: Payload,
        *,
        priority: int | None = None,
        delay: Delay | None = None,
        eta: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        max_attempts: int | None = None,
        dedup_key: str | None = None,
        expires: float | timedelta | datetime | None = None,
    ) -> str:
        """``Publisher.publish``, blocking; ``delay``/``eta``/``headers``/``max_attempts``/
        ``dedup_key``/``expires`` as there."""
        return self._run(
            self._publisher.publish(
                job,
                payload,
                priority=priority,
                delay=delay,
                eta=eta,
                job_id=job_id,
                headers=headers,
                max_attempts=max_attempts,
                dedup_key=dedup_key,
                expires=expires,
            )
        )

    def cancel(self, job_id: str) -> JobStatus:
        """``Publisher.cancel``, blocking."""
        return self._run(self._publisher.cancel(job_id))

    def publish_many(self, jobs: Iterable[Job | tuple[str, Payload]]) -> list[str]:
        return self._run(self._publisher.publish_many(list(jobs)))

    def status(self, job_id: str) -> JobStatus | None:
        """``Publisher.status``, blocking."""
        return self._run(self._publisher.status(job_id))

    def result(self, job_id: str, timeout: float | None = None) -> JsonValue:
        """``Publisher.result``, blocking: waits in the publisher's loop, not the caller's."""
        return self._run(self._publisher.result(job_id, timeout))

    def group(
        self,
        jobs: Iterable[Job | tuple[str, Payload]],
        *,
        then: Job,
        group_id: str | None = None,
    ) -> GroupId:
        """``Publisher.group``, blocking."""
        return self._run(self._publisher.group(list(jobs), then=then, group_id=group_id))

    def group_status(self, group_id: str) -> GroupStatus | None:
        """``Publisher.group_status``, blocking."""
        return self._run(self._publisher.group_status(group_id))

    def schedule(
        self,
        name: str,
        job: str,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        tz: str = "UTC",
        payload: Payload | None = None,
        missed: str = "once",
    ) -> RuntimeSchedule:
        """``Publisher.schedule``, blocking."""
        return self._run(
            self._publisher.schedule(
                name, job, cron=cron, every=every, tz=tz, payload=payload, missed=missed
            )
        )

    def unschedule(self, name: str) -> bool:
        """``Publisher.unschedule``, blocking."""
        return self._run(self._publisher.unschedule(name))

    def schedules(self) -> list[RuntimeSchedule]:
        """``Publisher.schedules``, blocking."""
        return self._run(self._publisher.schedules())

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._publisher.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
