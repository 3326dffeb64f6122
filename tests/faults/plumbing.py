"""Fault-injection plumbing: a TCP proxy to cut, a broker node of our own, certificates, workers
as real subprocesses, and a place to record the figures ``docs/reliability.md`` reports.

The shared broker on 127.0.0.1:5672 is never stopped, alarmed or reconfigured: anything that
must move a broker does it to ``DedicatedNode``, a second RabbitMQ node started here on free
ports with its own data directory and its *own Erlang cookie*. The private cookie is a safety
catch as much as isolation: the ``rabbitmqctl`` calls made here cannot authenticate to any
other node, so a wrong node name can never stop someone else's broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from yarl import URL

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
SHARED_NODE = "rabbit@localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def record(scenario: str, **figures: Any) -> None:
    """Append one scenario's measured figures to ``$LEVERET_FAULT_REPORT`` (JSON lines), if set.

    The reliability table is filled from these lines, so the numbers in the docs come from runs,
    not from memory.
    """
    line = {"scenario": scenario, **figures}
    print(f"\nFAULT-FIGURES {json.dumps(line)}", file=sys.stderr)
    target = os.environ.get("LEVERET_FAULT_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")


# -- a TCP proxy the test can cut --------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream; ``cut()`` resets every connection at once.

    While ``down`` it accepts and immediately resets new connections, which is what a client
    sees when a broker or a load balancer in between goes away.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.down = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
        writer.transport.abort()

    def cut(self) -> int:
        """Reset every open connection (both sides); return how many were cut."""
        pairs = list(self._pairs)
        for client, upstream in pairs:
            self._reset(client)
            self._reset(upstream)
        self._pairs.clear()
        return len(pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self._reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._reset(writer)
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            if pair in self._pairs:
                self._pairs.discard(pair)
                for w in pair:
                    w.transport.abort()


# -- certificates --------------------------------------------------------------------------------


@dataclass
class Certs:
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting only it must fail


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a stranger
    CA, all generated with the openssl CLI (EC keys: quick to make)."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            *ec,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN=leveret test {name}",
            cwd=d,
        )
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            *ec,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={'localhost' if name == 'server' else 'leveret-client'}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    for key in d.glob("*.key"):
        key.chmod(0o644)  # the broker reads them; this is a throwaway test directory
    return Certs(
        d / "ca.pem",
        d / "ca.key",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "other-ca.pem",
    )


# -- a RabbitMQ node of our own ------------------------------------------------------------------


@dataclass
class DedicatedNode:
    """A second RabbitMQ node this test session may restart, alarm and reconfigure."""

    base: Path
    certs: Certs | None = None
    name: str = field(default_factory=lambda: f"leveret-fault-{uuid.uuid4().hex[:8]}@localhost")
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        return f"amqps://guest:guest@localhost:{self.tls_port}/"

    def env(self) -> dict[str, str]:
        b = self.base
        return {
            **os.environ,
            "HOME": str(b / "home"),  # the private Erlang cookie lives here
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_PID_FILE": str(b / "node.pid"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _write_config(self) -> None:
        b = self.base
        for sub in ("home", "mnesia", "log"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        cookie = b / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        lines = [f"listeners.tcp.default = 127.0.0.1:{self.port}", "loopback_users = none"]
        if self.certs is not None:
            c = self.certs
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {c.ca}",
                f"ssl_options.certfile = {c.server_cert}",
                f"ssl_options.keyfile = {c.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
            ]
        (b / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        # The consumer-timeout check runs on the channel tick; 1 s keeps that test short.
        (b / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
        (b / "enabled_plugins").write_text("[].\n")
        (b / "rabbitmq-env.conf").write_text("")

    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        """``rabbitmqctl -n <this node>``; refuses, by construction, to address the shared node."""
        assert self.name != SHARED_NODE and self.name.startswith("leveret-fault-")
        done = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-q", "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def _port_open(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def start(self, timeout: float = 90) -> None:
        self._write_config()
        subprocess.run(
            [str(RABBIT_BIN / "rabbitmq-server"), "-detached"],
            env=self.env(),
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._port_open() and "true" in self.ctl(
                "eval", "rabbit:is_running().", check=False
            ):
                return
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.base / "log").glob("*.log"))
        self.stop()
        raise RuntimeError(f"dedicated RabbitMQ node {self.name} did not start:\n{logs}")

    def stop(self) -> None:
        self.ctl("stop", check=False)
        pid_file = self.base / "node.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.2)
            os.kill(pid, signal.SIGKILL)  # our own node, by its own pid

    def wait_app(self, running: bool, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        want = "true" if running else "false"
        while time.monotonic() < deadline:
            is_running = self.ctl("eval", "rabbit:is_running().", check=False)
            if want in is_running and (not running or self._port_open()):
                return
            time.sleep(0.2)
        raise AssertionError(f"node {self.name} did not reach running={running}")


# -- workers as real processes ---------------------------------------------------------------------


def leveret_exe() -> str:
    return str(Path(sys.executable).parent / "leveret")


@dataclass
class WorkerProcess:
    """``leveret worker APP`` as a child process, stderr captured to a file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int

    @classmethod
    def start(
        cls,
        cwd: Path,
        app: str,
        url: str,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> WorkerProcess:
        port = free_port()
        log_path = cwd / f"worker-{uuid.uuid4().hex[:6]}.log"
        full_env = {
            **os.environ,
            "LEVERET_AMQP_URL": url,
            "LEVERET_METRICS_PORT": str(port),
            "LEVERET_METRICS_HOST": "127.0.0.1",
            "LEVERET_SHUTDOWN_GRACE": "5",
            **(env or {}),
        }
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [leveret_exe(), "worker", app, *args],
                cwd=cwd,
                env=full_env,
                stderr=log,
                stdout=subprocess.DEVNULL,
            )
        return cls(proc, log_path, port)

    def readyz(self) -> int | None:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2).status_code
        return None

    async def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.readyz() != 200:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout} s:\n{self.log()}")
            await asyncio.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker still running after {timeout} s:\n{self.log()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode


@contextlib.contextmanager
def reaped(*workers: WorkerProcess) -> Iterator[None]:
    """Never leave a worker process behind, whatever the test did."""
    try:
        yield
    finally:
        for w in workers:
            w.kill()


def with_password(url: str, user: str, password: str) -> str:
    return str(URL(url).with_user(user).with_password(password))


def tls_client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


# -- the subprocess app ----------------------------------------------------------------------


@dataclass
class FaultApp:
    """``app_template.py`` installed in a directory, with its queue and its run log."""

    cwd: Path
    queue: str
    log: Path
    url: str

    @property
    def job(self) -> str:
        return f"{self.queue}-job"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "FAULT_QUEUE": self.queue,
            "FAULT_LOG": str(self.log),
            "FAULT_MARKS": str(self.cwd / "marks"),
            **extra,
        }

    def worker(self, *, args: tuple[str, ...] = (), **extra: str) -> WorkerProcess:
        return WorkerProcess.start(self.cwd, "faultapp:worker", self.url, env=self.env(**extra),
                                   args=args)  # fmt: skip

    def runs(self) -> list[tuple[str, int, str, int]]:
        """(event, pid, job_id, attempt) for every line the handlers wrote."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            event, pid, job_id, attempt = line.split()
            out.append((event, int(pid), job_id, int(attempt)))
        return out

    async def declare(self) -> None:
        """Declare the app's topology from the test process, so publishing can start first."""
        import aio_pika

        from leveret.consumer import Worker, WorkerSettings
        from leveret.topology.declare import declare

        probe = Worker(WorkerSettings(amqp_url=self.url, metrics_port=0))

        @probe.job(self.job, queue=self.queue)
        async def _unused(payload: dict) -> None:  # type: ignore[type-arg]
            """Never runs: only its registration shapes the topology."""

        connection = await aio_pika.connect(self.url)
        async with connection:
            await declare(connection, probe.topology)


def install_app(directory: Path, queue: str, url: str) -> FaultApp:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "marks").mkdir(exist_ok=True)
    source = Path(__file__).with_name("app_template.py").read_text()
    (directory / "faultapp.py").write_text(source)
    return FaultApp(directory, queue, directory / "runs.log", url)
