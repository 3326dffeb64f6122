from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.history.pg import Cluster, private_cluster

pytest.importorskip("asyncpg")


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    """One private PostgreSQL cluster for the history tests of this run."""
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture
def history_url(pg: Cluster) -> Iterator[str]:
    """A database of the test's own, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.psql(f"CREATE DATABASE {name}")
    try:
        yield pg.url(name)
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def store(history_url: str) -> AsyncIterator[object]:
    from leveret.consumer.history.store import HistoryStore

    s = HistoryStore(history_url)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()
