from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.plumbing import RABBIT_BIN, Certs, DedicatedNode, make_certs


@pytest.fixture(scope="session")
def certs() -> Iterator[Certs]:
    """Throwaway CA, server and client certificates for the TLS tests."""
    directory = Path(tempfile.mkdtemp(prefix="leveret-certs-"))
    try:
        yield make_certs(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def node(certs: Certs) -> Iterator[DedicatedNode]:
    """A RabbitMQ node of this session's own (TLS listener included), free to restart and alarm."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.fail("rabbitmq-server is not installed here: broker fault tests need a local node")
    base = Path(tempfile.mkdtemp(prefix="leveret-node-"))
    base.chmod(0o755)
    dedicated = DedicatedNode(base, certs)
    dedicated.start()
    try:
        yield dedicated
    finally:
        dedicated.stop()
        shutil.rmtree(base, ignore_errors=True)
