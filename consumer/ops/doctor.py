"""Check the broker against an app before anything goes wrong.

Each check yields ``Finding``s whose message says what to change. ``error`` means the app will
misbehave as things are (a job that will be killed by ``consumer_timeout``, a queue that cannot
be declared, a permission the worker lacks); ``warning`` means it may (a job without a
timeout); ``info`` records what was seen or assumed. ``leveret doctor`` exits non-zero on an
error; ``leveret worker`` logs the same findings at start and starts anyway.

Where the figures come from:

* broker version: the AMQP handshake (``server_properties``), else ``/api/overview``;
* ``consumer_timeout``: RabbitMQ 3.x has no API for it, so on the broker's own host it is read
  with ``rabbitmqctl eval`` (as ``rabbitmqctl environment`` would show it); elsewhere the
  version's default is assumed (30 minutes since 3.8.15) and the finding says so;
* queue arguments and permissions: the management API (permissions need an administrator
  login); without it, arguments are checked by redeclaring existing queues on a throwaway
  channel, which the broker refuses, changing nothing, when they differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import aiormq
import structlog
from aio_pika.abc import AbstractConnection
from yarl import URL

from leveret.consumer.ops.management import Management, ManagementError
from leveret.consumer.registry import Registry
from leveret.consumer.settings import WorkerSettings
from leveret.producers import BrokerUnavailable
from leveret.producers.broker import connect
from leveret.producers.wire import events_exchange
from leveret.topology.declare import declaration_variants, probe_queue
from leveret.topology.definitions import permission_regexes, required_permissions
from leveret.topology.delay import DELAY_BITS, delay_queue_names, retry_queue_name, retry_ttl_ms
from leveret.topology.model import QueueDecl, Topology
from leveret.topology.versions import (
    Features,
    Version,
    parse_version,
    quorum_default_delivery_limit,
    quorum_priorities_text,
)

Severity = Literal["error", "warning", "info", "ok"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info", "ok")

DEFAULT_CONSUMER_TIMEOUT_MS = 1_800_000  # RabbitMQ 3.8.15+ (and 3.10): 30 minutes
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}

log = structlog.get_logger("leveret.doctor")


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    check: str
    message: str


def _version(text: str | None) -> tuple[int, ...] | None:
    return parse_version(text)


def _human_s(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


@dataclass
class _Facts:
    version: str | None = None
    api: Management | None = None
    api_error: str | None = None
    consumer_timeout_ms: int | Literal[False] | None = None  # False: disabled
    consumer_timeout_source: str = ""


class Doctor:
    """Runs every check for one app (its registry and topology) against one broker."""

    def __init__(
        self,
        settings: WorkerSettings,
        registry: Registry,
        topology: Topology,
        *,
        use_amqp: bool = True,
        use_rabbitmqctl: bool = True,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.topology = topology
        self.use_amqp = use_amqp
        self.use_rabbitmqctl = use_rabbitmqctl
        self.findings: list[Finding] = []

    def add(self, severity: Severity, check: str, message: str) -> None:
        self.findings.append(Finding(severity, check, message))

    async def run(self) -> list[Finding]:
        facts = _Facts()
        connection = None
        if self.use_amqp:
            try:
                connection = await connect(self.settings, robust=False)
            except BrokerUnavailable as exc:
                self.add("error", "broker", str(exc))
                return self.findings
            if connection.transport is not None:
                properties = connection.transport.connection.server_properties
                facts.version = str(properties.get("version", "") or "") or None
        try:
            await self._management(facts)
            self._versions(facts)
            await self._consumer_timeout(facts)
            self._job_timeouts(facts)
            if facts.api is not None:
                await self._queue_arguments_api(facts.api, _version(facts.version))
                await self._shared_job_names(facts.api)
                await self._delay_chain(facts.api)
                await self._quorum_limits(facts, facts.api)
                await self._permissions(facts.api)
            elif connection is not None:
                await self._queue_arguments_amqp(connection, _version(facts.version))
        finally:
            if connection is not None:
                await connection.close()
        order = {s: i for i, s in enumerate(SEVERITIES)}
        self.findings.sort(key=lambda f: order[f.severity])
        return self.findings

    # -- management plugin ----------------------------------------------------------------

    async def _management(self, facts: _Facts) -> None:
        api = Management.from_settings(self.settings, timeout_s=5)
        try:
            overview = await api.overview()
        except ManagementError as exc:
            facts.api_error = str(exc)
            self.add(
                "warning",
                "management",
                f"{exc}. Without it `leveret status` falls back to passive declares (no unacked "
                f"counts or rates) and doctor cannot check permissions",
            )
            return
        facts.api = api
        facts.version = facts.version or overview.get("rabbitmq_version")
        self.add("ok", "management", f"management API answers at {api.target.display}")

    # -- version and features -------------------------------------------------------------

    def _versions(self, facts: _Facts) -> None:
        version = _version(facts.version)
        if version is None:
            self.add("info", "version", "broker version unknown (no AMQP or management access)")
            return
        quorum = any(q.queue_type == "quorum" for q in self.topology.queues)
        features = Features.of(version).summary()
        self.add("info", "version", f"RabbitMQ {facts.version}: {', '.join(features)}")
        if version < (3, 8):
            self.add(
                "error",
                "version",
                f"RabbitMQ {facts.version} is too old for Leveret: upgrade to 3.10 or later",
            )
        if quorum and version < (3, 10):
            self.add(
                "error",
                "version",
                f"quorum retry queues use at-least-once dead-lettering, which RabbitMQ "
                f"{facts.version} lacks: upgrade to 3.10+ or set LEVERET_QUEUE_TYPE=classic",
            )
        if quorum:
            self.add("info", "priorities", quorum_priorities_text(facts.version or "", version))

    # -- quorum delivery limits -------------------------------------------------------------

    async def _quorum_limits(self, facts: _Facts, api: Management) -> None:
        """Which delivery limit each existing quorum work queue and DLQ really has.

        A work queue's limit sends a job that keeps coming back (crashes, lost connections) to
        its DLQ. A DLQ's limit is a hazard: every `leveret dlq list` returns what it reads, and
        past the limit a quorum queue drops the message (Q.dlq has no dead-letter route).
        RabbitMQ 3.x has no default limit; 4.0 gives every quorum queue 20 unless the queue or
        a policy says otherwise (``x-delivery-limit`` -1 or a policy ``delivery-limit`` -1
        turns it off).
        """
        work = {q.name for q in self.topology.queues if q.queue_type == "quorum"}
        if not work:
            return
        version = _version(facts.version)
        default = quorum_default_delivery_limit(version)
        try:
            existing = {q["name"]: q for q in await api.queues()}
        except ManagementError as exc:
            self.add("warning", "delivery_limit", f"could not list queues: {exc}")
            return
        for name in sorted(work):
            for queue_name, is_dlq in ((name, False), (f"{name}.dlq", True)):
                queue = existing.get(queue_name)
                if queue is None or queue.get("type") != "quorum":
                    continue
                limit, source = _delivery_limit(queue, default)
                if is_dlq and limit is not None and limit >= 0:
                    self.add(
                        "error",
                        "delivery_limit",
                        f"quorum DLQ {queue_name!r} has a delivery limit of {limit} ({source}) "
                        f"on RabbitMQ {facts.version}: each `leveret dlq list` or replay that "
                        f"returns a dead job counts one delivery, and past {limit} the broker "
                        f"drops it. Give {queue_name!r} x-delivery-limit -1, or a policy for "
                        f"quorum queues matching '\\.dlq$' with delivery-limit -1",
                    )
                elif is_dlq:
                    self.add(
                        "ok",
                        "delivery_limit",
                        f"quorum DLQ {queue_name!r} has no delivery limit ({source}): listing "
                        f"it again and again never drops a dead job",
                    )
                elif limit is None or limit < 0:
                    self.add(
                        "warning",
                        "delivery_limit",
                        f"quorum work queue {queue_name!r} has no delivery limit ({source}): "
                        f"only LEVERET_MAX_REDELIVERIES stops a job that kills its worker",
                    )
                else:
                    self.add(
                        "ok",
                        "delivery_limit",
                        f"quorum work queue {queue_name!r} has x-delivery-limit {limit} "
                        f"({source}); a job returned more often goes to {name + '.dlq'!r}",
                    )

    # -- consumer_timeout -----------------------------------------------------------------

    async def _consumer_timeout(self, facts: _Facts) -> None:
        host = URL(self.settings.amqp_url.get_secret_value()).host or ""
        rabbitmqctl = shutil.which("rabbitmqctl")
        reason = "it has no API in RabbitMQ 3.x"
        if self.use_rabbitmqctl and rabbitmqctl and host in _LOCAL_HOSTS:
            try:
                proc = await asyncio.create_subprocess_exec(
                    rabbitmqctl,
                    "eval",
                    "application:get_env(rabbit, consumer_timeout).",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, _ = await asyncio.wait_for(proc.communicate(), 30)
                text = out.decode().strip()
                match = re.search(r"\{ok,\s*(\d+|false)\}", text)
                if proc.returncode == 0 and (match or text == "undefined"):
                    if text == "undefined":
                        facts.consumer_timeout_ms = DEFAULT_CONSUMER_TIMEOUT_MS
                    elif match and match[1] == "false":
                        facts.consumer_timeout_ms = False
                    else:
                        facts.consumer_timeout_ms = int(match[1]) if match else None
                    facts.consumer_timeout_source = "read with rabbitmqctl"
                    return
                reason = f"rabbitmqctl answered {text[:80]!r}"
            except (OSError, TimeoutError) as exc:
                reason = f"rabbitmqctl failed: {type(exc).__name__}"
        version = _version(facts.version)
        if version is not None and version < (3, 8, 15):
            facts.consumer_timeout_ms = False
            facts.consumer_timeout_source = f"RabbitMQ {facts.version} does not enforce one"
            return
        facts.consumer_timeout_ms = DEFAULT_CONSUMER_TIMEOUT_MS
        facts.consumer_timeout_source = (
            f"assumed: the default, since it could not be read ({reason}); check "
            f"`rabbitmqctl environment | grep consumer_timeout` on the broker"
        )

    def _job_timeouts(self, facts: _Facts) -> None:
        limit_ms = facts.consumer_timeout_ms
        if limit_ms is False or limit_ms is None:
            self.add(
                "info",
                "consumer_timeout",
                f"consumer_timeout is off ({facts.consumer_timeout_source})",
            )
            return
        limit_s = limit_ms / 1000
        self.add(
            "info",
            "consumer_timeout",
            f"consumer_timeout is {_human_s(limit_s)} ({facts.consumer_timeout_source})",
        )
        consequence = (
            "the broker closes the worker's channel when a job stays unacked longer, and every "
            "job that worker held runs again"
        )
        for spec in sorted(self.registry.jobs.values(), key=lambda s: s.name):
            if spec.timeout_s is None:
                self.add(
                    "warning",
                    "consumer_timeout",
                    f"job {spec.name!r} has no timeout, so nothing stops a run at the broker's "
                    f"consumer_timeout of {_human_s(limit_s)} ({consequence}); give it "
                    f"@worker.job(..., timeout=S) with S below {limit_s:g}",
                )
            elif spec.timeout_s >= limit_s:
                self.add(
                    "error",
                    "consumer_timeout",
                    f"job {spec.name!r} may run for {_human_s(spec.timeout_s)}, not less than "
                    f"the broker's consumer_timeout of {_human_s(limit_s)}: {consequence}. "
                    f"Lower its timeout below {limit_s:g} s, or raise consumer_timeout "
                    f"(rabbitmq.conf: consumer_timeout = "
                    f"{int(spec.timeout_s * 1000 * 2)}) above it",
                )
        longest = max((s.timeout_s or 0 for s in self.registry.jobs.values()), default=0)
        if longest and longest < limit_s:
            self.add(
                "ok",
                "consumer_timeout",
                f"longest job timeout {_human_s(longest)} is below consumer_timeout",
            )

    # -- queue arguments --------------------------------------------------------------------

    def _mismatch(self, name: str, what: str) -> None:
        self.add(
            "error",
            "queue_arguments",
            f"queue {name!r} exists with {what}; the worker cannot declare it. Drain it (or "
            f"move its messages with a shovel), delete it, and run `leveret topology declare "
            f"APP`, or change the app to match",
        )

    async def _queue_arguments_api(self, api: Management, version: Version | None) -> None:
        try:
            existing = {q["name"]: q for q in await api.queues()}
        except ManagementError as exc:
            self.add("warning", "queue_arguments", f"could not list queues: {exc}")
            return
        missing = []
        bad = 0
        variants = declaration_variants(self.topology, version)
        for decl in self.topology.queue_decls():
            queue = existing.get(decl.name)
            if queue is None:
                missing.append(decl.name)
                continue
            # What the worker would ask for first; the alternatives it accepts (the delay chain
            # as the other queue type, a quorum DLQ from before the broker's upgrade) pass too.
            diffs = _differences(variants[decl.name][0], queue)
            if any(not _differences(v, queue) for v in variants[decl.name]):
                continue
            if diffs:
                bad += 1
                self._mismatch(decl.name, "; ".join(diffs))
        if missing:
            self.add(
                "info",
                "queue_arguments",
                f"{len(missing)} queue(s) do not exist yet (e.g. {missing[0]!r}); the worker "
                f"or `leveret topology declare APP` creates them",
            )
        if not bad:
            self.add("ok", "queue_arguments", "existing queues match the topology")

    # -- the delay chain and the v2 leftovers ----------------------------------------------

    async def _delay_chain(self, api: Management) -> None:
        """The shared chain's type and load; the v2 per-queue chains still on the vhost.

        A v2 queue ``Q.retry.<ttl>`` is a leftover from before the shared chain: declare
        removed the bindings into it, so nothing enters it and what waits there dead-letters
        into the shared chain and reaches ``Q``. Once empty it can be deleted on its own. While a
        binding still leads into it (a v2 worker redeclared its layout) it is not a leftover
        but a second chain, and a job passing a v2 exchange is copied into both.
        """
        try:
            existing = {q["name"]: q for q in await api.queues()}
            bindings = list(await api.get(f"/bindings/{api.qvhost}") or [])
        except ManagementError as exc:
            self.add("warning", "delay_chain", f"could not list queues and bindings: {exc}")
            return
        self._status_keeper_queue(existing, api.target.vhost)
        self._shared_chain(existing)
        self._v2_chains(existing, bindings, api.target.vhost)

    def _shared_chain(self, existing: dict[str, dict[str, Any]]) -> None:
        """The shared chain's queues: how many exist, their type, what waits in them."""
        topo = self.topology
        names = delay_queue_names(topo.exchange)
        chain = [existing[n] for n in names if n in existing]
        if chain:
            waiting = sum(int(c.get("messages") or 0) for c in chain)
            types = sorted({str(c.get("type") or "classic") for c in chain})
            self.add(
                "info",
                "delay_chain",
                f"delay chain of exchange {topo.exchange!r}: {len(chain)} of {len(names)} queues "
                f"({names[0]} … {names[-1]}, {'/'.join(types)}), {waiting} delayed job(s) "
                f"waiting, shared by every work queue of the vhost",
            )
            if types != [topo.delay_queue_type]:
                self.add(
                    "warning",
                    "delay_chain",
                    f"the delay chain of exchange {topo.exchange!r} is {'/'.join(types)} while "
                    f"this app's work queues want {topo.delay_queue_type}: the worker uses it "
                    f"as it is (the first app to declare it chose). To change it, stop "
                    f"publishing delays on {topo.exchange!r}, let its queues empty, delete them "
                    f"and start a worker",
                )

    def _v2_chains(
        self, existing: dict[str, dict[str, Any]], bindings: list[Any], vhost: str
    ) -> None:
        """The v2 per-queue chains left on the vhost: draining, deletable, or still bound."""
        topo = self.topology
        bound: dict[str, list[str]] = {}
        for b in bindings:
            if b.get("destination_type") == "queue" and b.get("source"):
                bound.setdefault(str(b["destination"]), []).append(str(b["source"]))
        labels = {retry_queue_name("", n)[len(".retry.") :]: n for n in range(DELAY_BITS)}
        by_queue: dict[str, list[tuple[int, str]]] = {}
        for name in existing:
            base, sep, label = name.rpartition(".retry.")
            if sep and label in labels and base:
                by_queue.setdefault(base, []).append((labels[label], name))
        ours = {q.name for q in topo.queues}
        for base, found in sorted(by_queue.items()):
            found.sort()
            still_bound = [n for _, n in found if bound.get(n)]
            full = [(lvl, n) for lvl, n in found if int(existing[n].get("messages") or 0)]
            empty = [n for lvl, n in found if n not in still_bound and (lvl, n) not in full]
            if still_bound and base in ours:
                self.add(
                    "error",
                    "v2_leftovers",
                    f"{len(still_bound)} v2 retry queue(s) of {base!r} are still bound into the "
                    f"delay chain (e.g. {still_bound[0]!r} from {bound[still_bound[0]][0]!r}): "
                    f"a worker of a Leveret before the shared chain redeclared them, and a "
                    f"delayed job passing that exchange is copied into both chains. Stop the old "
                    f"workers, then run `leveret topology declare APP` (it removes the bindings)",
                )
                continue
            if still_bound:
                self.add(
                    "info",
                    "v2_leftovers",
                    f"{base!r} still has a v2 retry chain in use ({len(still_bound)} bound "
                    f"queue(s) {base}.retry.*): another app on this vhost runs a Leveret from "
                    f"before the shared delay chain; leave them until it is upgraded",
                )
                continue
            if full:
                jobs = sum(int(existing[n].get("messages") or 0) for _, n in full)
                self.add(
                    "info",
                    "v2_leftovers",
                    f"{len(full)} v2 retry queue(s) of {base!r} still hold {jobs} delayed "
                    f"job(s) ({_sample(n for _, n in full)}); nothing enters them any more, and "
                    f"each job continues through the shared chain to {base!r} (the last within "
                    f"{_human_s(retry_ttl_ms(full[-1][0]) / 1000)}). Delete each when it is empty",
                )
            if empty:
                self.add(
                    "warning",
                    "v2_leftovers",
                    f"{len(empty)} empty v2 retry queue(s) of {base!r} can be deleted "
                    f"({_sample(empty)}): nothing routes into them any more. E.g. "
                    f"`rabbitmqctl delete_queue -p {vhost} --if-empty {empty[0]}` "
                    f"for each (--if-empty: the broker refuses if a job arrived since)",
                )

    def _status_keeper_queue(self, existing: dict[str, dict[str, Any]], vhost: str) -> None:
        """``<exchange>.events.status``: the v2 status keeper's queue. The worker writes each
        job's status itself now, so nothing reads it; while it stays bound it keeps a copy of
        every event (where events are on) that no one will ever take."""
        name = f"{events_exchange(self.topology.exchange)}.status"
        queue = existing.get(name)
        if queue is None:
            return
        held = int(queue.get("messages") or 0)
        self.add(
            "warning",
            "v2_leftovers",
            f"queue {name!r} is the v2 status keeper's, which no worker reads any more (the "
            f"worker writes statuses to Redis itself); it holds {held} event(s) and collects "
            f"one per event while it exists: delete it (`rabbitmqctl delete_queue -p "
            f"{vhost} {name}`)",
        )

    async def _shared_job_names(self, api: Management) -> None:
        """A job name bound to a queue of another app multiplies its delayed publishes.

        Routing a delayed publish by job name (see ``leveret.topology.model``) copies it into every
        queue serving that name at each hop of the delay chain, so one name must have one queue.
        """
        exchange = self.topology.exchange
        try:
            bindings = await api.bindings_from(exchange)
        except ManagementError as exc:
            self.add("warning", "job_names", f"could not list bindings of {exchange!r}: {exc}")
            return
        ours = {job: q.name for q in self.topology.queues for job in q.jobs}
        shared = sorted(
            {
                (b["routing_key"], b["destination"])
                for b in bindings
                if b.get("destination_type") == "queue"
                and b["routing_key"] in ours
                and b["destination"] != ours[b["routing_key"]]
            }
        )
        for job, other in shared:
            self.add(
                "warning",
                "job_names",
                f"job {job!r} is also bound to queue {other!r} (this app serves it on "
                f"{ours[job]!r}): both get every {job!r} job, and a delayed publish of it is "
                f"copied into both at every hop of the delay chain; rename the job in one app "
                f"or give each app its own vhost or LEVERET_EXCHANGE",
            )
        if not shared:
            self.add("ok", "job_names", "every job name of the app is served by one queue")

    async def _queue_arguments_amqp(
        self, connection: AbstractConnection, version: Version | None
    ) -> None:
        """Without the API: redeclare existing queues with the app's arguments on a throwaway
        channel; the broker refuses a difference and changes nothing either way."""
        bad = 0
        variants = declaration_variants(self.topology, version)
        for decl in self.topology.queue_decls():
            channel = await (await connection.channel()).get_underlay_channel()
            if await probe_queue(channel, decl.name) is None:
                continue  # not there yet: nothing to compare (the broker closed the channel)
            try:
                await channel.queue_declare(
                    decl.name, durable=decl.durable, arguments=decl.arguments
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                others = [v for v in variants[decl.name] if v != decl]
                if any([await _declares(connection, v) for v in others]):
                    continue  # an alternative declare accepts (see declaration_variants)
                bad += 1
                text = str(exc)
                found = re.search(r"inequivalent arg[^\"]*", text)
                self._mismatch(decl.name, found[0].rstrip("'\" )") if found else text)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        if not bad:
            self.add("ok", "queue_arguments", "existing queues match the topology")

    # -- permissions --------------------------------------------------------------------

    async def _permissions(self, api: Management) -> None:
        user, vhost = api.target.user, api.target.vhost
        amqp_user = URL(self.settings.amqp_url.get_secret_value()).user or "guest"
        try:
            granted = await api.permissions(amqp_user)
        except ManagementError as exc:
            if exc.status == 404:
                self.add(
                    "error",
                    "permissions",
                    f"user {amqp_user!r} has no permissions on vhost {vhost!r}; grant them, "
                    f"e.g. rabbitmqctl set_permissions -p {vhost} {amqp_user} "
                    + " ".join(f"'{r}'" for r in permission_regexes(self.topology).values()),
                )
            else:
                self.add(
                    "info",
                    "permissions",
                    f"cannot read permissions as {user!r} (it needs the administrator tag): {exc}",
                )
            return
        lacking = []
        for kind, names in required_permissions(self.topology).items():
            pattern = granted.get(kind, "")
            denied = [n for n in names if not _permits(pattern, n)]
            if denied:
                lacking.append(f"{kind} on {_sample(denied)}")
        if lacking:
            regexes = permission_regexes(self.topology)
            self.add(
                "error",
                "permissions",
                f"user {amqp_user!r} on vhost {vhost!r} lacks "
                + "; ".join(lacking)
                + f". Grant at least: rabbitmqctl set_permissions -p {vhost} {amqp_user} "
                + " ".join(f"'{regexes[k]}'" for k in ("configure", "write", "read")),
            )
        else:
            self.add("ok", "permissions", f"user {amqp_user!r} may do all the app needs")


def _differences(decl: QueueDecl, queue: dict[str, Any]) -> list[str]:
    """How an existing queue (``/api/queues``) differs from a declaration, plainly."""
    wanted = {k: v for k, v in decl.arguments.items() if k != "x-queue-type"}
    actual = {k: v for k, v in (queue.get("arguments") or {}).items() if k != "x-queue-type"}
    wanted_type = decl.arguments.get("x-queue-type", "classic")
    diffs = [
        f"{key}={actual.get(key)!r} (the app wants {wanted.get(key)!r})"
        for key in sorted(set(wanted) | set(actual))
        if actual.get(key) != wanted.get(key)
    ]
    if queue.get("type", "classic") != wanted_type:
        diffs.insert(0, f"type {queue.get('type')!r} (the app wants {wanted_type!r})")
    if queue.get("durable") is not True:
        diffs.append("durable=False (the app wants durable=True)")
    return diffs


async def _declares(connection: AbstractConnection, decl: QueueDecl) -> bool:
    """Whether the broker accepts ``decl`` as an equivalent redeclaration (changes nothing)."""
    channel = await (await connection.channel()).get_underlay_channel()
    try:
        await channel.queue_declare(decl.name, durable=decl.durable, arguments=decl.arguments)
        return True
    except aiormq.exceptions.ChannelPreconditionFailed:
        return False
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


def _delivery_limit(queue: dict[str, object], default: int | None) -> tuple[int | None, str]:
    """The delivery limit a quorum queue enforces, and where it comes from.

    With both a queue argument and a policy, RabbitMQ 3.x applies the smaller (4.x resolves
    some combinations differently; the smaller is the cautious reading); with neither, the
    version's default applies (none before 4.0, 20 from 4.0; a negative value means none).
    """
    arguments = queue.get("arguments")
    policy = queue.get("effective_policy_definition")
    values: list[tuple[int, str]] = []
    if isinstance(arguments, dict) and isinstance(arguments.get("x-delivery-limit"), int):
        values.append((arguments["x-delivery-limit"], "x-delivery-limit argument"))
    if isinstance(policy, dict) and isinstance(policy.get("delivery-limit"), int):
        values.append((policy["delivery-limit"], f"policy {queue.get('policy')!r}"))
    if values:
        return min(values)
    if default is None:
        return None, "none set, and this version has no default"
    return default, "this version's default for quorum queues"


def _permits(pattern: str, name: str) -> bool:
    """RabbitMQ permission semantics: an unanchored regex match; the empty string denies."""
    if pattern == "":
        return False
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False


def _sample(names: Iterable[str], k: int = 3) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


async def diagnose(
    settings: WorkerSettings,
    registry: Registry,
    topology: Topology,
    *,
    use_amqp: bool = True,
    use_rabbitmqctl: bool = True,
) -> list[Finding]:
    """All findings, errors first."""
    return await Doctor(
        settings, registry, topology, use_amqp=use_amqp, use_rabbitmqctl=use_rabbitmqctl
    ).run()


async def log_findings(
    settings: WorkerSettings, registry: Registry, topology: Topology, timeout_s: float = 30
) -> None:
    """What ``leveret worker`` runs at start: the same checks, logged; never raises.

    It uses the management API only (no extra AMQP connection, no ``rabbitmqctl`` process per
    worker start), so it costs a few HTTP requests.
    """
    try:
        findings = await asyncio.wait_for(
            diagnose(settings, registry, topology, use_amqp=False, use_rabbitmqctl=False),
            timeout_s,
        )
    except Exception as exc:
        log.debug("doctor_skipped", error=f"{type(exc).__name__}: {exc}")
        return
    for finding in findings:
        level = {"error": log.error, "warning": log.warning, "info": log.info, "ok": log.debug}[
            finding.severity
        ]
        level("doctor_finding", check=finding.check, finding=finding.message)


def to_json(findings: list[Finding]) -> str:
    return "\n".join(json.dumps(asdict(f)) for f in findings)
