"""Runtime schedules: recurring jobs added and removed while the app runs, by any service.

``await pub.schedule("nightly-report", "report", cron="0 2 * * *", tz="Europe/Paris",
payload={...})``, ``await pub.unschedule("nightly-report")``, ``leveret schedule add|remove|list``.
They are fired by the same leader as the app's own ``worker.schedule(...)`` schedules
(``consumer.features.schedules.leader``), under the same rules: job id ``<name>@<tick>``,
exactly once per tick, ``missed=`` as for app schedules, takeover within 5 s.

**Where they live: Redis** (the status store, ``LEVERET_STATUS_URL``), one hash per exchange,
``leveret:schedules:<exchange>``: name -> the definition as JSON. Why not the broker
(docs/coordination.md, "Runtime schedules", argues it in full): the set must be *read* by any
process at any time (``schedule list``, the console, every leader after a takeover) and changed
atomically by any process. A queue can only be read by consuming it, and the one durable place
the scheduler already keeps (its token, on the single-active-consumer election queue) is held
unacked by the leader, invisible to everyone else. Redis gives atomic ``HSET``/``HDEL``, a read
from anywhere, and survives every Leveret process and any broker restart; it needs persistence
(AOF or RDB) to survive its own restart, like the statuses and dedup claims kept there.

What stays on the broker is what must be exactly once: the last fired tick per schedule lives in
the leader's token, as for app schedules. The leader reads the set about once a second
(``REFRESH_S``); a schedule added is picked up within that, and starts from "now" (it does not
fire its past). One removed stops firing within the same second. A schedule re-added under a
name used before starts afresh (its ``created_at`` is newer than the tick the token remembers).
On a name clash an app schedule wins (the runtime one is ignored, with a warning).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict

from leveret.producers.stores.redis import (
    DEFAULT_TIMEOUT_S,
    StatusStoreError,
    redis_call,
    redis_client,
)

if TYPE_CHECKING:
    from leveret.consumer.features.schedules.spec import Schedule

__all__ = [
    "DEFAULT_SCHEDULES_PREFIX",
    "REFRESH_S",
    "RuntimeSchedule",
    "ScheduleStore",
    "SchedulesUnavailableError",
    "runtime_schedules",
]

DEFAULT_SCHEDULES_PREFIX: Final = "leveret:schedules:"
# How often a leader reads the set (seconds).
REFRESH_S: Final = 1.0


class SchedulesUnavailableError(StatusStoreError):
    """Runtime schedules need the status store's Redis (``LEVERET_STATUS_URL``)."""

    def __init__(self) -> None:
        super().__init__(
            "runtime schedules need a Redis status store: set LEVERET_STATUS_URL (or pass "
            "Publisher(url, status_url='redis://…')); they are kept there"
        )


class RuntimeSchedule(BaseModel):
    """One runtime schedule as stored (and as ``runtime_schedules`` returns it)."""

    model_config = ConfigDict(frozen=True)

    name: str
    job: str
    cron: str | None = None
    every_s: float | None = None
    tz: str = "UTC"
    payload: dict[str, Any] = {}
    missed: str = "once"
    created_at: float  # epoch seconds: a re-added name starts afresh

    @property
    def expression(self) -> str:
        return self.cron if self.cron is not None else f"every {self.every_s:g}s"

    def as_schedule(self) -> Schedule:
        """The leader's ``Schedule`` (validated again: a stored definition is data)."""
        from leveret.consumer.features.schedules.spec import make_schedule

        return make_schedule(
            self.job,
            cron=self.cron,
            every=self.every_s,
            tz=self.tz,
            payload=self.payload,
            name=self.name,
            missed=self.missed,
        )


def build_schedule(
    name: str,
    job: str,
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    tz: str = "UTC",
    payload: Mapping[str, Any] | None = None,
    missed: str = "once",
) -> RuntimeSchedule:
    """Validate (as ``worker.schedule`` does: ``ConfigError``) and build the stored form."""
    from leveret.consumer.features.schedules.spec import make_schedule

    checked = make_schedule(
        job, cron=cron, every=every, tz=tz, payload=payload, name=name, missed=missed
    )
    return RuntimeSchedule(
        name=checked.name,
        job=checked.job,
        cron=checked.cron,
        every_s=None if checked.every is None else checked.every.total_seconds(),
        tz=checked.tz,
        payload=dict(checked.payload),
        missed=checked.missed,
        created_at=time.time(),
    )


class ScheduleStore:
    """The runtime schedules of one exchange, in one Redis hash."""

    def __init__(
        self,
        client: Any,
        exchange: str,
        *,
        prefix: str = DEFAULT_SCHEDULES_PREFIX,
        url: str = "redis",
    ) -> None:
        self.client = client
        self.key = f"{prefix}{exchange}"
        self._where = f"schedule store at {url} (key {self.key!r})"

    @classmethod
    def from_url(
        cls, url: str, exchange: str, *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> ScheduleStore:
        return cls(redis_client(url, timeout=timeout), exchange, url=url)

    @classmethod
    def of(cls, status_store: Any, exchange: str) -> ScheduleStore | None:
        """On a Redis status store's client; ``None`` for any other store."""
        from leveret.producers.stores.status import RedisStatusStore

        if not isinstance(status_store, RedisStatusStore):
            return None
        return cls(status_store.client, exchange, url=status_store.url)

    async def add(self, schedule: RuntimeSchedule) -> bool:
        """Store (or replace) ``schedule``; ``True`` if the name was new."""
        created = await redis_call(
            self._where,
            "add",
            self.client.hset(self.key, schedule.name, schedule.model_dump_json()),
        )
        return bool(created)

    async def remove(self, name: str) -> bool:
        """``True`` if a schedule of that name was removed."""
        return bool(await redis_call(self._where, "remove", self.client.hdel(self.key, name)))

    async def list(self) -> list[RuntimeSchedule]:
        """Every runtime schedule, by name; an unreadable entry is skipped (and logged)."""
        raw: dict[str, str] = await redis_call(self._where, "list", self.client.hgetall(self.key))
        out = []
        for name in sorted(raw):
            try:
                out.append(RuntimeSchedule.model_validate(json.loads(raw[name])))
            except ValueError:
                import structlog

                structlog.get_logger("leveret.scheduler").warning(
                    "runtime_schedule_unreadable", name=name
                )
        return out

    async def close(self) -> None:
        await self.client.aclose()


async def runtime_schedules(url: str, exchange: str = "jobs") -> list[RuntimeSchedule]:
    """The runtime schedules of ``exchange`` on the Redis at ``url`` (for the console and other
    readers: no broker, no app needed)."""
    store = ScheduleStore.from_url(url, exchange)
    try:
        return await store.list()
    finally:
        await store.close()
