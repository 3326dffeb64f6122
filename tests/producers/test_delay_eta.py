"""``delay=`` (seconds or timedelta) and ``eta=`` (aware datetime) on the publisher.

The rules are checked without a broker (``delay_seconds`` and a publisher that was never
connected: the check must come before anything is sent); what they mean on the wire is checked
on the real broker.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import aio_pika
import pytest

from leveret.producers import BlockingPublisher, Job, Publisher
from leveret.producers.publisher import delay_seconds
from leveret.topology import InvalidDelayError, Topology, WorkQueue, declare
from leveret.topology.delay import MAX_DELAY_S, MAX_LATENESS_S
from tests.support import Broker, unique

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_a_timedelta_is_its_seconds_and_a_number_stays_one() -> None:
    assert delay_seconds(timedelta(minutes=2, milliseconds=500)) == 120.5
    assert delay_seconds(7) == 7.0
    assert delay_seconds(None, None) is None
    assert delay_seconds(timedelta(days=366)) == 366 * 86_400


def test_an_eta_is_the_time_left_until_it_in_any_zone() -> None:
    paris = datetime(2026, 3, 1, 13, 0, 30, tzinfo=ZoneInfo("Europe/Paris"))  # 12:00:30Z
    assert delay_seconds(eta=paris, now=NOW) == 30.0
    plus_one = datetime(2026, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=1)))  # 13:00Z
    assert delay_seconds(eta=plus_one, now=NOW) == 3600.0
    assert delay_seconds(eta=NOW + timedelta(days=366), now=NOW) == 366 * 86_400


def test_an_eta_already_past_runs_now() -> None:
    assert delay_seconds(eta=NOW - timedelta(hours=3), now=NOW) == 0.0


def test_a_naive_eta_is_refused_saying_why() -> None:
    with pytest.raises(InvalidDelayError, match="no time zone"):
        delay_seconds(eta=datetime(2027, 1, 1, 9, 0))


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(InvalidDelayError, match="0 or more seconds"):
        delay_seconds(-1)
    with pytest.raises(InvalidDelayError, match="0 or more seconds"):
        delay_seconds(timedelta(seconds=-0.5))


def test_delay_and_eta_together_are_refused() -> None:
    with pytest.raises(InvalidDelayError, match="not both"):
        delay_seconds(5, NOW)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": MAX_DELAY_S + 1},
        {"delay": timedelta(days=400)},
        {"eta": NOW + timedelta(days=389)},
    ],
)
def test_past_the_horizon_is_refused_naming_it(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidDelayError, match="about 388 days"):
        delay_seconds(**kwargs, now=NOW)  # type: ignore[arg-type]


def test_the_horizon_itself_is_accepted() -> None:
    assert delay_seconds(MAX_DELAY_S) == MAX_DELAY_S
    assert delay_seconds(eta=NOW + timedelta(seconds=MAX_DELAY_S), now=NOW) == MAX_DELAY_S


def test_a_wrong_type_is_refused() -> None:
    with pytest.raises(InvalidDelayError, match="aware datetime"):
        delay_seconds(eta="2027-01-01T09:00:00+01:00")  # type: ignore[arg-type]
    with pytest.raises(InvalidDelayError, match="number of seconds"):
        delay_seconds("30")  # type: ignore[arg-type]


async def test_publish_and_publish_many_check_before_sending() -> None:
    """A publisher never connected raises the delay error, not 'not connected'."""
    pub = Publisher("amqp://guest:guest@127.0.0.1:1/")
    with pytest.raises(InvalidDelayError, match="no time zone"):
        await pub.publish("j", {}, eta=datetime(2027, 1, 1))
    with pytest.raises(InvalidDelayError, match="not both"):
        await pub.publish("j", {}, delay=1, eta=NOW)
    with pytest.raises(InvalidDelayError, match="0 or more"):
        await pub.publish_many([Job(job="j", payload={}), Job(job="j", payload={}, delay=-2)])
    with pytest.raises(InvalidDelayError, match="388 days"):
        await pub.publish_many([Job(job="j", payload={}, delay=timedelta(days=500))])


async def _declare(broker: Broker) -> tuple[str, str]:
    queue = unique("eta")
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, Topology(queues=(WorkQueue(name=queue, jobs=(f"{queue}-j",)),)))
    finally:
        await connection.close()
    return queue, f"{queue}-j"


async def _arrivals(broker: Broker, queue: str, n: int, timeout: float) -> dict[str, float]:
    """Take ``n`` messages off ``queue``: id -> wall-clock arrival."""
    got: dict[str, float] = {}
    connection = await aio_pika.connect(broker.url)
    try:
        q = await (await connection.channel()).get_queue(queue)
        deadline = time.monotonic() + timeout
        while len(got) < n:
            assert time.monotonic() < deadline, f"only {sorted(got)} arrived within {timeout} s"
            message = await q.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.01)
            else:
                got[message.message_id or ""] = time.time()
    finally:
        await connection.close()
    return got


async def test_eta_timedelta_and_past_eta_on_the_broker(broker: Broker) -> None:
    """An eta 2 s ahead (in a +01:00 zone) and a 1.5 s timedelta land inside their bounds; a
    past eta arrives at once; publish_many carries per-item eta and delay."""
    queue, job = await _declare(broker)
    zone = timezone(timedelta(hours=1))
    async with Publisher(broker.url) as pub:
        sent = time.time()
        eta = datetime.fromtimestamp(sent + 2, zone)
        await pub.publish(job, {}, eta=eta, job_id="eta")
        await pub.publish(job, {}, delay=timedelta(seconds=1.5), job_id="td")
        await pub.publish(job, {}, eta=datetime.now(UTC) - timedelta(days=1), job_id="past")
        await pub.publish_many(
            [
                Job(job=job, payload={}, eta=eta, job_id="many-eta"),
                Job(job=job, payload={}, delay=timedelta(seconds=1.5), job_id="many-td"),
            ]
        )
    got = await _arrivals(broker, queue, 5, 10)
    assert got["past"] - sent < 0.5
    for name, due in (("eta", eta.timestamp()), ("many-eta", eta.timestamp()),
                      ("td", sent + 1.5), ("many-td", sent + 1.5)):  # fmt: skip
        assert 0 <= got[name] - due < MAX_LATENESS_S + 0.1, (name, got[name] - due)


async def test_the_blocking_facade_takes_an_eta(broker: Broker) -> None:
    queue, job = await _declare(broker)

    def sync_code() -> float:
        with BlockingPublisher(broker.url) as pub:
            with pytest.raises(InvalidDelayError, match="no time zone"):
                pub.publish(job, {}, eta=datetime(2027, 1, 1))
            sent = time.time()
            pub.publish(job, {}, eta=datetime.fromtimestamp(sent + 1, UTC), job_id="b")
            return sent

    sent = await asyncio.to_thread(sync_code)
    got = await _arrivals(broker, queue, 1, 10)
    assert 0 <= got["b"] - (sent + 1) < MAX_LATENESS_S + 0.1
