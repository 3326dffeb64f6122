"""Coalesced acknowledgements: one ``basic.ack(multiple=True)`` for many finished jobs.

A job is marked done only after its outcome is durable (see ``settle``). Deliveries arrive in
delivery-tag order, so the acker keeps them in that order and, when it flushes (see
``Acker.__init__`` for when), acks the longest prefix of done tags with one frame. A done tag
behind a still-running job is acked on its own, so a long job never holds finished ones
hostage. A tag is never covered by a ``multiple`` ack before it is done: the prefix stops at
the first job still running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import aiormq
import structlog

log = structlog.get_logger("leveret.worker")

# A quiet loop turn with at most this many deliveries unacked means a lightly loaded worker:
# no batch worth waiting for is building up, so its acks go now instead of on the coalescing
# timer (a timer wakeup per job costs the loop more than the ack frame saved, and a latency
# tail follows it). Streaming workers never see a quiet turn, so their batching is unchanged.
LIGHT_LOAD = 4


class Acker:
    """Acks done tags in delivery order, many per frame (see the module docstring)."""

    def __init__(
        self, channel: aiormq.abc.AbstractChannel, *, prefetch: int = 0, max_delay_s: float = 0.0
    ) -> None:
        self._channel = channel
        # Flush once prefetch/4 jobs are done, or `max_delay_s` after the first unflushed one,
        # or after a loop turn in which no job finished or arrived while the prefetch window is
        # (nearly) full, i.e. when the broker is waiting for our acks to send more. While jobs
        # stream through, this turns ~7 jobs per ack frame into ~100s: each frame is a send()
        # syscall here and work for the broker, which on a small machine shares the CPUs; and
        # a worker whose slots are all taken (I/O-bound jobs) never idles on the timer.
        # Acking later is always safe; the worker drains on shutdown. prefetch < 8 (or 0):
        # batch 1, i.e. flush on every loop turn.
        self._batch = max(1, prefetch // 4)
        self._full_at = prefetch - self._batch
        self._max_delay_s = max_delay_s
        self._fresh = False
        self._first_done_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._flushes: set[asyncio.Task[None]] = set()
        # Every ack/nack frame is sent under this lock, in the order the bookkeeping changed.
        # aiormq's write queue is bounded, so a send can yield; without the lock a later flush's
        # `multiple` ack could overtake an earlier single ack (or nack) of a tag it covers, and
        # the broker closes the channel on the second one: "unknown delivery tag".
        self._send_lock = asyncio.Lock()

    def track(self, tag: int) -> None:
        self._order.append(tag)
        self._fresh = True  # deliveries still streaming in: not a quiet turn either

    def ack(self, tag: int) -> None:
        self._done.add(tag)
        self._fresh = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._first_done_at = self._loop.time()
            self._loop.call_soon(self._flush_when_quiet)
        elif self._timer is not None and len(self._done) >= self._batch:
            self._timer.cancel()
            self._start_flush()

    def _flush_when_quiet(self) -> None:
        waited = self._loop.time() - self._first_done_at
        if len(self._done) >= self._batch or waited >= self._max_delay_s:
            self._start_flush()
        elif self._fresh:  # jobs still finishing or arriving: look again next turn
            self._fresh = False
            self._loop.call_soon(self._flush_when_quiet)
        elif len(self._order) > self._full_at or len(self._order) <= LIGHT_LOAD:
            # Quiet, and either the window is full (the broker waits on us) or the worker is
            # lightly loaded (no batch is building up): ack now.
            self._start_flush()
        else:  # quiet, and nothing waits on these acks: send them by the deadline
            self._timer = self._loop.call_later(self._max_delay_s - waited, self._start_flush)

    async def drain(self) -> None:
        """Send every pending ack now: before a graceful close, so no finished job runs again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush_scheduled = False
        async with self._send_lock:
            await self._flush_locked()
            # Ack frames have no reply, and closing the connection may drop frames still in
            # aiormq's write queue. A passive declare answers only after the broker has read
            # every earlier frame on this channel: once it returns, the acks have landed.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._channel.exchange_declare("amq.direct", passive=True), 5
                )

    async def ack_now(self, tag: int) -> None:
        """Ack one tag now and return once the frame is written, not on the next loop turn."""
        async with self._send_lock:
            self._forget(tag)
            try:
                await self._channel.basic_ack(tag)
            except (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError):
                log.warning("ack_lost_channel_closed", jobs=1)  # requeued by the broker

    async def nack(self, tag: int, *, requeue: bool) -> None:
        async with self._send_lock:
            self._forget(tag)
            await self._channel.basic_nack(tag, requeue=requeue, wait=False)

    def _forget(self, tag: int) -> None:
        with contextlib.suppress(ValueError):
            self._order.remove(tag)

    def _start_flush(self) -> None:
        self._timer = None
        task = self._loop.create_task(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        self._flush_scheduled = False
        async with self._send_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        order, done = self._order, self._done
        last, count = 0, 0
        while order and order[0] in done:
            last = order.popleft()
            done.discard(last)
            count += 1
        singles = list(done)
        done.clear()
        for tag in singles:
            self._forget(tag)
        try:
            if count:
                await self._channel.basic_ack(last, multiple=count > 1, wait=False)
            for tag in singles:
                await self._channel.basic_ack(tag, wait=False)
        except (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError):
            # The channel is gone: the broker requeues these jobs and they run again.
            log.warning("ack_lost_channel_closed", jobs=count + len(singles))

    def settled(self, tag: int) -> bool:
        """True once ``tag`` is acked, marked done or nacked: its one outcome is decided."""
        return tag in self._done or tag not in self._order

    @property
    def closed(self) -> bool:
        """The consuming channel is gone: an ack or nack now could not be sent."""
        return bool(self._channel.is_closed)

    @property
    def in_flight(self) -> int:
        return len(self._order)
