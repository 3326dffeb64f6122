"""Publisher-side metrics, and ``per_registry``: how every Leveret metric set is built once per
registry object, so several publishers, workers, schedulers and APIs in one process share them.

Why not a dict keyed by ``id(registry)``: an id is reused once its object is garbage collected,
so a registry created after another one died could be handed the dead one's metrics, registered
on the dead registry and never exported. A ``WeakKeyDictionary`` would not do either: a metric
set that refers back to its registry (``WorkerMetrics.registry``) keeps its own key alive, and
the registry never dies. So the sets are kept on the registry object itself and live exactly as
long as it does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter

T = TypeVar("T")

# The attribute of a ``CollectorRegistry`` holding the metric sets built on it, by factory.
_ATTR: Final = "_leveret_metrics"


def per_registry(registry: CollectorRegistry, factory: Callable[[CollectorRegistry], T]) -> T:
    """``factory(registry)``, built on the first call for this registry object and returned
    again after; ``factory`` (a class or a module-level function) names the set."""
    built: dict[Any, Any] = registry.__dict__.setdefault(_ATTR, {})
    if factory not in built:
        built[factory] = factory(registry)
    made: T = built[factory]
    return made


def built_on(registry: CollectorRegistry, factory: Callable[[CollectorRegistry], T]) -> T | None:
    """The set ``factory`` built on ``registry`` by ``per_registry``, without building one."""
    made: T | None = registry.__dict__.get(_ATTR, {}).get(factory)
    return made


def _published(registry: CollectorRegistry) -> Counter:
    return Counter(
        "leveret_jobs_published_total",
        "Jobs the broker confirmed, by job name (publisher side).",
        ["job_name"],
        registry=registry,
    )


def published_counter(registry: CollectorRegistry | None = None) -> Counter:
    return per_registry(registry or REGISTRY, _published)
