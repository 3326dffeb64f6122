"""``LEVERET_AMQP_URL`` naming several nodes: parsing, masking, connecting to one that answers,
and a robust connection failing over to the next node when its node goes away.

The failover tests use the shared broker twice: once directly, once through a small TCP proxy
of our own that we can close (closing the proxy is a node going away, without touching the
broker).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from yarl import URL

from leveret.consumer.ops.management import ManagementTarget, amqp_vhost
from leveret.producers import ConnectionSettings
from leveret.producers.broker.connection import (
    FailoverRobustConnection,
    connect,
    connected_url,
    mask_secrets,
    mask_url,
    node_urls,
    split_urls,
)
from leveret.producers.errors import BrokerUnavailable
from tests.support import Broker

CLOSED = "amqp://guest:Cl0sed-pw@127.0.0.1:1/"


def test_split_and_validate_a_node_list() -> None:
    value = " amqp://u:p@a:5701/vh , amqps://u:p@b:5702/vh,"
    assert split_urls(value) == ["amqp://u:p@a:5701/vh", "amqps://u:p@b:5702/vh"]
    assert node_urls(value) == ["amqp://u:p@a:5701/vh", "amqps://u:p@b:5702/vh"]
    assert node_urls("amqp://u:p@a/") == ["amqp://u:p@a/"]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("amqp://u:S3cret@a/,http://u:S3cret@b/", "entry 2 of 2"),
        ("amqp://u:S3cret@a/,not a url", "entry 2 of 2"),
        ("amqp://u:S3cret@a/one,amqp://u:S3cret@b/two", "different vhosts"),
        (" , ", "empty"),
    ],
)
def test_a_bad_entry_is_named_and_masked(value: str, words: str) -> None:
    with pytest.raises(BrokerUnavailable) as err:
        node_urls(value)
    assert words in str(err.value)
    assert "S3cret" not in str(err.value)


def test_masking_covers_every_url_of_a_list() -> None:
    value = "amqp://u:Pw-One@a:5701/,amqp://v:Pw-Two@b:5702/"
    assert mask_url(value) == "amqp://u:******@a:5701/,amqp://v:******@b:5702/"
    text = "lost amqp://v:Pw-Two@b:5702/ then amqp://u:Pw-One@a:5701/"
    masked = mask_secrets(text, value)
    assert "Pw-One" not in masked and "Pw-Two" not in masked
    assert masked == "lost amqp://v:******@b:5702/ then amqp://u:******@a:5701/"


def test_the_vhost_of_a_list_is_its_nodes_vhost() -> None:
    assert amqp_vhost("amqp://u:p@a/prod,amqp://u:p@b/prod") == "prod"


async def test_a_closed_first_node_fails_over_to_the_second(broker: Broker) -> None:
    """Whatever node ``connect`` starts from (random), it ends on the one that answers, and the
    default management URL follows it."""
    good = broker.url
    value = f"{URL(good).with_port(1)},{good}"
    settings = ConnectionSettings(amqp_url=value, connect_timeout=5)
    for robust in (False, True, False, True):
        conn = await connect(settings, robust=robust)  # type: ignore[call-overload]
        try:
            assert not conn.is_closed
            assert connected_url(value) == good
            ch = await conn.channel()
            await ch.close()
        finally:
            await conn.close()
    target = ManagementTarget.from_settings(settings)
    assert target.base == f"http://{broker.host}:{broker.mgmt_port}"
    assert target.vhost == broker.vhost


async def test_no_node_answering_names_every_node_masked() -> None:
    other = "amqp://guest:Cl0sed-pw@127.0.0.1:2/"
    settings = ConnectionSettings(amqp_url=f"{CLOSED},{other}", connect_timeout=3)
    with pytest.raises(BrokerUnavailable) as err:
        await connect(settings, robust=False)
    message = str(err.value)
    assert "none of the 2 nodes answered" in message
    assert "127.0.0.1:1/" in message and "127.0.0.1:2/" in message
    assert "Cl0sed-pw" not in message


class _Proxy:
    """A TCP proxy to the shared broker that we can shut, like a node going away."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.pipes.add(task)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        for t in self.pipes:
            t.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)


async def test_a_robust_connection_reconnects_to_the_next_node(broker: Broker) -> None:
    """Connected through node 0 (the proxy); node 0 goes away; the robust connection comes back
    on node 1 by itself, and a channel on it works again."""
    good = broker.url
    proxy = _Proxy(broker.amqp_port)
    port = await proxy.start()
    via_proxy = str(URL(good).with_port(port))
    key = f"{via_proxy},{good}"
    conn = FailoverRobustConnection([via_proxy, good], 0, key, reconnect_interval=0.2)
    try:
        await conn.connect(timeout=5)
        assert conn.url.port == port
        assert connected_url(key) == via_proxy
        channel = await conn.channel()
        reconnected = asyncio.Event()
        conn.reconnect_callbacks.add(lambda *_: reconnected.set())
        await proxy.stop()
        await asyncio.wait_for(reconnected.wait(), 20)
        assert conn.url.port == broker.amqp_port
        assert connected_url(key) == good
        queue = await channel.declare_queue(exclusive=True)  # the restored channel works
        assert queue.name
    finally:
        await conn.close()
