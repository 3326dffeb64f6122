"""``producers.broker.adapter``, the one module below aiormq's and aio-pika's public API: the
installed versions have what it relies on, and when they do not, a confirmed batch still keeps its
guarantee through the public ``basic_publish`` (real broker: an unroutable job and nacks).

In ``scripts/floors.sh``'s subset (all of ``tests/producers``), so it runs on the floor aiormq and
aio-pika as well as the newest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from pamqp.commands import Basic
from structlog.testing import capture_logs

from leveret.producers.broker import adapter as amqp
from leveret.producers.broker.batch import BatchPublishError, publish_batch
from leveret.producers.broker.confirm import publish_confirmed
from leveret.producers.broker.connection import FailoverRobustConnection
from leveret.producers.errors import InvalidMessageError, RefusedError, UnroutableError
from leveret.producers.wire.message import job_properties
from tests.support import Broker, unique

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class _Item:
    job: str
    job_id: str
    body: bytes
    properties: Basic.Properties
    exchange: str
    routing_key: str


def _item(routing_key: str, job_id: str) -> _Item:
    properties = Basic.Properties(delivery_mode=2, message_id=job_id, message_type="j")
    return _Item("j", job_id, b"{}", properties, "", routing_key)


async def _confirming(connection: AbstractConnection) -> aiormq.abc.AbstractChannel:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    return await channel.get_underlay_channel()


@pytest.fixture
def public_path(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The adapter looks for an internal this aiormq lacks (as after a rename), so it falls
    back; the frames path must not be touched. Yields the names of the publishes made."""
    monkeypatch.setattr(amqp, "_INTERNALS", (*amqp._INTERNALS, ("renamed_in_aiormq_9", dict)))
    monkeypatch.setattr(amqp, "_warned", set())

    def refuse(*_: object) -> None:
        raise AssertionError("the frames path ran though its internals are missing")

    monkeypatch.setattr(amqp.Outbox, "add", refuse)
    published: list[str] = []
    real = aiormq.Channel.basic_publish

    async def counting(self: aiormq.Channel, body: bytes, **kwargs: object) -> object:
        properties = kwargs["properties"]
        assert isinstance(properties, Basic.Properties)
        published.append(str(properties.message_id))
        return await real(self, body, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(aiormq.Channel, "basic_publish", counting)
    return published


def test_the_installed_aiormq_and_aio_pika_have_what_the_adapter_relies_on() -> None:
    """On this aiormq (floor or newest) a channel offers every internal the frames path uses,
    and aio-pika the reconnect hook: the fast paths are the ones in use, not the fallbacks."""
    names = {name for name, _ in amqp._INTERNALS}
    assert names == {
        "write_queue",
        "delivery_tag",
        "confirmations",
        "message_id_delivery_tag",
        "_Channel__lock",
    }
    assert amqp.transport_hook_supported()


async def test_a_real_channel_takes_the_frames_path(connection: AbstractConnection) -> None:
    """Detection says yes on a real confirming channel and logs nothing."""
    channel = await _confirming(connection)
    with capture_logs() as logs:
        assert amqp.frames_supported(channel)
    assert logs == []


async def test_without_the_internals_a_batch_keeps_its_guarantee(
    broker: Broker, connection: AbstractConnection, public_path: list[str]
) -> None:
    """Through ``basic_publish`` per message: of 10 jobs for a queue holding 4 that rejects
    the rest, 4 land and 6 are ``RefusedError``; 2 unroutable jobs are ``UnroutableError``; one
    AMQP cannot carry is ``InvalidMessageError`` and not sent. Every id is confirmed or named,
    the confirmed ones are in the queue, and the fallback is logged once over two batches."""
    full = unique("adapter-full")
    setup = await connection.channel()
    await setup.declare_queue(
        full, auto_delete=True, arguments={"x-max-length": 4, "x-overflow": "reject-publish"}
    )
    nobody = unique("adapter-nobody")
    items = [_item(full, f"full-{i}") for i in range(10)]
    items[3:3] = [_item(nobody, "nobody-1")]
    items[7:7] = [_item(nobody, "nobody-2"), _item(full, "x" * 300)]
    channel = await _confirming(connection)
    with capture_logs() as logs:
        with pytest.raises(BatchPublishError) as info:
            await publish_batch(channel, items, timeout=10)
        with pytest.raises(BatchPublishError):  # the queue is full: refused, and still one log
            await publish_batch(channel, [_item(full, "late")], timeout=10)
    err = info.value
    assert set(err.landed) | set(err.errors) == {item.job_id for item in items}
    assert not set(err.landed) & set(err.errors)
    refused = {i for i, e in err.errors.items() if isinstance(e, RefusedError)}
    assert len(err.landed) == 4 and len(refused) == 6
    assert {i for i, e in err.errors.items() if isinstance(e, UnroutableError)} == {
        "nobody-1",
        "nobody-2",
    }
    assert isinstance(err.errors["x" * 300], InvalidMessageError)
    # Each job that could be sent, in order (the invalid one never is), then the second batch.
    assert public_path == [i.job_id for i in items if i.job_id != "x" * 300] + ["late"]
    got = [m["properties"]["message_id"] for m in broker.get_messages(full, 20)]
    assert sorted(got) == sorted(err.landed)
    warned = [entry for entry in logs if entry["event"] == "amqp_frames_path_unavailable"]
    assert len(warned) == 1 and warned[0]["missing"] == ["renamed_in_aiormq_9"]


async def test_without_the_internals_a_single_publish_keeps_its_errors(
    broker: Broker, connection: AbstractConnection, public_path: list[str]
) -> None:
    """``publish_confirmed`` on the fallback: a confirmed publish is in its queue, one no queue
    takes is ``UnroutableError`` named after its job."""
    queue = unique("adapter-one")
    await (await connection.channel()).declare_queue(queue, auto_delete=True)
    channel = await _confirming(connection)
    one = job_properties("resize", "one-1")
    await publish_confirmed(
        channel, b"{}", exchange="", routing_key=queue, properties=one, timeout=10
    )
    two, nobody = job_properties("resize", "one-2"), unique("nobody")
    with pytest.raises(UnroutableError) as caught:
        await publish_confirmed(
            channel, b"{}", exchange="", routing_key=nobody, properties=two, timeout=10
        )
    assert caught.value.job == "resize"
    assert public_path == ["one-1", "one-2"]
    assert await broker.depth(queue) == 1


async def test_without_the_reconnect_hook_a_failover_connection_still_connects(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aio-pika without the per-attempt hook: the connection still opens (to the first
    node), and a warning says reconnects stay on that node, once."""
    monkeypatch.setattr(amqp, "transport_hook_supported", lambda: False)
    monkeypatch.setattr(amqp, "_warned", set())
    with capture_logs() as logs:
        for _ in range(2):
            conn = FailoverRobustConnection([broker.url], 0, unique("key"))
            try:
                await conn.connect(timeout=5)
                assert not conn.is_closed
            finally:
                await conn.close()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "amqp_reconnect_hook_unavailable"
    ]


# The private names of aiormq and aio-pika the adapter owns; a use anywhere else is a bug.
_PRIVATE = re.compile(
    r"_Channel__|_RobustConnection__|_Connection__|\bwrite_queue\b|message_id_delivery_tag"
    r"|\.delivery_tag\s*[-+]?=|\.confirmations\b"
)


def test_no_other_module_reaches_into_aiormq_or_aio_pika() -> None:
    """Outside ``producers/broker/adapter.py``, no runtime module names an aiormq or aio-pika
    internal."""
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in ("producers", "consumer", "topology")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "producers" / "broker" / "adapter.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _PRIVATE.search(line.split("#")[0])
    ]
    assert offenders == []
