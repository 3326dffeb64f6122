"""Export a ``Topology`` as RabbitMQ definitions JSON.

The same document ``rabbitmqctl import_definitions`` and the management UI's "Import
definitions" accept, so an operator can review or apply the layout without running Python.
"""

from __future__ import annotations

from typing import Any

from .model import Topology


def to_definitions(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """Exchanges, queues and bindings of ``topology`` in ``vhost``; no users or permissions."""
    return {
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
