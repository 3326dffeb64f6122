"""Metric sets are built once per registry object (``producers.metrics.per_registry``), never
handed to a new registry that happens to get a collected one's ``id``."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from leveret.consumer.api.middleware import ApiMetrics
from leveret.consumer.features.resources import Resources
from leveret.consumer.features.schedules.leader import SchedulerMetrics
from leveret.consumer.runtime.metrics import WorkerMetrics
from leveret.producers.metrics import per_registry, published_counter

# Each of the five metric sets, and one series name it registers on the registry it is given.
BUILDERS: dict[str, tuple[Callable[[CollectorRegistry], object], str]] = {
    "worker": (WorkerMetrics.for_registry, "leveret_jobs_completed_total"),
    "scheduler": (SchedulerMetrics.for_registry, "leveret_scheduler_leader"),
    "api": (ApiMetrics.for_registry, "leveret_api_requests_total"),
    "resources": (Resources, "leveret_resource_close_failures_total"),
    "publisher": (published_counter, "leveret_jobs_published_total"),
}


def _registered(registry: CollectorRegistry) -> set[str]:
    return set(registry._names_to_collectors)


def _same_id_as(dead: int, tries: int = 2000) -> CollectorRegistry | None:
    """A new registry at a collected one's address, if the allocator hands it out soon."""
    held = []  # kept alive so each try gets a new address
    for _ in range(tries):
        registry = CollectorRegistry()
        if id(registry) == dead:
            return registry
        held.append(registry)
    return None


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_new_registry_never_gets_a_collected_registrys_metrics(name: str) -> None:
    """A registry is collected once dropped, and one created later (at its address, when the
    allocator reuses it) gets metrics registered on itself, not the dead one's."""
    build, series = BUILDERS[name]
    for _ in range(5):
        old = CollectorRegistry()
        build(old)
        assert series in _registered(old)
        dead, gone = id(old), weakref.ref(old)
        del old
        gc.collect()
        assert gone() is None, "the metrics cache keeps a dropped registry alive"
        new = _same_id_as(dead)
        if new is not None:
            break
    else:
        new = CollectorRegistry()  # no reuse seen: still a new registry gets its own set
    build(new)
    assert series in _registered(new), "the new registry was handed a dead registry's metrics"


def test_one_set_per_registry_object_and_factory() -> None:
    """The same registry and factory give the same set; another registry or factory, another."""
    one, two = CollectorRegistry(), CollectorRegistry()
    assert WorkerMetrics.for_registry(one) is WorkerMetrics.for_registry(one)
    assert WorkerMetrics.for_registry(two) is not WorkerMetrics.for_registry(one)
    assert WorkerMetrics.built_on(one) is WorkerMetrics.for_registry(one)
    assert WorkerMetrics.built_on(CollectorRegistry()) is None
    assert per_registry(one, ApiMetrics) is ApiMetrics.for_registry(one)
    assert published_counter(one) is WorkerMetrics.for_registry(one).published
