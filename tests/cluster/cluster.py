"""A throwaway 3-node RabbitMQ cluster on this machine, for tests and benchmarks.

Why a cluster of local processes rather than containers: CI machines have RabbitMQ installed
from the distribution (``scripts/setup.sh``) and may have no Docker; three ``rabbitmq-server``
processes with their own names, ports, data directories and cookie are a real cluster (Raft,
Mnesia, inter-node links) that starts in seconds.

Isolation from the machine's own node (``rabbit@localhost`` on 5672/15672, used by the rest of
the suite) is the point of most of the environment below:

* the Debian wrappers in ``/usr/sbin`` ``su`` to the ``rabbitmq`` user and would use *its*
  cookie, so the real scripts in ``/usr/lib/rabbitmq/bin`` are called directly;
* ``/etc/rabbitmq/rabbitmq-env.conf`` sets ``NODENAME`` and ``/etc/rabbitmq/rabbitmq.conf`` a
  5672 listener, so every node gets its own ``RABBITMQ_CONF_ENV_FILE`` and
  ``RABBITMQ_CONFIG_FILE``;
* ``/etc/rabbitmq/enabled_plugins`` enables ``rabbitmq_prometheus`` on the fixed port 15692,
  so the nodes read their own plugins file (management only, on ``15701…``);
* the cookie: ``RABBITMQ_ERLANG_COOKIE`` is deprecated in 3.x, so ``HOME`` points at the
  cluster's directory holding a ``.erlang.cookie`` of its own; the server nodes and every
  ``rabbitmqctl`` call here read it from there.

Every ``rabbitmqctl`` call names its node with ``-n``; node names must not be ``rabbit@…``.
The machine has 2 cores, so each node runs one scheduler (``+S 1:1``) and the CLI tools, each a
short-lived Erlang VM, are called as rarely as possible.

Use from Python (``Cluster().start()`` … ``teardown()``) or from a shell::

    python -m tests.cluster.cluster up      # prints the URLs and the directory
    python -m tests.cluster.cluster down DIR
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "localhost"
_SBIN_CANDIDATES = ("/usr/lib/rabbitmq/bin",)


class ClusterError(RuntimeError):
    """The cluster did not reach the state asked for; the message names the node and its log."""


def find_sbin() -> Path | None:
    """The directory with the real ``rabbitmq-server``/``rabbitmqctl`` scripts, if installed.

    ``LEVERET_RABBITMQ_SBIN`` wins; then Debian's ``/usr/lib/rabbitmq/bin`` (the ``/usr/sbin``
    wrappers switch user and cookie); then whatever ``rabbitmq-server`` is on ``PATH`` (a
    generic-unix or Homebrew install has no wrapper).
    """
    env = os.environ.get("LEVERET_RABBITMQ_SBIN")
    candidates = [env] if env else []
    candidates.extend(_SBIN_CANDIDATES)
    on_path = shutil.which("rabbitmq-server")
    if on_path and Path(on_path).parent != Path("/usr/sbin"):
        candidates.append(str(Path(on_path).resolve().parent))
    for c in candidates:
        if c and (Path(c) / "rabbitmq-server").exists() and (Path(c) / "rabbitmqctl").exists():
            return Path(c)
    return None


@dataclass(frozen=True)
class Node:
    """One member: its Erlang node name, its ports and its directory."""

    name: str
    amqp_port: int
    mgmt_port: int
    dist_port: int
    dir: Path

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def mgmt_url(self) -> str:
        return f"http://127.0.0.1:{self.mgmt_port}"

    @property
    def pid_file(self) -> Path:
        return self.dir / "pid"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"


@dataclass
class Cluster:
    """Three (or ``size``) nodes ``<prefix>-a@localhost`` … joined into one cluster.

    Ports: AMQP ``first_port + i``, management ``first_port + 10000 + i``, distribution
    ``first_port + 20000 + i``; the CLI tools bind in ``first_port + 30000 … + 30049``.
    """

    prefix: str = "leveret"
    size: int = 3
    first_port: int = 5701
    base: Path | None = None
    sbin: Path | None = None
    #: Extra ``rabbitmq.conf`` lines for every node (e.g. a shorter statistics interval).
    extra_config: str = ""
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.prefix == "rabbit":
            raise ValueError("refusing the prefix 'rabbit': that is the machine's own node")
        if self.sbin is None:
            self.sbin = find_sbin()
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-cluster-"))
        letters = "abcdefghij"
        self.nodes = [
            Node(
                name=f"{self.prefix}-{letters[i]}@{HOST}",
                amqp_port=self.first_port + i,
                mgmt_port=self.first_port + 10000 + i,
                dist_port=self.first_port + 20000 + i,
                dir=self.base / letters[i],
            )
            for i in range(self.size)
        ]

    # -- environment --------------------------------------------------------------------

    def _require_sbin(self) -> Path:
        if self.sbin is None:
            raise ClusterError("rabbitmq-server is not installed (run scripts/setup.sh)")
        return self.sbin

    def _write_files(self) -> None:
        assert self.base is not None
        cookie = self.base / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20).upper())
            cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[rabbitmq_management].\n")
        # An empty env file shadows /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost).
        (self.base / "rabbitmq-env.conf").write_text("")
        for n in self.nodes:
            n.dir.mkdir(parents=True, exist_ok=True)
            n.log_dir.mkdir(exist_ok=True)
            (n.dir / "rabbitmq.conf").write_text(
                f"listeners.tcp.1 = 127.0.0.1:{n.amqp_port}\n"
                f"management.tcp.ip = 127.0.0.1\n"
                f"management.tcp.port = {n.mgmt_port}\n"
                f"cluster_name = {self.prefix}-test\n"
                # RabbitMQ's defaults, written out: every node of three on one machine would
                # raise its memory alarm at 40 % of *all* its RAM, so a leak shows late.
                "vm_memory_high_watermark.relative = 0.4\n"
                "disk_free_limit.absolute = 50MB\n"
                "log.console = false\n"
                "log.file.level = info\n" + self.extra_config
            )

    def _env(self, node: Node | None = None) -> dict[str, str]:
        assert self.base is not None
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in {"HOME"}
        }
        env.update(
            HOME=str(self.base),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            # The CLI tools' own distribution ports: a range of this cluster's, not the default
            # 35672-35682 that every rabbitmqctl on the machine (the shared node's) competes for.
            RABBITMQ_CTL_DIST_PORT_MIN=str(self.first_port + 30000),
            RABBITMQ_CTL_DIST_PORT_MAX=str(self.first_port + 30049),
        )
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.amqp_port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_CONFIG_FILE=str(node.dir / "rabbitmq.conf"),
                RABBITMQ_MNESIA_BASE=str(node.dir / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.log_dir),
                RABBITMQ_PID_FILE=str(node.pid_file),
                RABBITMQ_PLUGINS_EXPAND_DIR=str(node.dir / "plugins-expand"),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                    "+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none "
                    "-kernel inet_dist_use_interface {127,0,0,1}"
                ),
            )
        return env

    def ctl(self, node: Node | int, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> …`` with this cluster's cookie; raise with its output."""
        n = self.nodes[node] if isinstance(node, int) else node
        cmd = [str(self._require_sbin() / "rabbitmqctl"), "-n", n.name, *args]
        proc = subprocess.run(
            cmd, env=self._env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise ClusterError(
                f"{' '.join(cmd[1:])} failed ({proc.returncode}): "
                f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
            )
        return proc.stdout

    # -- one node -----------------------------------------------------------------------

    def _launch(self, node: Node) -> None:
        """Start the node's VM in the background; ``_await`` waits for RabbitMQ inside it."""
        if node.pid_file.exists():
            node.pid_file.unlink()
        subprocess.run(
            [str(self._require_sbin() / "rabbitmq-server"), "-detached"],
            env=self._env(node),
            cwd=node.dir,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def _await(self, node: Node, timeout: float = 120) -> None:
        """``rabbitmqctl wait <pidfile>``: waits for the pid file, then for the app to run."""
        try:
            self.ctl(
                node,
                "wait",
                "--timeout",
                str(int(timeout)),
                str(node.pid_file),
                timeout=timeout + 30,
            )
        except (ClusterError, subprocess.TimeoutExpired) as exc:
            raise ClusterError(f"{node.name} did not start: {exc}; log: {node.log_dir}") from exc

    def start_node(self, node: Node | int, wait: bool = True) -> None:
        """Start one stopped node again; it rejoins the cluster from its own data directory."""
        n = self.nodes[node] if isinstance(node, int) else node
        self._launch(n)
        if wait:
            self._await(n)

    def stop_node(self, node: Node | int) -> None:
        """Stop one node's RabbitMQ and VM and wait until the OS process is gone."""
        n = self.nodes[node] if isinstance(node, int) else node
        self.ctl(n, "shutdown", timeout=120)

    # -- the whole cluster --------------------------------------------------------------

    def start(self, timeout: float = 180) -> None:
        """Start all nodes fresh and join the others to the first; return when all run.

        Steps that do not depend on each other run in parallel: each CLI call is an Erlang VM
        that takes a second or two to boot on a busy 2-core machine. The joins themselves go
        one at a time, the safe order for Mnesia.
        """
        self._require_sbin()
        busy = [
            p
            for n in self.nodes
            for p in (n.amqp_port, n.mgmt_port, n.dist_port)
            if _port_in_use(p)
        ]
        if busy:
            raise ClusterError(
                f"ports {busy} are in use: another test cluster still running? "
                f"(`python -m tests.cluster.cluster down DIR` stops one; DIR is /tmp/"
                f"{self.prefix}-cluster-*)"
            )
        self._write_files()
        self.start_all()
        first, rest = self.nodes[0], self.nodes[1:]
        _parallel(lambda n: self.ctl(n, "stop_app"), rest)
        for n in rest:
            self.ctl(n, "join_cluster", first.name)
        _parallel(lambda n: self.ctl(n, "start_app", timeout=180), rest)
        self.wait_running(len(self.nodes), timeout=timeout)

    def start_all(self) -> None:
        """Start every node at once and wait for all.

        At once, because a clustered node waits at boot for the peers it last saw running.
        """
        for n in self.nodes:
            self._launch(n)
        _parallel(self._await, self.nodes)

    def stop_all(self) -> None:
        """Stop every node in an orderly way (all at once, like a full-cluster restart)."""
        _parallel(self.stop_node, [n for n in self.nodes if self._alive(n)])

    def kill_node(self, node: Node | int) -> None:
        """SIGKILL one node's VM: a crash, not a shutdown (for node-loss tests)."""
        n = self.nodes[node] if isinstance(node, int) else node
        pid = self._pid(n)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 30)

    def running_nodes(self, via: Node | int = 0) -> list[str]:
        """Names of the running members, as node ``via`` sees them (its management API)."""
        n = self.nodes[via] if isinstance(via, int) else via
        nodes = self.api(n, "/api/nodes")
        return sorted(x["name"] for x in nodes if x.get("running"))

    def wait_running(self, count: int, timeout: float = 120, via: Node | int = 0) -> list[str]:
        deadline = time.monotonic() + timeout
        last: list[str] | str = []
        while time.monotonic() < deadline:
            try:
                last = self.running_nodes(via)
                if len(last) == count:
                    return last
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise ClusterError(f"expected {count} running nodes, last saw {last}")

    def api(self, node: Node | int, path: str) -> Any:
        """GET from a node's management API as guest (guest may log in over loopback)."""
        n = self.nodes[node] if isinstance(node, int) else node
        req = urllib.request.Request(
            n.mgmt_url + path,
            headers={"Authorization": "Basic " + b64encode(b"guest:guest").decode()},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    @staticmethod
    def _pid(node: Node) -> int | None:
        try:
            return int(node.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _running(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie (our own exited child) still answers signal 0; reap it if it is ours.
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        return True

    def _alive(self, node: Node) -> bool:
        pid = self._pid(node)
        return pid is not None and self._running(pid)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._running(pid):
                return True
            time.sleep(0.1)
        return False

    def teardown(self) -> None:
        """Stop every node and delete the directory; safe to call twice or half-started.

        The data is about to be deleted, so there is no orderly ``rabbitmqctl shutdown`` (a
        CLI VM per node): SIGTERM, which the Erlang VM treats as ``init:stop()``, to each
        node's own pid (from its pid file, never by name), SIGKILL after 30 s.
        """
        pids = [p for p in (self._pid(n) for n in self.nodes) if p is not None]
        pids = [p for p in pids if self._running(p)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for pid in pids:
            if not self._wait_gone(pid, max(0.0, deadline - time.monotonic())):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid, 10)
        if self.base is not None and self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def amqp_urls(self) -> list[str]:
        return [n.amqp_url for n in self.nodes]

    @property
    def mgmt_urls(self) -> list[str]:
        return [n.mgmt_url for n in self.nodes]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _parallel(fn: Callable[[Node], object], nodes: Iterable[Node]) -> None:
    """Run ``fn`` for each node in a thread of its own; re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(fn, n) for n in nodes]:
            future.result()


def _main(argv: Iterable[str]) -> int:
    args = list(argv)
    if args[:1] == ["up"]:
        c = Cluster()
        t0 = time.monotonic()
        try:
            c.start()
        except BaseException:
            c.teardown()
            raise
        print(f"cluster up in {time.monotonic() - t0:.1f} s; directory {c.base}")
        for n in c.nodes:
            print(f"  {n.name}  {n.amqp_url}  {n.mgmt_url}")
        return 0
    if args[:1] == ["down"] and len(args) == 2:
        Cluster(base=Path(args[1])).teardown()
        return 0
    print("usage: python -m tests.cluster.cluster up | down DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
