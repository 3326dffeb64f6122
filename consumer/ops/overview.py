"""What ``leveret status`` shows: per work queue, how much waits, runs, retries and died.

Delayed jobs and retries wait in the exchange's shared delay chain (``<exchange>.delay.<ttl>``,
``leveret.topology.delay``), which does not say which work queue a message will return to; its
total is a row of its own, ``<exchange>.delay.*`` (only ``retrying`` filled in). A work queue's
own ``retrying`` counts what still waits in its v2 queues (``Q.retry.*``, left from before the
shared chain), and is unknown (``None``) once those are gone.

Figures come from the management API when it answers (ready, unacked, consumers and message
rates, as the broker's statistics have them, a few seconds old at most) and from passive
declares otherwise (ready and consumers are exact and current, unacked and rates unknown). The
caller is always told which, so an operator never mistakes a guess for a figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leveret.consumer.ops.management import Management, ManagementError
from leveret.producers import ConnectionSettings
from leveret.producers.broker import connect
from leveret.topology.declare import QueueCounts, probe_queue
from leveret.topology.delay import DELAY_BITS, delay_queue_names, retry_queue_name
from leveret.topology.errors import LeveretError
from leveret.topology.model import dlq_name

SOURCE_API = "management API"
SOURCE_PASSIVE = "passive declares"


class StatusUnavailable(LeveretError):
    """Neither the management API nor a list of queues to probe: nothing can be shown."""


@dataclass
class QueueStatus:
    queue: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    retrying: int | None
    dead: int | None
    publish_rate: float | None
    deliver_rate: float | None


def _rate(queue: dict[str, Any] | None, key: str) -> float | None:
    stats = (queue or {}).get("message_stats") or {}
    details = stats.get(f"{key}_details")
    return float(details["rate"]) if details and "rate" in details else None


def chain_row_name(exchange: str) -> str:
    """The row that stands for the whole delay chain of ``exchange``."""
    return f"{exchange}.delay.*"


def _chain_row(exchange: str, total: int | None) -> QueueStatus:
    return QueueStatus(chain_row_name(exchange), None, None, None, total, None, None, None)


def _looks_like_work_queues(names: set[str]) -> list[str]:
    """Leveret work queues are the ones with a ``Q.dlq`` beside them."""
    return sorted(
        n for n in names if dlq_name(n) in names and not n.endswith(".dlq") and ".retry." not in n
    )


async def from_management(
    api: Management, queues: list[str] | None, exchange: str = "jobs"
) -> list[QueueStatus]:
    by_name = {q["name"]: q for q in await api.queues()}
    wanted = queues if queues is not None else _looks_like_work_queues(set(by_name))
    out = []
    for name in wanted:
        q = by_name.get(name)
        prefix = f"{name}.retry."
        retry = [v for k, v in by_name.items() if k.startswith(prefix)]
        dead = by_name.get(dlq_name(name))
        out.append(
            QueueStatus(
                queue=name,
                ready=q.get("messages_ready") if q else None,
                unacked=q.get("messages_unacknowledged") if q else None,
                consumers=q.get("consumers") if q else None,
                retrying=sum(r.get("messages", 0) or 0 for r in retry) if retry else None,
                dead=dead.get("messages") if dead else None,
                publish_rate=_rate(q, "publish"),
                deliver_rate=_rate(q, "deliver_get"),
            )
        )
    chain = [by_name[n] for n in delay_queue_names(exchange) if n in by_name]
    if chain:
        out.append(_chain_row(exchange, sum(c.get("messages", 0) or 0 for c in chain)))
    return out


async def from_passive(settings: ConnectionSettings, queues: list[str]) -> list[QueueStatus]:
    """Exact ready counts and consumers by passive declares; one new channel per missing queue."""
    exchange = settings.exchange
    connection = await connect(settings, robust=False)
    try:
        channel = await (await connection.channel()).get_underlay_channel()

        async def probe(name: str) -> QueueCounts | None:
            nonlocal channel
            counts = await probe_queue(channel, name)
            if counts is None:  # the broker closed that channel; continue on a new one
                channel = await (await connection.channel()).get_underlay_channel()
            return counts

        out = []
        for name in queues:
            work = await probe(name)
            # v2 leftovers: all 27 existed together, so both ends missing means none is left.
            ends = [await probe(retry_queue_name(name, n)) for n in (0, DELAY_BITS - 1)]
            retry = ends
            if any(e is not None for e in ends):
                retry += [await probe(retry_queue_name(name, n)) for n in range(1, DELAY_BITS - 1)]
            dead = await probe(dlq_name(name))
            present = [r.messages for r in retry if r is not None]
            out.append(
                QueueStatus(
                    queue=name,
                    ready=work.messages if work else None,
                    unacked=None,
                    consumers=work.consumers if work else None,
                    retrying=sum(present) if present else None,
                    dead=dead.messages if dead else None,
                    publish_rate=None,
                    deliver_rate=None,
                )
            )
        chain = [await probe(n) for n in delay_queue_names(exchange)]
        present = [c.messages for c in chain if c is not None]
        if present:
            out.append(_chain_row(exchange, sum(present)))
        return out
    finally:
        await connection.close()


async def collect(
    settings: ConnectionSettings, queues: list[str] | None
) -> tuple[list[QueueStatus], str, str]:
    """The figures, their source, and a note for stderr saying which and why.

    ``queues=None`` means every Leveret work queue of the vhost, which only the management API
    can list: without it, ``StatusUnavailable`` says to name the app.
    """
    api = Management.from_settings(settings)
    try:
        return (
            await from_management(api, queues, settings.exchange),
            SOURCE_API,
            f"source: management API at {api.target.display}, vhost {api.target.vhost!r} "
            f"(the broker's statistics, up to ~5 s old)",
        )
    except ManagementError as exc:
        if queues is None:
            raise StatusUnavailable(
                f"{exc}. Without the management API the queues cannot be listed: name the APP "
                f"(leveret status myapp.tasks:worker) to read them by passive declares"
            ) from None
        note = (
            f"source: passive declares (the management API did not answer: {exc}); "
            f"unacked and rates are unknown (-)"
        )
    return await from_passive(settings, queues), SOURCE_PASSIVE, note
