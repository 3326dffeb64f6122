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
unacked by the leader, invisible to everyone else. Redis gives atomic ``HSET``/``HDEL``, reads
by any process, and survives every Leveret process and any broker restart; it needs persistence
(AOF or RDB) to survive its own restart, like the statuses and dedup claims kept there.

What stays on the broker is what must be exactly once: the last fired tick per schedule lives
in the leader's token, as for app schedules. The leader reads the set about once a second
(``REFRESH_S`` in ``consumer.features.schedules.leader``); a schedule added is picked up within
that, and starts from "now" (it does not fire its past). One removed stops firing within the
same second. A schedule re-added under a name used before starts afresh (its ``created_at`` is
newer than the tick the token remembers).
On a name clash an app schedule wins (the runtime one is ignored, with a warning).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict

from leveret.producers.stores.redis import (
    DEFAULT_TIMEOUT_S,
    StatusStoreError,
    redis_call,
    redis_client,
)
from leveret.topology.errors import InvalidValueError
from leveret.topology.model import check_name

__all__ = [
    "DEFAULT_SCHEDULES_PREFIX",
    "RuntimeSchedule",
    "ScheduleStore",
    "SchedulesUnavailableError",
    "build_schedule",
    "runtime_schedules",
]

DEFAULT_SCHEDULES_PREFIX: Final = "leveret:schedules:"


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
    """The one validation of a schedule (``InvalidValueError``, a ``ValueError``, naming the
    problem), for ``pub.schedule`` and ``worker.schedule`` alike, and the stored form. The
    leader validates it again as it loads it (a stored definition is data)."""
    where = f"schedule {name!r} (job {job!r})"
    try:
        check_name("job", job)
        check_name("schedule", name)
    except InvalidValueError as exc:
        raise InvalidValueError(f"{where}: {exc}") from None
    if (cron is None) == (every is None):
        raise InvalidValueError(f"{where}: give exactly one of cron= or every=")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise InvalidValueError(f"{where}: unknown time zone {tz!r} (use an IANA name)") from None
    every_s = None
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, timedelta | int | float):
            raise InvalidValueError(
                f"{where}: every= must be seconds or a timedelta, got {every!r}"
            )
        every_s = every.total_seconds() if isinstance(every, timedelta) else float(every)
        if not math.isfinite(every_s) or every_s <= 0:
            raise InvalidValueError(f"{where}: every= must be positive, got {every!r}")
    if cron is not None:
        if not isinstance(cron, str) or len(cron.split()) not in (5, 6):
            raise InvalidValueError(
                f"{where}: cron expression {cron!r} needs 5 fields (minute hour day month "
                f"weekday) or 6 (seconds first)"
            )
        from cronsim import CronSim, CronSimError

        try:
            next(CronSim(cron, datetime.now(zone)))
        except (CronSimError, StopIteration) as exc:
            reason = str(exc) or "never fires"
            raise InvalidValueError(f"{where}: bad cron expression {cron!r}: {reason}") from None
    if missed not in ("once", "skip"):
        raise InvalidValueError(f"{where}: missed= must be 'once' or 'skip', got {missed!r}")
    if payload is not None and not isinstance(payload, Mapping):
        raise InvalidValueError(f"{where}: payload must be a dict")
    return RuntimeSchedule(
        name=name,
        job=job,
        cron=cron,
        every_s=every_s,
        tz=tz,
        payload=dict(payload or {}),
        missed=missed,
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
