"""What a RabbitMQ version does differently, in one place: every version-dependent path asks here.

Leveret runs on RabbitMQ 3.10 and later. Where the 3.x and 4.x lines differ for Leveret:

* **Quorum delivery limit.** 3.x quorum queues have no default limit and refuse a negative
  ``x-delivery-limit`` (it must be a non-negative integer); 4.0 gives every quorum queue a
  limit of 20 unless the queue or a policy says otherwise, and accepts ``-1`` for "none". A
  DLQ must have none (each ``leveret dlq list`` returns what it reads: past the limit the
  broker would drop a dead job), so a quorum DLQ is declared with ``x-delivery-limit: -1``
  where the broker accepts it (``quorum_dlq_arguments``), and without it on 3.x, where none is
  the default anyway.
* **Quorum priorities.** None before 4.0 (``priority`` is accepted and ignored: FIFO); from 4.0
  two levels, normal (0-4) and high (5 and above), high served about 2:1, not strictly
  (``quorum_priority_levels``, ``quorum_priority_level``).
* **Global QoS** (``basic.qos`` with ``global=true``, one prefetch for the whole channel): quorum
  queues never supported it (a consume is refused); classic queues do, the feature is a
  deprecated one from 3.13 (``global_qos``, permitted by default, so a broker may deny it), and
  4.3 refuses it (docs/reliability.md, "Prefetch with several queues").
  Leveret only ever sets per-consumer prefetch; ``global_qos_allowed`` says whether a channel
  could use it.
* Older limits doctor reports: ``consumer_timeout`` enforced from 3.8.15 (30 min default),
  quorum queues from 3.8, at-least-once dead-lettering (the quorum delay chain) from 3.10.

The version comes from the AMQP handshake (``server_properties["version"]``) or the management
API (``/api/overview`` ``rabbitmq_version``); ``parse_version`` reads either, suffixes and all
(``4.1.0-rc.1``, ``3.13.7+1.g…``). ``tests/topology/test_versions.py`` runs every rule over
recorded answers of several brokers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

Version = tuple[int, ...]

QUORUM_DEFAULT_DELIVERY_LIMIT_4X = 20
_V4 = (4, 0)


def parse_version(text: object) -> Version | None:
    """``(major, minor[, patch])`` from a broker's version string, else ``None``."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if not isinstance(text, str) or not text:
        return None
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(p) for p in match.groups() if p is not None) if match else None


def version_from_server_properties(properties: dict[str, Any]) -> Version | None:
    """The version an AMQP ``connection.start`` announced."""
    return parse_version(properties.get("version"))


def version_from_overview(overview: dict[str, Any]) -> Version | None:
    """The version ``GET /api/overview`` reports."""
    return parse_version(overview.get("rabbitmq_version") or overview.get("product_version"))


def quorum_default_delivery_limit(version: Version | None) -> int | None:
    """The delivery limit a quorum queue gets with neither argument nor policy (None: none)."""
    return QUORUM_DEFAULT_DELIVERY_LIMIT_4X if version is not None and version >= _V4 else None


def accepts_negative_delivery_limit(version: Version | None) -> bool:
    """Whether ``x-delivery-limit: -1`` ("no limit") is a valid queue argument."""
    return version is not None and version >= _V4


def quorum_dlq_arguments(version: Version | None) -> dict[str, Any]:
    """Extra arguments of a quorum DLQ so the broker never drops a dead job on re-reads."""
    return {"x-delivery-limit": -1} if accepts_negative_delivery_limit(version) else {}


def quorum_priority_levels(version: Version | None) -> int:
    """How many priorities a quorum queue tells apart: 1 (none) before 4.0, 2 from 4.0."""
    return 2 if version is not None and version >= _V4 else 1


def quorum_priority_level(version: Version | None, priority: int | None) -> int:
    """The level a job's priority lands in on a quorum queue: 0 normal, 1 high (4.0+: 5-255)."""
    if quorum_priority_levels(version) == 1 or priority is None:
        return 0
    return 1 if priority >= 5 else 0


def global_qos_allowed(version: Version | None, queue_type: str) -> bool:
    """Whether a channel consuming ``queue_type`` queues may set a channel-wide prefetch."""
    return queue_type == "classic" and version is not None and version < (4, 3)


def global_qos_deprecated(version: Version | None) -> bool:
    """From 3.13 global QoS is a deprecated feature (a broker may be configured to deny it)."""
    return version is not None and version >= (3, 13)


@dataclass(frozen=True, slots=True)
class Features:
    """What doctor reports about a broker version, and what the rules above decide."""

    version: Version
    consumer_timeout: bool
    quorum_queues: bool
    at_least_once_dlx: bool
    quorum_priority_levels: int
    quorum_default_delivery_limit: int | None
    negative_delivery_limit: bool
    global_qos_deprecated: bool

    @classmethod
    def of(cls, version: Version) -> Features:
        return cls(
            version=version,
            consumer_timeout=version >= (3, 8, 15),
            quorum_queues=version >= (3, 8),
            at_least_once_dlx=version >= (3, 10),
            quorum_priority_levels=quorum_priority_levels(version),
            quorum_default_delivery_limit=quorum_default_delivery_limit(version),
            negative_delivery_limit=accepts_negative_delivery_limit(version),
            global_qos_deprecated=global_qos_deprecated(version),
        )

    def summary(self) -> list[str]:
        """The features as doctor's ``version`` finding lists them."""
        return [
            "consumer_timeout enforced" if self.consumer_timeout else "no consumer_timeout",
            "quorum delivery-limit" if self.quorum_queues else "no quorum queues",
            "at-least-once dead-lettering" if self.at_least_once_dlx else "no at-least-once DLX",
            "priorities on quorum queues"
            if self.quorum_priority_levels > 1
            else "no priorities on quorum queues",
        ]


def quorum_priorities_text(text: str, version: Version) -> str:
    """What this broker version does with a job's priority on a quorum queue, plainly."""
    if quorum_priority_levels(version) > 1:
        return (
            f"RabbitMQ {text}: quorum queues know two priorities, normal (0-4) and high (5 and "
            f"above); high jobs go first but not strictly (about 2 high to 1 normal), and 0-9 "
            f"are not ordered within a level. Use LEVERET_QUEUE_TYPE=classic for full ordering"
        )
    return (
        f"RabbitMQ {text}: quorum queues have no priorities; `priority` is accepted and "
        f"ignored, and jobs run in arrival order (FIFO). Use LEVERET_QUEUE_TYPE=classic where "
        f"priorities matter, or RabbitMQ 4.0+ for two levels"
    )
