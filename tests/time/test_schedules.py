"""Schedules as data: validation when the app loads, tick times, DST in Europe/Paris."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from leveret.consumer.errors import ConfigError
from leveret.consumer.features.schedules.spec import check_schedules, format_tick, make_schedule


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def _ticks(schedule_kwargs: dict[str, object], start: datetime, n: int) -> list[str]:
    s = make_schedule("cleanup", **schedule_kwargs)  # type: ignore[arg-type]
    out, t = [], start
    for _ in range(n):
        t = s.next_after(t)
        out.append(format_tick(t))
    return out


def test_spring_forward_fires_the_missing_0230_once_at_0300_local() -> None:
    """2027-03-28 Paris skips 02:00-03:00: the daily 02:30 fires at 03:00 CEST (01:00Z)."""
    ticks = _ticks({"cron": "30 2 * * *", "tz": "Europe/Paris"}, _utc(2027, 3, 26, 12), 3)
    assert ticks == ["2027-03-27T01:30:00Z", "2027-03-28T01:00:00Z", "2027-03-29T00:30:00Z"]


def test_fall_back_fires_the_doubled_0230_once_at_its_first_occurrence() -> None:
    """2027-10-31 Paris has 02:30 twice: fired once, at 02:30 CEST (00:30Z), not at 01:30Z."""
    ticks = _ticks({"cron": "30 2 * * *", "tz": "Europe/Paris"}, _utc(2027, 10, 30, 12), 3)
    assert ticks == ["2027-10-31T00:30:00Z", "2027-11-01T01:30:00Z", "2027-11-02T01:30:00Z"]
    s = make_schedule("cleanup", cron="30 2 * * *", tz="Europe/Paris")
    # Asked from inside the second pass (02:20 CET = 01:20Z), the next is the next day's.
    assert s.next_after(_utc(2027, 10, 31, 1, 20)) == _utc(2027, 11, 1, 1, 30)


def test_a_wildcard_cron_keeps_its_interval_through_a_repeated_hour() -> None:
    ticks = _ticks({"cron": "*/15 * * * *", "tz": "Europe/Paris"}, _utc(2027, 10, 31, 0, 20), 8)
    assert (
        ticks
        == [f"2027-10-31T{h:02d}:{m:02d}:00Z" for h in (0, 1, 2) for m in (0, 15, 30, 45)][2:10]
    )


def test_every_is_aligned_to_the_epoch_so_replicas_agree() -> None:
    s = make_schedule("hb", every=timedelta(seconds=30))
    assert s.next_after(_utc(2027, 1, 4, 6, 0, 7)) == _utc(2027, 1, 4, 6, 0, 30)
    assert s.next_after(_utc(2027, 1, 4, 6, 0, 30)) == _utc(2027, 1, 4, 6, 1, 0)
    assert s.latest_at_or_before(_utc(2027, 1, 4, 6, 0, 59)) == _utc(2027, 1, 4, 6, 0, 30)
    assert make_schedule("hb", every=7).next_after(_utc(1970, 1, 1)) == _utc(1970, 1, 1, 0, 0, 7)
    s = make_schedule("hb", every=1)
    assert s.ticks_between(_utc(2027, 1, 1), _utc(2027, 1, 1, 0, 0, 3)) == [
        _utc(2027, 1, 1, 0, 0, k) for k in (1, 2, 3)
    ]


def test_latest_tick_of_a_cron_in_a_zone() -> None:
    s = make_schedule("cleanup", cron="0 6 * * MON", tz="Europe/Paris")
    assert s.latest_at_or_before(_utc(2027, 1, 6)) == _utc(2027, 1, 4, 5, 0)
    assert s.latest_at_or_before(_utc(2027, 1, 4, 5, 0)) == _utc(2027, 1, 4, 5, 0)


def test_the_job_id_names_the_tick_in_utc() -> None:
    s = make_schedule("cleanup", cron="0 7 * * *", tz="Europe/Paris")
    tick = s.next_after(_utc(2027, 1, 4))
    assert s.job_id(tick) == "cleanup@2027-01-04T06:00:00Z"
    assert (
        make_schedule("x", every=0.5, name="hb").job_id(
            _utc(2027, 1, 1) + timedelta(milliseconds=500)
        )
        == "hb@2027-01-01T00:00:00.5Z"
    )


def test_defaults_name_payload_missed() -> None:
    s = make_schedule("cleanup", cron="*/15 * * * *")
    assert (s.name, dict(s.payload), s.missed, s.tz) == ("cleanup", {}, "once", "UTC")
    assert s.expression == "*/15 * * * *"
    assert make_schedule("x", every=30).expression == "every 30s"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "61 * * * *"}, "bad cron expression"),
        ({"cron": "* * *"}, "5 fields"),
        ({"cron": "0 0 31 2 *"}, "bad cron expression"),
        ({"cron": "* * * * *", "tz": "Europe/Pariss"}, "unknown time zone"),
        ({"cron": "* * * * *", "every": 5}, "exactly one"),
        ({}, "exactly one"),
        ({"every": 0}, "positive"),
        ({"every": -1}, "positive"),
        ({"every": timedelta(0)}, "positive"),
        ({"every": "5"}, "seconds or a timedelta"),
        ({"every": 5, "missed": "all"}, "missed="),
        ({"every": 5, "name": "a b"}, "not valid"),
    ],
)
def test_bad_schedules_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_schedule("cleanup", **kwargs)  # type: ignore[arg-type]


def test_unknown_jobs_and_duplicate_names_are_refused_with_the_app() -> None:
    a = make_schedule("cleanup", every=5)
    check_schedules([a, make_schedule("cleanup", every=5, name="other")], ["cleanup"])
    with pytest.raises(ConfigError, match="not registered"):
        check_schedules([make_schedule("nope", every=5)], ["cleanup"])
    with pytest.raises(ConfigError, match="two schedules are named 'cleanup'"):
        check_schedules([a, make_schedule("cleanup", cron="* * * * *")], ["cleanup"])
