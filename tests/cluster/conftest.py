"""A 3-node RabbitMQ cluster for the tests in this folder, started once per session.

The fixture is lazy: a run that selects no test here (``-m "not cluster"``) starts nothing. The
cluster is ``leveret-{a,b,c}@localhost`` on AMQP 5701-5703 and management 15701-15703, in a
temporary directory deleted afterwards; the machine's own node on 5672 is never touched (see
``cluster.py``). How long the start and the teardown took is printed in the terminal summary,
so a CI log shows what the cluster costs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.cluster.cluster import Cluster, find_sbin

_TIMES = pytest.StashKey[dict[str, float]]()


def pytest_configure(config: pytest.Config) -> None:
    # Registered here until pyproject.toml lists it (the suite runs with --strict-markers).
    config.addinivalue_line(
        "markers",
        "cluster: needs a 3-node RabbitMQ cluster on this machine (about a minute to start); "
        'skip with -m "not cluster"',
    )
    config.stash[_TIMES] = {}


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three joined nodes; ``cluster.amqp_urls`` / ``cluster.mgmt_urls`` in node order."""
    if find_sbin() is None:
        pytest.skip("rabbitmq-server is not installed here (scripts/setup.sh installs it)")
    times = request.config.stash[_TIMES]
    c = Cluster()
    t0 = time.monotonic()
    try:
        c.start()
    except BaseException:
        c.teardown()
        raise
    times["start_s"] = time.monotonic() - t0
    try:
        yield c
    finally:
        t1 = time.monotonic()
        c.teardown()
        times["teardown_s"] = time.monotonic() - t1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    times = terminalreporter.config.stash.get(_TIMES, {})
    if times:
        parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in times.items())
        terminalreporter.write_line(f"3-node test cluster: {parts}")
