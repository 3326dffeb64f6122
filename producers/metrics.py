"""Publisher-side metrics, built once per registry so several publishers can share them."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter

_counters: dict[int, Counter] = {}


def published_counter(registry: CollectorRegistry | None = None) -> Counter:
    registry = registry or REGISTRY
    counter = _counters.get(id(registry))
    if counter is None:
        counter = Counter(
            "leveret_jobs_published_total",
            "Jobs the broker confirmed, by job name (publisher side).",
            ["job_name"],
            registry=registry,
        )
        _counters[id(registry)] = counter
    return counter
