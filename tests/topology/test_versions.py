"""The version-dependent rules (``leveret.topology.versions``) over recorded broker answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leveret.topology import Topology, WorkQueue
from leveret.topology.declare import declaration_variants
from leveret.topology.versions import (
    Features,
    global_qos_allowed,
    global_qos_deprecated,
    parse_version,
    quorum_default_delivery_limit,
    quorum_dlq_arguments,
    quorum_priority_level,
    quorum_priority_levels,
    version_from_overview,
    version_from_server_properties,
)

ANSWERS = json.loads((Path(__file__).parent / "data" / "broker_answers.json").read_text())
BROKERS = ANSWERS["brokers"]

# What each broker line should get: (default quorum delivery limit, DLQ extra arguments,
# quorum priority levels, global QoS deprecated).
EXPECTED = {
    "3.10.8": (None, {}, 1, False),
    "3.13.7": (None, {}, 1, True),
    "4.0.5": (20, {"x-delivery-limit": -1}, 2, True),
    "4.1.0-rc.1": (20, {"x-delivery-limit": -1}, 2, True),
}


@pytest.mark.parametrize("name", sorted(BROKERS))
def test_both_sources_give_the_same_version(name: str) -> None:
    answer = BROKERS[name]
    version = version_from_server_properties(answer["server_properties"])
    assert version is not None and version == version_from_overview(answer["overview"])
    assert ".".join(map(str, version)) == name.split("-", maxsplit=1)[0]


@pytest.mark.parametrize("name", sorted(BROKERS))
def test_each_rule_follows_the_broker_line(name: str) -> None:
    version = version_from_server_properties(BROKERS[name]["server_properties"])
    limit, dlq_extra, levels, deprecated = EXPECTED[name]
    assert quorum_default_delivery_limit(version) == limit
    assert quorum_dlq_arguments(version) == dlq_extra
    assert quorum_priority_levels(version) == levels
    assert global_qos_deprecated(version) is deprecated
    assert global_qos_allowed(version, "classic") and not global_qos_allowed(version, "quorum")
    assert not global_qos_allowed((4, 3, 0), "classic")
    features = Features.of(version) if version else None
    assert features is not None and features.at_least_once_dlx and features.consumer_timeout
    assert ("priorities on quorum queues" in features.summary()) is (levels == 2)


def test_two_level_priorities_split_at_five_from_4_0() -> None:
    v4, v3 = (4, 0, 5), (3, 10, 8)
    assert [quorum_priority_level(v4, p) for p in (None, 0, 4, 5, 9, 255)] == [0, 0, 0, 1, 1, 1]
    assert {quorum_priority_level(v3, p) for p in (None, 0, 5, 9)} == {0}


def test_versions_that_cannot_be_read() -> None:
    for text in (None, "", "rabbit", b"", 3):
        assert parse_version(text) is None
    assert parse_version(b"3.12.1") == (3, 12, 1)
    assert parse_version("3.13.7+1.g0a1b2c3") == (3, 13, 7)
    assert quorum_dlq_arguments(None) == {}  # unknown: what every version accepts
    assert quorum_default_delivery_limit(None) is None


@pytest.mark.parametrize("name", sorted(BROKERS))
def test_declare_asks_for_an_unlimited_quorum_dlq_where_the_broker_accepts_it(name: str) -> None:
    version = version_from_server_properties(BROKERS[name]["server_properties"])
    topo = Topology(queues=(WorkQueue(name="q", queue_type="quorum"),))
    variants = declaration_variants(topo, version)
    first = variants["q.dlq"][0].arguments
    if EXPECTED[name][1]:
        assert first["x-delivery-limit"] == -1
        assert "x-delivery-limit" not in variants["q.dlq"][1].arguments  # a pre-upgrade DLQ
    else:
        assert variants["q.dlq"] == [next(d for d in topo.queue_decls() if d.name == "q.dlq")]
    classic = Topology(queues=(WorkQueue(name="c"),))
    assert len(declaration_variants(classic, version)["c.dlq"]) == 1
