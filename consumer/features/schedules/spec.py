"""Recurring jobs as data: a ``Schedule``, its validation when the app loads, its tick times.

Tick times are pure functions of the schedule and an instant, so every replica computes the same
ticks and the job id ``<name>@<tick as RFC 3339 UTC>`` names one tick everywhere (a takeover's
rare double publish carries the same id).

* ``every``: tick ``k`` is at ``k * every`` after 1970-01-01T00:00:00Z. Aligned to the epoch,
  not to a start time, so replicas started at different moments agree; the time zone is
  irrelevant to it (still validated).
* ``cron``: 5 fields (or 6 with seconds first), evaluated by cronsim in the schedule's zone.
  cronsim rather than croniter: it is small, pure Python, works on ``zoneinfo`` directly and
  documents its DST behaviour, which is Debian cron's. For an expression at a fixed local time
  (minute and hour fields not starting with ``*``), e.g. ``30 2 * * *`` in Europe/Paris:

  - spring forward (02:00 → 03:00, 02:30 does not exist): the tick fires once, at the first
    minute after the gap, 03:00 local (01:00 UTC);
  - fall back (02:00–03:00 happens twice): the tick fires once, at the first 02:30 (CEST,
    00:30 UTC).

  Expressions with ``*`` in the minute or hour field match every real instant whose local
  reading matches: ``*/15 * * * *`` keeps firing every 15 minutes through both passes of a
  repeated hour, and skips nothing but the readings that do not exist. Ticks are always
  strictly increasing in UTC.

cronsim is imported where a cron expression is evaluated, not at the top: every worker imports
this module (through the scheduler), most apps define no cron schedule, and a lean worker loads
nothing it does not use (tests/package/test_lean_imports.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from leveret.consumer.errors import ConfigError
from leveret.producers import build_schedule
from leveret.topology.errors import InvalidValueError

Missed = Literal["once", "skip"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True, eq=True)
class Schedule:
    """One recurring job of an app; build it with ``make_schedule`` (which validates)."""

    job: str
    name: str
    cron: str | None = None
    every: timedelta | None = None
    tz: str = "UTC"
    payload: Mapping[str, Any] = field(default_factory=dict)
    missed: Missed = "once"

    @property
    def expression(self) -> str:
        """What ``leveret schedule list`` shows: the cron text or ``every <seconds>s``."""
        if self.cron is not None:
            return self.cron
        assert self.every is not None
        return f"every {self.every.total_seconds():g}s"

    def job_id(self, tick: datetime) -> str:
        return f"{self.name}@{format_tick(tick)}"

    def next_after(self, instant: datetime) -> datetime:
        """The first tick strictly after ``instant`` (aware), in UTC."""
        instant = _aware(instant)
        if self.every is not None:
            step = self.every // _US
            k = (instant - _EPOCH) // _US // step + 1
            return _EPOCH + k * step * _US
        assert self.cron is not None
        from cronsim import CronSim

        zone = ZoneInfo(self.tz)
        for local in CronSim(self.cron, instant.astimezone(zone)):
            tick = local.astimezone(UTC)
            if tick > instant:  # a wall-clock iterator can land in the past across a fall back
                return tick
        raise ConfigError(f"schedule {self.name!r}: {self.cron!r} never fires")  # pragma: no cover

    def latest_at_or_before(self, instant: datetime) -> datetime | None:
        """The most recent tick at or before ``instant``, in UTC (None: none in 50 years)."""
        instant = _aware(instant)
        if self.every is not None:
            step = self.every // _US
            k = (instant - _EPOCH) // _US // step
            return _EPOCH + k * step * _US
        assert self.cron is not None
        from cronsim import CronSim

        zone = ZoneInfo(self.tz)
        start = (instant + timedelta(seconds=1)).replace(microsecond=0)
        try:
            for local in CronSim(self.cron, start.astimezone(zone), reverse=True):
                tick = local.astimezone(UTC)
                if tick <= instant and self.next_after(tick - _US) == tick:
                    return tick
        except StopIteration:  # pragma: no cover
            return None
        return None  # pragma: no cover

    def ticks_between(self, after: datetime, until: datetime) -> list[datetime]:
        """Ticks in (after, until], oldest first."""
        out = []
        tick = self.next_after(after)
        while tick <= until:
            out.append(tick)
            tick = self.next_after(tick)
        return out


def format_tick(tick: datetime) -> str:
    """RFC 3339 UTC with a ``Z``, seconds always, fractions only when there are any."""
    tick = _aware(tick).astimezone(UTC)
    text = tick.strftime("%Y-%m-%dT%H:%M:%S")
    if tick.microsecond:
        text += f".{tick.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_tick(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _aware(instant: datetime) -> datetime:
    if instant.tzinfo is None:
        raise ValueError(f"a timezone-aware datetime is needed, got naive {instant!r}")
    return instant


def make_schedule(
    job: str,
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    tz: str = "UTC",
    payload: Mapping[str, Any] | None = None,
    name: str | None = None,
    missed: str = "once",
) -> Schedule:
    """Validate everything that does not need the app's job list (``build_schedule``, the
    runtime schedules' validation too); raise ``ConfigError``."""
    label = name or job
    try:
        checked = build_schedule(
            label, job, cron=cron, every=every, tz=tz, payload=payload, missed=missed
        )
    except InvalidValueError as exc:
        raise ConfigError(str(exc)) from None
    return Schedule(
        job=job,
        name=label,
        cron=cron,
        every=None if checked.every_s is None else timedelta(seconds=checked.every_s),
        tz=tz,
        payload=checked.payload,
        missed="skip" if checked.missed == "skip" else "once",
    )


def check_schedules(schedules: Iterable[Schedule], job_names: Iterable[str]) -> None:
    """What needs the whole app: every job registered, every name unique."""
    known = set(job_names)
    seen: set[str] = set()
    for s in schedules:
        if s.job not in known:
            raise ConfigError(
                f"schedule {s.name!r} names job {s.job!r}, which is not registered "
                f"(known: {', '.join(sorted(known)) or 'none'})"
            )
        if s.name in seen:
            raise ConfigError(f"two schedules are named {s.name!r}: give one a name= of its own")
        seen.add(s.name)


def from_runtime(stored: Any) -> Schedule:
    """A runtime schedule (``leveret.producers.RuntimeSchedule``) as the leader's ``Schedule``,
    validated like ``worker.schedule`` (``ConfigError``): a stored definition is data."""
    return make_schedule(
        stored.job,
        cron=stored.cron,
        every=stored.every_s,
        tz=stored.tz,
        payload=stored.payload,
        name=stored.name,
        missed=stored.missed,
    )
