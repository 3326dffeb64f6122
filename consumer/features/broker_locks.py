"""Job locks on the broker alone: ``lock=`` with no ``LEVERET_STATUS_URL``.

**The mechanism: one exclusive queue per held key.** Holding key ``K`` is having declared the
queue ``<exchange>.lock.<digest of K>`` *exclusive* on this worker's lock connection; releasing
it is deleting that queue. Checked on RabbitMQ 3.10 (tests/coordination/test_broker_locks.py):

* Another connection that declares the same queue (actively or passively) is refused with
  ``RESOURCE_LOCKED`` (405): the key is held. The broker decides, atomically, so two workers
  racing for a free key cannot both win.
* The broker deletes a connection's exclusive queues the moment that connection ends. A holder
  that is SIGKILLed (its socket closes) frees its keys at once: measured 0.07 s. A holder whose
  host freezes or drops off the network keeps its socket open; the broker notices through the
  AMQP heartbeat, two to three heartbeat intervals after the last frame it got (measured with
  a SIGSTOPped holder: 6.0, 12.0 and 18.1 s for heartbeats of 2, 4 and 6 s at worst). The lock
  connection therefore asks for a heartbeat of ``LEVERET_LOCK_TTL / 4`` (whole seconds, at
  least 1): a dead holder's key is free within three quarters of ``LEVERET_LOCK_TTL`` (45 s
  for the default 60), or within 3 s for a TTL under 4 s (the shortest heartbeat is 1 s).
* Declaring an exclusive queue that the *same* connection already owns succeeds. So the broker
  cannot keep two runs of one process apart: the keys this process holds (or is taking, or is
  still releasing) are kept here too, and a second run of the process on a held key is refused
  without asking the broker.

**Channels.** A 405 closes the channel it came on, so each declare or delete runs on a channel
of its own, taken from a pool of idle ones (at most ``MAX_CHANNELS`` in use at once): a refused
declare loses only its own channel, which is dropped; an idle channel found closed is replaced
and its call retried once. One channel per attempt (open, declare, close) was measured too: a
round trip more per lock; one shared channel serialises every declare (one RPC at a time per
channel in aiormq) and loses every in-flight call to one 405. Queue creation is the broker's
cost: ~3 ms for a declare and ~1.5 ms for a delete on RabbitMQ 3.10 (a Mnesia write each),
which is why calls run in parallel on several channels (168 declare+delete pairs/s on one
channel, 781/s on 32, same broker). The broker logs every refused declare as an error: a key
it refused is taken as held, without asking again, for ``REFUSED_FOR_S`` (the waiters' poll
interval), so the runs of a process waiting for one key cost one refusal per interval.

**Renewal, loss.** There is no lease to renew: the hold lasts as long as the connection. A
renewal (every third of ``LEVERET_LOCK_TTL``, the ``Lease`` of ``locks``) checks that the
connection is the one the key was taken on and still open, and that the queue is still there
and ours (a passive declare: 404 or 405 mean it went behind our back, e.g. by an ``expires``
policy; no answer within ``check_timeout`` counts as lost too). When the lock connection
closes, every hold on it is lost at once: the runs are told then (``watch``: ``ctx.lock_lost``,
an ``async`` run cancelled), not at their next renewal.

A holder cut off from the broker (partition, frozen broker) may not see its connection close
before the broker frees its keys: the broker drops a silent client two to three heartbeats
after the last data it got (``rabbit_heartbeat``; measured from a SIGSTOP at random phases,
the client's last heartbeat up to 1 s before it: 4.2 to 5.8 s with a 2 s heartbeat, 1.1 to
3.0 s with 1 s), aiormq only after ``(heartbeat + 1) * 3``. So while the connection
holds keys, the store pings the broker (``basic.qos`` on a channel of its own, no state) every
``check_timeout`` (half a heartbeat, at least 0.5 s) and declares every hold on it lost, and
closes it, when a ping goes unanswered for as long: at most one heartbeat after the broker's
last answer, before the broker can free the keys. (A healthy broker answers in milliseconds;
one slower than half a heartbeat costs the runs their locks, retried, rather than risk an
overlap.) The next acquisition opens a new connection (at most one attempt a second while the
broker is unreachable; the runs are postponed meanwhile, like with Redis down), so a worker
whose session reconnected takes its locks on the new one, and a run still holding a key on the
old one has lost it.

The lock connection is the store's own, not the session's: the worker's connections keep the
heartbeat their URL gives (60 s by default, too slow for the TTL), and a channel error on them
(each 405 closes one) must never end a session.

**Fencing tokens.** Redis draws them from one global counter; the broker has no cheap counter.
A token here is the wall clock in microseconds, raised to one more than the process's last
token when the clock has not moved on: it only grows within a process, and across workers it
is ordered only as far as their clocks agree. Broker locks carry **no cross-worker fencing
guarantee**: a resource that refuses older tokens works with them only within that bound.

**Names.** The digest is 128 bits of BLAKE2b of the key, so the name has a fixed length; the
exchange part is cut to keep it within the broker's 255 bytes. Two keys (or two long exchange
names) that would share a queue only exclude each other more, never less. The queues live only
while a run holds them, belong to no topology, and have no ``.dlq`` beside them, so
``leveret status`` and ``leveret doctor`` leave them out; the management UI shows them as
exclusive queues of the connection named ``leveret-locks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiormq
import aiormq.abc
import structlog
from aio_pika.abc import AbstractConnection
from yarl import URL

from leveret.producers.stores import StatusStoreUnavailable

log = structlog.get_logger("leveret.worker")

LOCK_INFIX: Final = ".lock."
MAX_NAME_BYTES: Final = 255
# Declares and deletes in flight at once (each on its own channel).
MAX_CHANNELS: Final = 32
# A declare or delete unanswered this long: the broker is taken as unreachable.
CALL_TIMEOUT_S: Final = 10.0
# After a failed connect, acquisitions fail at once for this long instead of each trying.
RECONNECT_PAUSE_S: Final = 1.0
# A key refused by the broker is taken as still held elsewhere for this long (the waiters'
# poll interval, ``locks.POLL_S``): however many runs of this process wait for a key, the
# broker sees at most one refused declare per key per interval (each closes a channel and is
# logged by the broker as an error).
REFUSED_FOR_S: Final = 0.05
CONNECTION_NAME: Final = "leveret-locks"


def lock_queue_name(exchange: str, key: str) -> str:
    """``<exchange>.lock.<128-bit digest of key>``, within the broker's 255 bytes."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    room = MAX_NAME_BYTES - len(LOCK_INFIX) - len(digest)
    prefix = exchange.encode()[:room].decode(errors="ignore")
    return f"{prefix}{LOCK_INFIX}{digest}"


def lock_heartbeat(ttl_s: float) -> int:
    """The lock connection's heartbeat: the broker drops a silent holder two to three
    heartbeats after it last heard from it, within ¾ of the TTL."""
    return max(1, int(ttl_s // 4))


def lock_url(amqp_url: str, heartbeat: int) -> str:
    """``amqp_url`` (each node of a comma-separated list) with a heartbeat of at most
    ``heartbeat`` seconds, and named ``leveret-locks`` unless it names itself."""
    out = []
    for part in amqp_url.split(","):
        if not part.strip():
            continue
        url = URL(part.strip())
        given = url.query.get("heartbeat")
        try:
            current = int(given) if given is not None else 0
        except ValueError:
            current = 0
        query: dict[str, str] = {}
        if current <= 0 or current > heartbeat:
            query["heartbeat"] = str(heartbeat)
        if "name" not in url.query:
            query["name"] = CONNECTION_NAME
        out.append(str(url.update_query(query)) if query else str(url))
    return ",".join(out)


class _Link:
    """One lock connection and its idle channels; ``lost`` once it closed."""

    __slots__ = ("amq", "connection", "idle", "lost", "watchdog")

    def __init__(self, connection: AbstractConnection) -> None:
        transport = connection.transport
        assert transport is not None  # just connected
        self.connection = connection
        self.amq: aiormq.abc.AbstractConnection = transport.connection
        self.idle: list[aiormq.abc.AbstractChannel] = []
        self.lost = False
        self.watchdog: asyncio.Task[None] | None = None

    async def take(self) -> tuple[aiormq.abc.AbstractChannel, bool]:
        """An open channel, and whether it was idle (it may have closed since)."""
        while self.idle:
            channel = self.idle.pop()
            if not channel.is_closed:
                return channel, True
        return await self.amq.channel(publisher_confirms=False), False

    def give(self, channel: aiormq.abc.AbstractChannel) -> None:
        if not channel.is_closed and not self.lost:
            self.idle.append(channel)


class _Hold:
    """A key this process holds, is taking (``link`` None) or is releasing."""

    __slots__ = ("link", "on_lost", "owner", "queue", "token")

    def __init__(self, owner: str, queue: str) -> None:
        self.owner = owner
        self.queue = queue
        self.token = 0
        self.link: _Link | None = None
        self.on_lost: Callable[[str], None] | None = None


class BrokerLocks:
    """The ``LockStore`` of a worker without Redis (see the module docstring).

    ``connect`` opens the lock connection (``lock_url``'s heartbeat); it is called on the
    first acquisition and again after the connection was lost.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[AbstractConnection]],
        exchange: str,
        *,
        heartbeat_s: float = 15.0,
        max_channels: int = MAX_CHANNELS,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        self._connect = connect
        self.exchange = exchange
        self.heartbeat_s = heartbeat_s
        self.check_timeout = max(0.5, heartbeat_s / 2)
        self._call_timeout = call_timeout_s
        self._held: dict[str, _Hold] = {}
        self._refused: dict[str, float] = {}  # key -> when the broker last refused it
        self._link: _Link | None = None
        self._linking: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._max_channels = max_channels
        self._failed: tuple[float, str] | None = None  # (when, why) of the last failed connect
        self._last_token = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._warned_at = 0.0

    @property
    def held(self) -> frozenset[str]:
        """The keys this process holds, takes or releases right now."""
        return frozenset(self._held)

    def queue(self, key: str) -> str:
        return lock_queue_name(self.exchange, key)

    # -- LockStore ---------------------------------------------------------------------------

    async def acquire(self, key: str, owner: str, ttl_s: float) -> int | None:
        if key in self._held:
            return None  # held (or being taken or released) by a run of this process
        refused = self._refused.get(key)
        if refused is not None and time.monotonic() - refused < REFUSED_FOR_S:
            return None  # refused a moment ago: held elsewhere
        hold = self._held[key] = _Hold(owner, self.queue(key))
        try:
            link = await self._current()
        except BaseException:
            self._forget(key, hold)
            raise
        call = asyncio.ensure_future(self._call(link, "declare", hold.queue))
        try:
            async with asyncio.timeout(self._call_timeout):
                taken = await asyncio.shield(call)
        except (asyncio.CancelledError, TimeoutError) as exc:
            # The declare may still succeed: the queue would be ours with no run to delete it.
            call.add_done_callback(functools.partial(self._undo, key, hold, link))
            if isinstance(exc, TimeoutError):
                raise StatusStoreUnavailable(
                    f"broker lock store: no answer to a declare in {self._call_timeout:g} s"
                ) from None
            raise
        except BaseException:
            self._forget(key, hold)
            raise
        if not taken:
            self._forget(key, hold)
            self._note_refused(key)
            return None
        if refused is not None:
            self._refused.pop(key, None)
        if link.lost:  # the connection died right after: the queue went with it
            self._forget(key, hold)
            raise StatusStoreUnavailable("broker lock store: the lock connection closed")
        hold.link = link
        hold.token = self._next_token()
        return hold.token

    async def renew(self, key: str, owner: str, token: int, ttl_s: float) -> bool:
        hold = self._held.get(key)
        if hold is None or hold.owner != owner or hold.token != token:
            return False
        link = hold.link
        if link is None or link.lost:
            return False
        try:
            async with asyncio.timeout(self.check_timeout):
                return await self._call(link, "check", hold.queue)
        except TimeoutError:
            return False  # the broker silent: given up before it frees the key (docstring)
        except Exception:
            if _gone(link):  # the connection closed meanwhile
                return False
            raise

    async def release(self, key: str, owner: str, token: int) -> None:
        await self.release_soon(key, owner, token)

    def release_soon(self, key: str, owner: str, token: int) -> asyncio.Future[Any]:
        """Delete the key's queue in the background; the key stays held in this process until
        the broker confirmed the delete (a declare overtaking it on another channel would be
        deleted with it)."""
        hold = self._held.get(key)
        if hold is None or hold.owner != owner or hold.token != token:
            return _done()
        hold.on_lost = None
        link = hold.link
        if link is None or link.lost:  # the queue went with its connection
            self._forget(key, hold)
            return _done()
        return self._background(self._delete(key, hold, link))

    def watch(self, key: str, owner: str, token: int, on_lost: Callable[[str], None]) -> None:
        """Call ``on_lost(why)`` when the hold's connection closes (not after its release)."""
        hold = self._held.get(key)
        if hold is None or hold.owner != owner or hold.token != token:
            return
        hold.on_lost = on_lost
        if hold.link is not None and hold.link.lost:
            asyncio.get_running_loop().call_soon(on_lost, "the broker lock connection closed")

    async def close(self) -> None:
        """Close the lock connection (the broker deletes its queues with it)."""
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            if link.watchdog is not None:
                link.watchdog.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.connection.close(), 5)
        # Deletes still in flight end with the connection (their queues went with it).
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=2)
            for task in pending:
                task.cancel()

    # -- the connection ----------------------------------------------------------------------

    async def _current(self) -> _Link:
        link = self._link
        if link is not None and not link.lost:
            return link
        if self._linking is None:
            self._linking = asyncio.Lock()
        async with self._linking:
            link = self._link
            if link is not None and not link.lost:
                return link
            if self._closed:
                raise StatusStoreUnavailable("broker lock store: closed")
            now = time.monotonic()
            if self._failed is not None and now - self._failed[0] < RECONNECT_PAUSE_S:
                raise StatusStoreUnavailable(f"broker lock store: {self._failed[1]}")
            try:
                connection = await self._connect()
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                self._failed = (now, why)
                raise StatusStoreUnavailable(f"broker lock store: {why}") from None
            self._failed = None
            link = self._link = _Link(connection)
            link.amq.closing.add_done_callback(functools.partial(self._closed_link, link))
            link.watchdog = asyncio.get_running_loop().create_task(self._watch(link))
            log.info("lock_store_connected", backend="broker", heartbeat_s=self.heartbeat_s)
            return link

    async def _watch(self, link: _Link) -> None:
        """While ``link`` holds keys, the broker must answer a ping (``basic.qos``, no state)
        every ``check_timeout`` within ``check_timeout``; if it does not, the holds are lost
        and the connection is closed. So a partitioned holder gives up at most a heartbeat
        after its last answer, before the broker frees its keys (two to three heartbeats
        after the last frame it got; module docstring)."""
        interval = self.check_timeout
        channel: aiormq.abc.AbstractChannel | None = None
        while not link.lost:
            await asyncio.sleep(interval)
            if not any(hold.link is link for hold in self._held.values()):
                continue
            try:
                async with asyncio.timeout(interval):
                    if channel is None or channel.is_closed:
                        channel = await link.amq.channel(publisher_confirms=False)
                    await channel.basic_qos(prefetch_count=0)
            except TimeoutError:
                if not _gone(link):
                    self._drop(link, f"the broker did not answer for {interval:g} s")
                    self._background(link.connection.close())
                return
            except Exception:
                channel = None  # the connection closed (then the loop ends), or the channel

    def _closed_link(self, link: _Link, closing: asyncio.Future[Any]) -> None:
        if not closing.cancelled():
            closing.exception()  # retrieved: the reason is logged by aiormq
        self._drop(link, "the broker lock connection closed")

    def _drop(self, link: _Link, why: str) -> None:
        """``link`` is gone: every hold on it is lost, its runs are told now."""
        if link.lost:
            return
        link.lost = True
        link.idle.clear()
        if link.watchdog is not None and link.watchdog is not asyncio.current_task():
            link.watchdog.cancel()
        if self._link is link:
            self._link = None
        if self._closed:
            return
        told = 0
        for hold in list(self._held.values()):
            if hold.link is link and hold.on_lost is not None:
                on_lost, hold.on_lost = hold.on_lost, None
                on_lost(why)
                told += 1
        log.warning("lock_store_connection_lost", backend="broker", why=why, holds_lost=told)

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, link: _Link, what: str, queue: str) -> bool:
        """``declare`` (false: held elsewhere), ``check`` (false: gone or not ours) or
        ``delete`` ``queue`` on a channel of its own; a reused channel that turns out closed
        is replaced and the call made once more."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_channels)
        async with self._slots:
            for last in (False, True):
                if link.lost:
                    raise StatusStoreUnavailable("broker lock store: the lock connection closed")
                try:
                    channel, reused = await link.take()
                except Exception as exc:
                    raise self._unavailable(link, exc) from None
                try:
                    if what == "declare":
                        # Classic whatever the vhost's default type (no exclusive quorum).
                        await channel.queue_declare(
                            queue, exclusive=True, arguments={"x-queue-type": "classic"}
                        )
                    elif what == "check":
                        await channel.queue_declare(queue, passive=True)
                    else:
                        await channel.queue_delete(queue)
                except aiormq.exceptions.ChannelLockedResource:
                    return False  # held by another connection; the broker closed the channel
                except aiormq.exceptions.ChannelNotFoundEntity as exc:
                    if what == "check":
                        return False  # deleted behind our back
                    raise self._unavailable(link, exc) from None
                except aiormq.exceptions.ChannelInvalidStateError as exc:
                    if reused and not last and not link.lost:
                        continue  # an idle channel closed meanwhile: once more on a new one
                    raise self._unavailable(link, exc) from None
                except aiormq.exceptions.AMQPError as exc:
                    raise self._unavailable(link, exc) from None
                link.give(channel)
                return True
        raise AssertionError("unreachable")  # pragma: no cover

    def _unavailable(self, link: _Link, exc: BaseException | None) -> StatusStoreUnavailable:
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "channel closed"
        now = time.monotonic()
        # Logged unless the connection is gone (said once by _lost), at most every 5 s: a
        # refused permission would repeat for every run.
        if not link.lost and not self._closed and now - self._warned_at >= 5:
            self._warned_at = now
            log.warning("lock_store_call_failed", backend="broker", error=why)
        return StatusStoreUnavailable(f"broker lock store: {why}")

    async def _delete(self, key: str, hold: _Hold, link: _Link) -> None:
        """Delete the key's queue (twice at most), then forget the hold."""
        try:
            for attempt in (1, 2):
                try:
                    async with asyncio.timeout(self._call_timeout):
                        await self._call(link, "delete", hold.queue)
                    return
                except Exception as exc:
                    if link.lost:
                        return  # the queue went with its connection
                    if attempt == 2:
                        # Left to this process: its next run on the key redeclares the queue
                        # (ours) and deletes it; other workers wait until then or our exit.
                        log.warning(
                            "job_lock_release_failed",
                            lock=key,
                            error=f"{type(exc).__name__}: {exc}",
                        )
        finally:
            self._forget(key, hold)

    def _undo(self, key: str, hold: _Hold, link: _Link, call: asyncio.Future[bool]) -> None:
        """An acquisition whose caller left (cancelled, timed out) before the broker answered:
        delete the queue if the declare succeeded, and forget the hold either way."""
        taken = not call.cancelled() and call.exception() is None and call.result()
        if taken and not link.lost and not self._closed:
            self._background(self._delete(key, hold, link))
        else:
            self._forget(key, hold)

    def _note_refused(self, key: str) -> None:
        now = time.monotonic()
        if len(self._refused) >= 4096:  # keys given up on: keep the recent ones
            self._refused = {k: t for k, t in self._refused.items() if now - t < REFUSED_FOR_S}
        self._refused[key] = now

    def _forget(self, key: str, hold: _Hold) -> None:
        if self._held.get(key) is hold:
            del self._held[key]

    def _background(self, coro: Any) -> asyncio.Future[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _next_token(self) -> int:
        """Wall-clock microseconds, made strictly growing within the process."""
        self._last_token = max(self._last_token + 1, time.time_ns() // 1000)
        return self._last_token


def _gone(link: _Link) -> bool:
    return link.lost


def _done() -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future
