"""Export a ``Topology`` as RabbitMQ definitions JSON.

The same document ``rabbitmqctl import_definitions`` and the management UI's "Import
definitions" accept, so an operator can review or apply the layout without running Python.
Imported into a fresh vhost (``POST /api/definitions/{vhost}``) it yields exactly the layout
``declare`` creates: same queues, arguments and bindings (a test compares two vhosts).

The vhost itself and users are added only when asked: a user entry carries a password *hash*
and overwrites an existing user's password on import, so it must be a deliberate choice. The
permissions given to such a user are the least the app needs, as regular expressions naming
exactly its exchanges and queues (``required_permissions``); ``doctor`` checks a live user
against the same list.

No policies are exported: RabbitMQ applies at most one policy to a queue, so a Leveret policy
would silently replace whatever policy an operator already applies (HA, max-length, ...).

Definitions only add. Imported over a vhost that still has the v2 delay layout (per-queue
``Q.retry.<ttl>`` queues and their bindings), the v2 bindings stay next to the new ones and a
delayed message passing a v2 exchange would be copied into both chains: upgrade such a vhost
with ``leveret topology declare APP`` (or a worker), which removes them (``topology.declare``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from typing import Any

from leveret.topology.delay import delay_queue_prefix
from leveret.topology.model import Topology, cancel_exchange_name, dlq_name, events_exchange_name

DEFAULT_EXCHANGE_RESOURCE = "amq.default"


def required_permissions(topology: Topology) -> dict[str, list[str]]:
    """Resource names a worker of this topology touches, by permission kind.

    configure: declares every exchange and queue. write: publishes to the jobs exchange, to the
    delay chain and through the default exchange (DLQ copies, replays), and binds queues and
    exchanges (the destination needs write). read: consumes work queues, binds (the source
    exchange needs read), and reads ``Q.dlq`` for ``leveret dlq``.
    """
    exchanges = [ex.name for ex in topology.exchanges()]
    queues = [q.name for q in topology.queue_decls()]
    return {
        "configure": [*exchanges, *queues],
        "write": [*exchanges, *queues, DEFAULT_EXCHANGE_RESOURCE],
        "read": [*exchanges, *(n for q in topology.queues for n in (q.name, q.dlq))],
    }


def permission_regexes(topology: Topology) -> dict[str, str]:
    """Anchored regular expressions granting exactly ``required_permissions``."""
    ex = re.escape(topology.exchange)
    # The delay chain's exchanges (v3 ``….delay.chain.<ttl>``, ``….delay.done``, the v2
    # ``….delay.<ttl>``) and its shared queues (``….delay.<ttl>``) all start with this.
    chain = re.escape(delay_queue_prefix(topology.exchange).rstrip("."))
    # ``<exchange>.events`` (the worker publishes events there where LEVERET_EVENTS is on).
    events = re.escape(events_exchange_name(topology.exchange))
    cancel = re.escape(cancel_exchange_name(topology.exchange))
    exchanges = f"{ex}|{chain}\\..+|{events}|{cancel}"
    work = "|".join(
        f"{re.escape(q.name)}({re.escape(dlq_name(q.name)[len(q.name) :])})?"
        for q in topology.queues
    )
    # ``Q.retry.…``: the v2 retry queues a declare over an upgraded vhost unbinds.
    all_queues = "|".join(
        f"{re.escape(q.name)}(\\.retry\\..+|{re.escape(dlq_name(q.name)[len(q.name) :])})?"
        for q in topology.queues
    )
    all_queues = f"{all_queues}|{chain}\\..+" if all_queues else f"{chain}\\..+"
    # The scheduler's token queue, ``<exchange>.scheduler.<app>`` (the schedules' leader):
    # declared, published to (default exchange) and consumed by every worker with schedules.
    # A worker's cancellation watch binds an exclusive, server-named queue (``amq.gen-…``) to
    # ``<exchange>.cancel`` (leveret.consumer.features.cancel_watch).
    # The job history's queue, ``<exchange>.history`` (declared by workers where a history is
    # kept, consumed by ``leveret history``).
    # Without Redis, ``lock=`` holds ``<exchange>.lock.<digest>`` (exclusive queues declared and
    # deleted) and a broker rate limit takes turns on ``<exchange>.ratelimit.<job>`` queues.
    scheduler = (
        f"{ex}\\.scheduler\\..+|{ex}\\.history|{ex}\\.lock\\..+|{ex}\\.ratelimit\\..+|amq\\.gen-.+"
    )
    both = f"{exchanges}|{all_queues}|{scheduler}" if all_queues else f"{exchanges}|{scheduler}"
    return {
        "configure": f"^({both})$",
        "write": f"^({both}|amq\\.default)$",
        "read": f"^({exchanges}|{work}|{scheduler})$" if work else f"^({exchanges}|{scheduler})$",
    }


def rabbit_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def to_definitions(
    topology: Topology,
    vhost: str = "/",
    *,
    with_vhost: bool = False,
    users: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Exchanges, queues and bindings of ``topology`` in ``vhost``.

    ``with_vhost`` adds the vhost; ``users`` (name → password) adds those users, with a salted
    password hash and the least permissions the app needs on ``vhost``.
    """
    document: dict[str, Any] = {}
    if with_vhost:
        document["vhosts"] = [{"name": vhost}]
    if users:
        document |= _users(topology, vhost, users)
    return document | {
        "exchanges": [
            {
                "name": ex.name,
                "vhost": vhost,
                "type": ex.type,
                "durable": ex.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for ex in topology.exchanges()
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": q.durable,
                "auto_delete": False,
                "arguments": q.arguments,
            }
            for q in topology.queue_decls()
        ],
        "bindings": [
            {
                "source": b.source,
                "vhost": vhost,
                "destination": b.destination,
                "destination_type": b.destination_type,
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topology.bindings()
        ],
    }


def _users(topology: Topology, vhost: str, users: dict[str, str]) -> dict[str, Any]:
    """Users with a salted password hash, and the least permissions the app needs on ``vhost``."""
    regexes = permission_regexes(topology)
    return {
        "users": [
            {
                "name": name,
                "password_hash": rabbit_password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": "",
            }
            for name, password in users.items()
        ],
        "permissions": [{"user": name, "vhost": vhost, **regexes} for name in users],
    }
