"""A private PostgreSQL cluster for the history tests: initdb in a temp dir, pg_ctl on a free
port. The tests never touch the machine's own cluster (they stop and start their own for the
outage tests). As root the cluster runs as the ``postgres`` user (initdb refuses root).

The binaries are found in ``LEVERET_TEST_PG_BIN``, then ``/usr/lib/postgresql/<newest>/bin``,
then next to ``pg_ctl`` on PATH; scripts/setup.sh installs them where they are missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    configured = os.environ.get("LEVERET_TEST_PG_BIN")
    if configured:
        return Path(configured)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One initdb'd cluster; ``url(db)`` to connect (trust auth on 127.0.0.1)."""

    def __init__(self, bindir: Path, root: Path, port: int, user: str | None) -> None:
        self.bindir, self.root, self.port, self.user = bindir, root, port, user
        self.data = root / "data"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return subprocess.run(
            [*prefix, *args], capture_output=True, text=True, check=check, timeout=120
        )

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale",
            "C",
        )

    def start(self, fsync: bool = False) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            f"-c fsync={'on' if fsync else 'off'} -c full_page_writes=off "
            "-c max_connections=100"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "stop",
            check=False,
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.url(database),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        return done.stdout.strip()


@contextlib.contextmanager
def private_cluster(fsync: bool = False) -> Iterator[Cluster]:
    """A started cluster, stopped and removed afterwards; skips when PostgreSQL is missing."""
    bindir = _bindir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL binaries not found (scripts/setup.sh installs them)")
    user: str | None = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            pytest.skip("running as root and there is no postgres user for initdb")
    root = Path(tempfile.mkdtemp(prefix="leveret-pg-"))
    if user is not None:
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = Cluster(bindir, root, free_port(), user)
    try:
        cluster.init()
        cluster.start(fsync=fsync)
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")
