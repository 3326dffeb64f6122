"""What the per-queue retry chain weighs on a 3-node quorum cluster, against a shared chain.

``python -m bench.chain_weight [--queues 20] [--json PATH]`` (about 5 minutes, two fresh
3-node clusters on ports 5711-5713 / 15711-15713; see ``tests/cluster/cluster.py``), or
``python -m bench.chain_weight --single amqp://guest:guest@127.0.0.1:5672/ [--counts 1,20,100]``
(a minute: classic queues in a fresh vhost of a running broker per design and count).

Since v3 the shared chain is what Leveret ships (``declare``); the per-queue design is the v2
layout, declared as the v2 code did (``tests/topology/v2.py``).

Today (``leveret.topology``) every work queue ``Q`` brings ``Q``, ``Q.dlq`` and ``DELAY_BITS``
``Q.retry.<ttl>`` queues (27 since the horizon became 388 days; 19 before); with
``queue_type="quorum"`` each is a Raft group with a member on every node. The alternative, the
one NServiceBus uses, is one set of ``DELAY_BITS`` delay queues per vhost shared by all work
queues, the routing key (already ``<bits>.q.<queue>``) carrying the
destination. Both designs are declared on a fresh cluster of their own, so neither inherits
the other's allocator state, and measured the same way:

* memory: ``mem_used`` of every node from the management API (``/api/nodes``), with the
  statistics interval cut to 1 s and the median of 3 samples after 5 s of settling; plus the
  quorum-queue share from ``/api/nodes/<node>?memory=true``;
* counts: ``/api/queues`` and ``/api/bindings``;
* a full-cluster restart: all three nodes stopped (``rabbitmqctl shutdown``), all three started
  at once; the time until every node runs and until every queue reports a leader and all three
  members online. The empty cluster's restart is the baseline;
* declaration time, and on-disk size of the nodes' data directories;
* a routing check: a retry published down the chain with a 0.5 s delay arrives in its work
  queue and in no other, so the shared design measured is one that works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import httpx
from aio_pika.abc import AbstractConnection
from yarl import URL

from leveret.topology import Topology, WorkQueue, declare, delay_levels, retry_route
from leveret.topology.delay import v2_exchange_name
from tests.cluster.cluster import Cluster
from tests.topology.v2 import declare_v2

EXCHANGE = "jobs"
STATS_CONFIG = "collect_statistics_interval = 1000\n"


def work_queues(count: int, queue_type: str = "quorum") -> list[WorkQueue]:
    return [
        WorkQueue(name=f"wq-{i:02d}", jobs=(f"job-{i:02d}",), queue_type=queue_type)
        for i in range(count)
    ]


async def declare_per_queue(conn: AbstractConnection, queues: list[WorkQueue]) -> None:
    """The v2 layout (27 ``Q.retry.<ttl>`` per work queue), as the v2 code declared it."""
    await declare_v2(conn, Topology(exchange=EXCHANGE, queues=tuple(queues)))


async def declare_shared(conn: AbstractConnection, queues: list[WorkQueue]) -> None:
    """The shipped layout: one shared chain of ``DELAY_BITS`` queues for the exchange."""
    await declare(conn, Topology(exchange=EXCHANGE, queues=tuple(queues)))


async def route_check(url: str, queues: list[WorkQueue], design: str = "shared") -> float:
    """Publish one retry for the 4th work queue (the last if fewer) with a 0.75 s delay (two
    set bits: it visits two delay queues) and time its arrival; fail if it lands elsewhere."""
    target = queues[min(3, len(queues) - 1)].name
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        ex_name, key = retry_route(EXCHANGE, 0.75, target)
        if design == "per-queue":  # the v2 chain's entry: its exchange of the highest bit
            ex_name = v2_exchange_name(EXCHANGE, max(delay_levels(0.75)))
        ex = await ch.get_exchange(ex_name, ensure=False)
        t0 = time.monotonic()
        await ex.publish(aio_pika.Message(b"probe", delivery_mode=2), routing_key=key)
        q = await ch.get_queue(target, ensure=False)
        deadline = t0 + 15
        while time.monotonic() < deadline:
            msg = await q.get(fail=False)
            if msg is not None:
                await msg.ack()
                took = time.monotonic() - t0
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the probe did not reach {target} within 15 s")
        for other in queues:
            if other.name != target:
                oq = await ch.declare_queue(other.name, passive=True)
                if oq.declaration_result.message_count:
                    raise AssertionError(f"the probe for {target} also reached {other.name}")
        return took
    finally:
        await conn.close()


def node_memory(cluster: Cluster) -> dict[str, Any]:
    """Median of 3 samples of ``mem_used`` per node, and the quorum-queue share."""
    samples: list[list[int]] = []
    for i in range(3):
        if i:
            time.sleep(1.2)
        nodes = sorted(cluster.api(0, "/api/nodes"), key=lambda n: n["name"])
        samples.append([n["mem_used"] for n in nodes])
    per_node = [int(statistics.median(col)) for col in zip(*samples, strict=True)]
    quorum = 0
    for n in cluster.nodes:
        mem = cluster.api(0, f"/api/nodes/{n.name}?memory=true")["memory"]
        quorum += sum(v for k, v in mem.items() if k.startswith("quorum") and isinstance(v, int))
    return {"per_node": per_node, "total": sum(per_node), "quorum": quorum}


def counts(cluster: Cluster) -> dict[str, int]:
    queues = cluster.api(0, "/api/queues?columns=name")
    bindings = cluster.api(0, "/api/bindings")
    return {"queues": len(queues), "bindings": len(bindings)}


def disk_kib(cluster: Cluster) -> int:
    out = subprocess.run(
        ["du", "-sk", *(str(n.dir / "mnesia") for n in cluster.nodes)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line.split()[0]) for line in out.splitlines())


def offline_members(cluster: Cluster, expect: int) -> int | None:
    """Raft members not online (no leader counts as all members down); None: not all listed."""
    try:
        qs = cluster.api(0, "/api/queues?columns=name,leader,online,members,state")
    except OSError:
        return None
    if len(qs) != expect:
        return None
    size = len(cluster.nodes)
    return sum(size if not q.get("leader") else size - len(q.get("online") or []) for q in qs)


def restart(cluster: Cluster, expect_queues: int, patience: float = 150) -> dict[str, Any]:
    """Stop all three, start all three; seconds until booted and until every queue is online.

    ``online_s`` is None when some Raft members were still down ``patience`` seconds after the
    nodes booted; ``offline_members`` says how many. On 3.10 a member whose at-least-once
    dead-letter worker cannot start during boot (``rabbit_fifo_dlx_sup`` not up yet) crashes
    and is not restarted (rabbitmq-server#16652 describes the same stranding under churn); it
    stays ``noproc`` until someone restarts it, so waiting longer does not help.
    """
    t_stop = time.monotonic()
    cluster.stop_all()
    stopped = time.monotonic() - t_stop
    t0 = time.monotonic()
    cluster.start_all()
    booted = time.monotonic() - t0
    cluster.wait_running(len(cluster.nodes), timeout=120)
    deadline = time.monotonic() + patience
    online_s: float | None = None
    offline: int | None = None
    while time.monotonic() < deadline:
        offline = offline_members(cluster, expect_queues)
        if offline == 0:
            online_s = time.monotonic() - t0
            break
        time.sleep(0.25)
    return {"stop_s": stopped, "boot_s": booted, "online_s": online_s, "offline_members": offline}


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def measure(design: str, n_queues: int, baseline_restart: bool) -> dict[str, Any]:
    cluster = Cluster(prefix="lvbench", first_port=5711, extra_config=STATS_CONFIG)
    out: dict[str, Any] = {"design": design, "load_at_start": loadavg()}
    t0 = time.monotonic()
    try:
        cluster.start()
        out["cluster_start_s"] = time.monotonic() - t0
        time.sleep(5)
        out["empty"] = {**node_memory(cluster), **counts(cluster), "disk_kib": disk_kib(cluster)}
        if baseline_restart:
            out["empty"]["restart"] = restart(cluster, out["empty"]["queues"])
            time.sleep(5)
        queues = work_queues(n_queues)
        fn = declare_per_queue if design == "per-queue" else declare_shared

        async def run() -> float:
            conn = await aio_pika.connect(cluster.amqp_urls[0])
            try:
                t = time.monotonic()
                await fn(conn, queues)
                return time.monotonic() - t
            finally:
                await conn.close()

        out["declare_s"] = asyncio.run(run())
        out["route_check_s"] = asyncio.run(route_check(cluster.amqp_urls[1], queues, design))
        time.sleep(5)
        loaded = {**node_memory(cluster), **counts(cluster), "disk_kib": disk_kib(cluster)}
        loaded["restart"] = restart(cluster, loaded["queues"])
        time.sleep(5)
        loaded["after_restart"] = node_memory(cluster)
        out["loaded"] = loaded
        out["load_at_end"] = loadavg()
    finally:
        t = time.monotonic()
        cluster.teardown()
        out["teardown_s"] = time.monotonic() - t
    return out


def _online(restart: dict[str, Any]) -> str:
    if restart["online_s"] is not None:
        return f"{restart['online_s']:.1f}"
    return f"never: {restart['offline_members']} Raft members still down"


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| | " + " | ".join(r["design"] for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]

    def row(label: str, fn: Any) -> None:
        rows.append(f"| {label} | " + " | ".join(fn(r) for r in results) + " |")

    row("queues", lambda r: str(r["loaded"]["queues"]))
    row("bindings", lambda r: str(r["loaded"]["bindings"]))
    row("declare time, s", lambda r: f"{r['declare_s']:.1f}")
    row("mem_used empty cluster, MiB (3 nodes)", lambda r: mib(r["empty"]["total"]))
    row("mem_used with the topology, MiB", lambda r: mib(r["loaded"]["total"]))
    row(
        "difference, MiB",
        lambda r: mib(r["loaded"]["total"] - r["empty"]["total"]),
    )
    row(
        "after a full restart, MiB (difference)",
        lambda r: (
            f"{mib(r['loaded']['after_restart']['total'])} "
            f"({mib(r['loaded']['after_restart']['total'] - r['empty']['total'])})"
        ),
    )
    row("quorum-queue memory, MiB", lambda r: mib(r["loaded"]["quorum"]))
    row(
        "data dirs on disk, MiB (empty → loaded)",
        lambda r: f"{r['empty']['disk_kib'] / 1024:.1f} → {r['loaded']['disk_kib'] / 1024:.1f}",
    )
    row(
        "full restart: nodes booted, s",
        lambda r: f"{r['loaded']['restart']['boot_s']:.1f}",
    )
    row("full restart: all queues online, s", lambda r: _online(r["loaded"]["restart"]))
    row(
        "empty-cluster restart (baseline), s",
        lambda r: _online(r["empty"]["restart"]) if "restart" in r["empty"] else "-",
    )
    row("probe retry (0.75 s) arrived after, s", lambda r: f"{r['route_check_s']:.2f}")
    row(
        "cluster start / teardown, s",
        lambda r: f"{r['cluster_start_s']:.0f} / {r['teardown_s']:.0f}",
    )
    row("load average start → end", lambda r: f"{r['load_at_start']:.1f} → {r['load_at_end']:.1f}")
    return "\n".join(rows)


def _api(mgmt: str, method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(
        method, f"{mgmt}/api{path}", auth=("guest", "guest"), timeout=180, json=body
    )
    response.raise_for_status()
    return response.json() if response.content else None


def measure_single(amqp: str, mgmt: str, n_queues: int, design: str) -> dict[str, Any]:
    """One design with ``n_queues`` classic work queues in a fresh vhost of a running broker:
    queue and binding counts, declaration time, the queues' own memory (``/api/queues``
    ``memory``, summed) and the node's ``mem_used`` before and after (noisy on a shared broker).
    The vhost is deleted afterwards."""
    vhost = f"chainweight-{design}-{n_queues}-{int(time.time())}"
    qv = quote(vhost, safe="")
    _api(mgmt, "PUT", f"/vhosts/{qv}")
    try:
        _api(
            mgmt,
            "PUT",
            f"/permissions/{qv}/guest",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        time.sleep(2)
        before = sum(n["mem_used"] for n in _api(mgmt, "GET", "/nodes"))
        queues = work_queues(n_queues, "classic")
        fn = declare_per_queue if design == "per-queue" else declare_shared
        url = f"{amqp.rstrip('/')}/{qv}"

        async def run() -> float:
            conn = await aio_pika.connect(url)
            try:
                t = time.monotonic()
                await fn(conn, queues)
                return time.monotonic() - t
            finally:
                await conn.close()

        declare_s = asyncio.run(run())
        route_s = asyncio.run(route_check(url, queues, design))
        time.sleep(6)  # statistics interval: queue memory figures refresh every 5 s
        listed = _api(mgmt, "GET", f"/queues/{qv}?columns=name,memory")
        after = sum(n["mem_used"] for n in _api(mgmt, "GET", "/nodes"))
        return {
            "design": design,
            "work_queues": n_queues,
            "queues": len(listed),
            "delay_queues": sum(".retry." in q["name"] or ".delay." in q["name"] for q in listed),
            "bindings": len(_api(mgmt, "GET", f"/bindings/{qv}")),
            "declare_s": declare_s,
            "route_check_s": route_s,
            "queue_memory": sum(int(q.get("memory") or 0) for q in listed),
            "mem_used_delta": after - before,
        }
    finally:
        _api(mgmt, "DELETE", f"/vhosts/{qv}")


def single_table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| work queues | design | queues (delay) | bindings | declare, s | queue memory, MiB "
        "| node mem_used delta, MiB | probe retry 0.75 s, s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r['work_queues']} | {r['design']} | {r['queues']} ({r['delay_queues']}) "
            f"| {r['bindings']} | {r['declare_s']:.2f} | {mib(r['queue_memory'])} "
            f"| {mib(r['mem_used_delta'])} | {r['route_check_s']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chain_weight", description=__doc__)
    parser.add_argument("--queues", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument(
        "--single",
        metavar="AMQP_URL",
        help="quick mode: classic queues on this running broker (management on 15672), "
        "for each of --counts work queues, no cluster",
    )
    parser.add_argument("--counts", default="1,20,100", help="work queue counts for --single")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    if args.single:
        host = URL(args.single).host or "127.0.0.1"
        mgmt = f"http://{host}:15672"
        single = [
            measure_single(args.single, mgmt, int(n), design)
            for n in args.counts.split(",")
            for design in ("per-queue", "shared")
        ]
        if args.json:
            args.json.write_text(json.dumps(single, indent=2))
        print(single_table(single))
        print(f"\n(total {time.monotonic() - t0:.0f} s)", file=sys.stderr)
        return 0
    results = [
        measure("per-queue", args.queues, baseline_restart=True),
        measure("shared", args.queues, baseline_restart=False),
    ]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\n(total {time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
