"""Fire an app's schedules once per tick however many replicas run, through the broker only.

Leadership is RabbitMQ's *single active consumer*: every process consumes one durable queue,
``<exchange>.scheduler.<app>``, declared with ``x-single-active-consumer``; the broker delivers
to one consumer at a time and, when that consumer's channel dies (SIGKILL closes its socket),
hands its unacked messages to the next. The queue holds one *token* message whose JSON body is
the schedule state: the last fired tick per schedule, and a heartbeat (when a live leader last
wrote it).

* Whoever receives a token leads. It keeps the token unacked while it leads; nobody else can
  have it.
* To fire a tick: publish the job (confirms, mandatory, wire format of
  ``leveret.producers.wire.message``, job id ``<name>@<tick>``), then publish the updated token
  (confirmed), then ack the tokens it held. A crash between the two publishes leaves the old
  token, so the next leader publishes that tick again under the same id: at most one double
  publish per takeover. A crash between the new token and the ack leaves two tokens; the next
  leader merges them (newest tick per schedule) and acks both once it has written its own.
* Every ``heartbeat_s`` the leader rewrites the token with the time, so a successor can tell a
  takeover (it was standing by while the old leader lived: every tick due since is fired) from
  a time when nothing ran (the ticks between the last heartbeat and its own start are
  *missed*: ``missed="once"`` fires the most recent of them, under its own tick time;
  ``"skip"`` fires none).
* Bootstrap: a process that finds no ready message in the queue when it starts publishes an
  empty token. If a leader already holds the real one, the extra arrives at that leader (the
  active consumer), which merges it (nothing to take) and acks it; two processes bootstrapping
  at once give two tokens that the first leader merges the same way. A schedule the state does
  not know yet starts from "now": it does not fire its past.
* The state is per schedule name, and a leader writes back every name it merged, also those it
  does not know itself: replicas with different schedule sets (a rolling update) share one
  leader and one state, a schedule only the leader's set lacks keeps its last tick untouched and
  does not fire until a replica that knows it leads. When it does, a last tick that the previous
  leader's heartbeat passed by more than ``STALE_S`` tells it nobody fired that schedule since:
  its ticks up to now are *missed* (a rollback does not replay them all).
* The broker cancels every consumer of the queue when it is deleted (or its node fails): each
  process ends its session and declares and consumes again at once. A process that led carries
  its state into a token of its own (with the time it led until as heartbeat), so the state
  survives the queue; the next leader merges it like any extra token.
* The scheduler's connection asks for an AMQP heartbeat of ``AMQP_HEARTBEAT_S`` (1 s) when
  ``connect`` is a URL; a connection that negotiated a longer one (or none) is logged once as
  ``scheduler_heartbeat_too_long``. The broker closes a peer it has not heard from in about two
  heartbeats, so a leader whose host vanished (or whose process is frozen) loses the token after
  2-3 s and a standby fires the next tick within the 5 s takeover. The cost: a scheduler whose
  event loop is blocked for over ~2 s loses the lead too (a handover, no lost tick). A frozen
  leader that comes back finds its connection closed (the broker sent its FIN while it was
  frozen); nothing it writes reaches the broker, so it fires no tick twice, steps down and
  stands by. A crash between a job and its token leaves one tick to publish twice, as above.

The app identity (the queue's last word) is ``name`` when given, else ``default``
(``DEFAULT_APP``): the app is its exchange, every process publishing and consuming through one
exchange on one vhost is one app and shares one leader, whatever its schedule set, so old and new
replicas of a rolling update do not both fire. Two apps with their own schedules on one exchange
(each firing only its own) need a ``name=`` each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from pamqp.commands import Basic
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from yarl import URL

from leveret.consumer.errors import ConfigError
from leveret.consumer.features.schedules.spec import (
    Schedule,
    format_tick,
    from_runtime,
    parse_tick,
)
from leveret.producers import (
    DEFAULT_PUBLISH_TIMEOUT,
    PublishError,
    ScheduleStore,
    UnroutableError,
    per_registry,
)
from leveret.producers.broker import publish_confirmed
from leveret.producers.wire import (
    CONTENT_TYPE,
    PERSISTENT,
    encode_payload,
    job_properties,
)
from leveret.topology.delay import MAX_ROUTING_KEY
from leveret.topology.model import check_name

log = structlog.get_logger("leveret.scheduler")

Connect = Callable[[], Awaitable[AbstractConnection]]
_US = timedelta(microseconds=1)
TOKEN_TYPE = "leveret.scheduler.token"
# The app of a scheduler given no name: every process on one exchange is one app.
DEFAULT_APP = "default"
# The AMQP heartbeat (seconds) of the scheduler's own connection: the broker closes a peer it has
# not heard from in about two of them, which hands the token on when a host vanishes.
AMQP_HEARTBEAT_S = 1
# A live leader fires a tick within about a second; one that wrote a heartbeat this long after
# a schedule's next tick without firing it did not know that schedule (see ``_plan``).
STALE_S = 10.0
# Reconnecting after the broker cancelled our consumer (the queue was deleted): at once.
RECONSUME_S = 0.05
# How often a leader reads the runtime schedules (``leveret.producers.ScheduleStore``).
REFRESH_S = 1.0


class ConsumerCancelled(Exception):
    """The broker cancelled the scheduler's consumer (queue deleted, its node down)."""


def with_heartbeat(url: str, seconds: int = AMQP_HEARTBEAT_S) -> str:
    """``url`` asking for an AMQP heartbeat of ``seconds``, unless it already names one."""
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=seconds))


def scheduler_queue_name(exchange: str, app: str) -> str:
    return f"{exchange}.scheduler.{app}"


class SchedulerMetrics:
    """One set per registry, shared by every ``Scheduler`` on it: a worker run twice in one
    process (tests, an embedding app) must not register the gauge twice."""

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> SchedulerMetrics:
        return per_registry(registry if registry is not None else REGISTRY, cls)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge(
            "leveret_scheduler_leader",
            "1 while this process fires the app's schedules, else 0.",
            registry=registry,
        )
        self.ticks = Counter(
            "leveret_schedule_ticks_total",
            "Schedule ticks this process published.",
            ["schedule"],
            registry=registry,
        )


class Scheduler:
    """Takes part in leader election for ``schedules``; fires them while it leads.

    ``connect`` is a URL or a coroutine function returning a fresh connection; the scheduler
    owns the connections it opens (a dead session reconnects after ``reconnect_s``).
    """

    def __init__(
        self,
        connect: str | Connect,
        schedules: Sequence[Schedule],
        *,
        exchange: str = "jobs",
        name: str | None = None,
        registry: CollectorRegistry | None = None,
        heartbeat_s: float = 0.5,
        publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        reconnect_s: float = 1.0,
        queue_type: Literal["classic", "quorum"] = "classic",
        runtime: ScheduleStore | None = None,
    ) -> None:
        """``queue_type``: the election queue's type, the app's (``LEVERET_QUEUE_TYPE``): on a
        cluster a quorum election queue outlives the loss of the node a classic one lives on."""
        self.queue_type = queue_type
        if isinstance(connect, str):
            url = with_heartbeat(connect)
            self._connect: Connect = lambda: aio_pika.connect(url)
        else:
            self._connect = connect
        self.schedules = {s.name: s for s in schedules}
        if len(self.schedules) != len(schedules):
            raise ConfigError("two schedules share a name")
        # Runtime schedules (``producers.schedules``): read by the leader every REFRESH_S and
        # fired beside the app's own, which win a name clash.
        self._app_schedules = dict(self.schedules)
        self._runtime = runtime
        self._runtime_read = -1e9
        self._runtime_names: set[str] = set()
        self.exchange = exchange
        self.app = check_name("scheduler", name) if name else DEFAULT_APP
        self.queue = scheduler_queue_name(exchange, self.app)
        if len(self.queue.encode()) > MAX_ROUTING_KEY:
            raise ConfigError(f"scheduler queue name {self.queue!r} is over 255 bytes")
        self.heartbeat_s = heartbeat_s
        self.publish_timeout = publish_timeout
        self.reconnect_s = reconnect_s
        metrics = SchedulerMetrics.for_registry(registry)
        self._leader_gauge = metrics.leader
        self._ticks = metrics.ticks
        self._stopping = asyncio.Event()
        self._leader = False
        # The newest state this process knows (kept across sessions: merging takes the newest
        # tick per schedule, so an old one never harms, and a leader whose queue vanished still
        # has the state to put back).
        self._state: dict[str, datetime] = {}
        # When this process last led (wall clock), to carry into its next session's first token.
        self._led_until: float | None = None
        self._warned_heartbeat = False
        self._reconsumed_at = -1e9
        # Session state.
        self._held: list[AbstractIncomingMessage] = []
        # Tokens this session wrote and has not received back yet: what "mine" means on arrival.
        self._pending: set[str] = set()
        self._bootstrap_id = ""
        self._dirty = False
        self._since = datetime.now(UTC)
        # The newest heartbeat among the foreign tokens taken since the last firing.
        self._beat: datetime | None = None
        self._last_write = 0.0
        self._last_write_wall = 0.0

    @property
    def is_leader(self) -> bool:
        return self._leader

    def _set_leader(self, leader: bool) -> None:
        if leader != self._leader:
            self._leader = leader
            self._leader_gauge.set(1 if leader else 0)
            log.info("scheduler_leader", leader=leader, scheduler=self.app, queue=self.queue)

    async def run(self) -> None:
        """Take part until ``stop()``; a lost connection is retried, losing the lead."""
        while not self._stopping.is_set():
            pause = self.reconnect_s
            try:
                await self._session()
            except (ConsumerCancelled, UnroutableError) as exc:
                # The queue went away under us (an unroutable token says the same): everyone is
                # sent back into the election, so go back at once, carrying the state.
                log.warning("scheduler_consumer_cancelled", scheduler=self.app, error=repr(exc))
                if time.monotonic() - self._reconsumed_at > 5 * self.reconnect_s:
                    pause = RECONSUME_S  # at once, but not in a loop if it keeps happening
                    self._reconsumed_at = time.monotonic()
            except (
                aiormq.exceptions.AMQPError,
                PublishError,
                ConnectionError,
                OSError,
                TimeoutError,
            ) as exc:
                log.warning("scheduler_disconnected", scheduler=self.app, error=repr(exc))
            except Exception:  # a bug must not end scheduling for the process: retry, loudly
                log.exception("scheduler_error", scheduler=self.app)
            finally:
                if self._leader:
                    self._led_until = self._led_until_now()
                self._set_leader(False)
            if not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)

    def _led_until_now(self) -> float:
        """Until when this process led, as far as a successor needs to know: now if its loop
        kept writing to the end (nothing was left unfired but what was due a moment ago), else
        its last write."""
        if time.monotonic() - self._last_write <= 2 * self.heartbeat_s + 0.5:
            return time.time()
        return self._last_write_wall

    def stop(self) -> None:
        """Ask ``run`` to return; a leader writes a last heartbeat first."""
        self._stopping.set()

    # -- one connection ---------------------------------------------------------------------

    async def _declare_election(
        self, connection: AbstractConnection, channel: AbstractChannel
    ) -> tuple[AbstractQueue, AbstractChannel]:
        """The election queue, of the app's queue type. One declared before as the other type
        (an upgraded vhost, or LEVERET_QUEUE_TYPE changed) is used as it is, with a warning:
        the broker refuses to redeclare a queue with other arguments, and deleting it would
        drop the token."""
        arguments: dict[str, Any] = {"x-single-active-consumer": True}
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        try:
            return await channel.declare_queue(
                self.queue, durable=True, arguments=arguments
            ), channel
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            log.warning(
                "scheduler_queue_type_differs",
                queue=self.queue,
                wanted=self.queue_type,
                error=str(exc),
                action="using the existing election queue as it is",
            )
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=100)
        return await channel.declare_queue(self.queue, passive=True), channel

    async def _session(self) -> None:
        connection = await self._connect()
        self._held, self._pending, self._bootstrap_id = [], set(), ""
        self._dirty, self._beat = False, None
        try:
            self._check_heartbeat(connection)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.set_qos(prefetch_count=100)
            queue, channel = await self._declare_election(connection, channel)
            cancelled = asyncio.Event()
            # aio-pika's plain channel ignores the broker's basic.cancel (the queue was deleted,
            # or its node failed): without this we would stand by forever with no consumer.
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lambda _frame: cancelled.set())
            standby_since = self._since = datetime.now(UTC)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await queue.consume(inbox.put, no_ack=False)
            log.info("scheduler_standby", scheduler=self.app, since=format_tick(standby_since))
            # A process that led in its last session carries its state into a token of its
            # own, in case the queue lost the real one (deleted, its node failed); the leader
            # merges it like any extra token.
            if self._led_until is not None or not (queue.declaration_result.message_count or 0):
                await self._write_token(channel, bootstrap=True)
                self._led_until = None
            await self._loop(channel, inbox, cancelled)
            if self._leader and not connection.is_closed:
                # Take in the tokens still on their way to us, so the last write supersedes
                # every one of them and exactly one token stays behind.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        while self._pending:
                            self._take(await inbox.get())
                await self._write_token(channel)  # a last heartbeat: H is exact after a stop
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _loop(
        self,
        channel: AbstractChannel,
        inbox: asyncio.Queue[AbstractIncomingMessage],
        cancelled: asyncio.Event,
    ) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        cancel = asyncio.ensure_future(cancelled.wait())
        try:
            while not self._stopping.is_set():
                if channel.is_closed:
                    raise ConnectionError("scheduler channel closed")
                if cancelled.is_set():
                    raise ConsumerCancelled(f"the broker cancelled our consumer of {self.queue}")
                timeout = self._sleep_for()
                got = asyncio.ensure_future(inbox.get())
                done, _ = await asyncio.wait(
                    {got, stop, cancel}, timeout=timeout, return_when="FIRST_COMPLETED"
                )
                if got in done:
                    if self._take(got.result()):
                        # Foreign tokens come in a burst at a takeover (a dead leader may have
                        # held two): gather them before firing anything.
                        with contextlib.suppress(TimeoutError):
                            while True:
                                message = await asyncio.wait_for(inbox.get(), 0.2)
                                self._take(message)
                else:
                    got.cancel()
                if self._leader and not cancelled.is_set():
                    await self._fire_due(channel)
                    if self._dirty or time.monotonic() - self._last_write >= self.heartbeat_s:
                        await self._write_token(channel)
        finally:
            stop.cancel()
            cancel.cancel()

    def _check_heartbeat(self, connection: AbstractConnection) -> None:
        """Say once when the connection's heartbeat is too long for a 5 s takeover after a host
        vanishes (a ``connect`` callable that does not ask for one gets the broker's 60 s)."""
        underlay = getattr(getattr(connection, "transport", None), "connection", None)
        tune = getattr(underlay, "connection_tune", None)
        heartbeat = getattr(tune, "heartbeat", None)
        if self._warned_heartbeat or not isinstance(heartbeat, int):
            return
        if heartbeat == 0 or heartbeat > AMQP_HEARTBEAT_S:
            self._warned_heartbeat = True
            log.warning(
                "scheduler_heartbeat_too_long",
                scheduler=self.app,
                heartbeat_s=heartbeat,
                wanted_s=AMQP_HEARTBEAT_S,
            )

    def _sleep_for(self) -> float:
        if not self._leader:
            return 1.0
        now = datetime.now(UTC)
        nearest = min(
            (s.next_after(self._state.get(n, now)) for n, s in self.schedules.items()),
            default=now + timedelta(seconds=self.heartbeat_s),
        )
        until_tick = (nearest - now).total_seconds()
        until_beat = self.heartbeat_s - (time.monotonic() - self._last_write)
        return max(0.0, min(until_tick, until_beat))

    # -- tokens ------------------------------------------------------------------------------

    def _take(self, message: AbstractIncomingMessage) -> bool:
        """A token arrived: we lead. Merge its state; a foreign one is rewritten and acked.

        Returns whether it was foreign (not one this session wrote).
        """
        self._held.append(message)
        try:
            body = json.loads(message.body)
            ticks = {k: parse_tick(v) for k, v in body.get("ticks", {}).items()}
            heartbeat = body.get("heartbeat")
        except (ValueError, TypeError, AttributeError):
            log.warning("scheduler_token_unreadable", scheduler=self.app)
            ticks, heartbeat = {}, None
        for name, tick in ticks.items():
            if name not in self._state or tick > self._state[name]:
                self._state[name] = tick
        # Our own first token carries an earlier session's state: it counts as foreign.
        mine = message.message_id in self._pending and message.message_id != self._bootstrap_id
        self._pending.discard(message.message_id or "")
        if not mine:
            self._dirty = True
            if heartbeat is not None:
                beat = datetime.fromtimestamp(float(heartbeat), UTC)
                if self._beat is None or beat > self._beat:
                    self._beat = beat
        if not self._leader:
            self._set_leader(True)
        return not mine

    async def _write_token(self, channel: AbstractChannel, *, bootstrap: bool = False) -> None:
        """Publish the state (confirmed), then ack every token held: it supersedes them."""
        token_id = str(uuid.uuid4())
        now = time.time()
        body = {
            "ticks": {k: format_tick(v) for k, v in self._state.items()},
            "heartbeat": self._led_until if bootstrap else now,
        }
        self._pending.add(token_id)
        if bootstrap:
            self._bootstrap_id = token_id
        properties = Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=token_id,
            message_type=TOKEN_TYPE,
        )
        await self._publish(channel, json.dumps(body).encode(), "", self.queue, properties)
        if bootstrap:
            return
        held, self._held = self._held, []
        for message in held:
            await message.ack()
        self._dirty = False
        self._last_write = time.monotonic()
        self._last_write_wall = now

    async def _publish(
        self,
        channel: AbstractChannel,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: Basic.Properties,
    ) -> None:
        await publish_confirmed(
            await channel.get_underlay_channel(),
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            timeout=self.publish_timeout,
        )

    # -- firing ------------------------------------------------------------------------------

    def _plan(self, schedule: Schedule, now: datetime) -> tuple[list[datetime], datetime]:
        """The ticks to publish now, oldest first, and the state to record afterwards."""
        last = self._state.get(schedule.name)
        if last is None:  # new to the state: start from now, fire nothing of the past
            return [], schedule.latest_at_or_before(now) or now
        if self._beat is None:
            return schedule.ticks_between(last, now), last
        if schedule.next_after(last) < self._beat - timedelta(seconds=STALE_S):
            # The last leader lived well past this schedule's next tick without firing it: it
            # did not know the schedule (a deploy that removed it and a rollback). Nothing that
            # knew it ran since its last tick: missed, up to now.
            beat, since = last, now
        elif self._beat >= self._since:
            return schedule.ticks_between(last, now), last  # a leader lived while we stood by
        else:
            beat, since = self._beat, self._since
        fire = schedule.ticks_between(last, min(beat, now))  # the old leader lived: its ticks
        missed_from = max(last, beat)
        newest_missed = schedule.latest_at_or_before(since - _US)
        record = last
        if newest_missed is not None and newest_missed > missed_from:
            if schedule.missed == "once":
                fire.append(newest_missed)
                log.info(
                    "schedule_missed",
                    schedule=schedule.name,
                    fired=format_tick(newest_missed),
                    policy="once",
                )
            else:
                log.info("schedule_missed", schedule=schedule.name, policy="skip")
                record = newest_missed
        after = max([record, *fire, since - _US])
        fire += schedule.ticks_between(after, now)
        return fire, record

    async def _refresh_runtime(self) -> None:
        """The runtime schedules into ``schedules``, at most every ``REFRESH_S``. Unreadable
        (Redis down): the last known set keeps firing. A name whose last fired tick's next tick
        is older than its definition was removed and added again: it starts afresh."""
        if self._runtime is None or time.monotonic() - self._runtime_read < REFRESH_S:
            return
        self._runtime_read = time.monotonic()
        try:
            async with asyncio.timeout(2):
                stored = await self._runtime.list()
        except Exception as exc:
            log.warning(
                "runtime_schedules_unreadable",
                scheduler=self.app,
                error=f"{type(exc).__name__}: {exc}",
                action="firing the last known set",
            )
            return
        schedules, names = dict(self._app_schedules), set()
        for r in stored:
            if r.name in self._app_schedules:
                if r.name not in self._runtime_names:
                    log.warning("runtime_schedule_shadowed", schedule=r.name)
                    self._runtime_names.add(r.name)
                names.add(r.name)
                continue
            try:
                schedule = from_runtime(r)
            except ConfigError as exc:
                log.warning("runtime_schedule_invalid", schedule=r.name, error=str(exc))
                continue
            last = self._state.get(r.name)
            if last is not None and schedule.next_after(last).timestamp() < r.created_at:
                del self._state[r.name]  # re-added: from now on, none of its past
                self._dirty = True
            schedules[r.name] = schedule
            names.add(r.name)
        for name in sorted(names - self._runtime_names):
            log.info("runtime_schedule_added", scheduler=self.app, schedule=name)
        for name in sorted(self._runtime_names - names):
            log.info("runtime_schedule_removed", scheduler=self.app, schedule=name)
        self.schedules, self._runtime_names = schedules, names

    async def _fire_due(self, channel: AbstractChannel) -> None:
        await self._refresh_runtime()
        now = datetime.now(UTC)
        for schedule in self.schedules.values():
            fire, record = self._plan(schedule, now)
            if record != self._state.get(schedule.name):
                self._state[schedule.name] = record
                self._dirty = True
            for tick in fire:
                await self._fire(channel, schedule, tick)
                self._state[schedule.name] = tick
                await self._write_token(channel)
        self._beat = None

    async def _fire(self, channel: AbstractChannel, schedule: Schedule, tick: datetime) -> None:
        job_id = schedule.job_id(tick)
        body = encode_payload(dict(schedule.payload))
        try:
            await self._publish(
                channel,
                body,
                self.exchange,
                schedule.job,
                job_properties(schedule.job, job_id),
            )
        except UnroutableError:
            # No queue is bound for the job: nothing could ever take this tick. Counted as
            # fired (the next tick would hit the same wall), and said loudly.
            log.error(
                "schedule_unroutable", schedule=schedule.name, job=schedule.job, job_id=job_id
            )
        self._ticks.labels(schedule=schedule.name).inc()
        log.info(
            "schedule_fired",
            schedule=schedule.name,
            job=schedule.job,
            tick=format_tick(tick),
            job_id=job_id,
            late_s=round((datetime.now(UTC) - tick).total_seconds(), 3),
        )
