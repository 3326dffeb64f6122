"""The README's demo: a real worker, real jobs, and what happened to each.

Starts `leveret worker demo_app:worker` as a subprocess, publishes jobs that succeed, retry,
get rejected, fail for good and carry a bad payload, waits for every outcome, then prints where
each job ended up, the DLQ's headers, the worker's metrics and where to look in the management
UI. With Redis (LEVERET_STATUS_URL) it also shows a job's status changing, and runs the order
pipeline of examples/orders: orders POSTed to `leveret api orders.app:worker`, each followed
through its steps to `order_done` (or to the DLQ). Exits 0 when every job ended where it should;
`--keep` leaves the workers and the web consoles running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import httpx
from orders.services import GOOD_CARD, TIMEOUT_CARD
from rich import box
from rich.console import Console
from rich.table import Table
from yarl import URL

from leveret import Publisher, WorkerSettings
from leveret.producers import mask_url
from leveret.producers.broker import split_urls
from leveret.producers.wire import events_exchange

HERE = Path(__file__).resolve().parent
QUEUES = ("email", "images")

JOBS = [
    # (job, payload, what should happen)
    ("send_email", {"to": "ada@example.com", "subject": "welcome"}, "succeeded"),
    ("send_email", {"to": "grace@example.com", "subject": "invoice"}, "succeeded"),
    ("send_email", {"to": "flaky@example.com", "subject": "retry me"}, "succeeded after a retry"),
    ("send_email", {"to": "nobody@invalid", "subject": "bounce"}, "DLQ: rejected"),
    ("resize_image", {"image": "cat.png", "width": 320}, "succeeded"),
    ("resize_image", {"image": "dog.png", "width": 0}, "DLQ: exhausted after 2 attempts"),
    ("send_email", {"to": "carol@example.com"}, "DLQ: invalid (no subject)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


async def _dead_letters(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Read the DLQ without changing it: get each message and requeue them all at the end."""
    connection = await aio_pika.connect(url)
    messages = []
    try:
        channel = await connection.channel()
        dlq = await channel.declare_queue(f"{queue}.dlq", passive=True)
        while (message := await dlq.get(no_ack=False, fail=False)) is not None:
            messages.append(message)
    finally:
        await connection.close()  # unacked messages return to the DLQ
    return messages


def _wait_ready(
    port: int, proc: subprocess.Popen[bytes], timeout: float = 30, what: str = "the worker"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what} did not become ready in time; see its log above")


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``leveret ARGS`` from examples/, its output (stdout and stderr) in ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "leveret"), *args],
            cwd=HERE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _start_api(
    app: str, log_path: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str, str]:
    """``leveret api APP`` with a token of its own: the HTTP API and the console. Returns the
    process, its base URL and the token at once; ``_wait_api`` waits until it answers."""
    port, token = _free_port(), secrets.token_urlsafe(16)
    env = {**(env or os.environ), "LEVERET_API_TOKEN": token, "LEVERET_METRICS_PORT": "0"}
    proc = _spawn(["api", app, "--port", str(port)], env, log_path)
    return proc, f"http://127.0.0.1:{port}", token


def _wait_api(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ui/login", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"the API and console did not start; see {log_path}")


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 40) -> None:
    """SIGTERM to each at once (one signal: a second makes a worker give up on its jobs), then
    wait for each, killing what is still there after ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def _metrics(port: int, name: str = "leveret_jobs_completed_total") -> list[str]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    lines = text.splitlines()
    return [line for line in lines if line.startswith(name) and not line.endswith(" 0.0")]


def _value(lines: list[str]) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def _show_status(url: str, status_url: str) -> None:
    """Publish one job and print its status each time it changes: queued → started (with its
    progress) → succeeded with its result, as `pub.status()` and `leveret job show` read it."""
    _say(f"\njob status (Redis {mask_url(status_url)}): one job, read every 50 ms as it runs")
    async with Publisher(url, status_url=status_url) as pub:
        # A 1 s delay, so that `queued` is there to see before a worker starts it.
        job_id = await pub.publish(
            "make_thumbnails", {"image": "cat.png", "sizes": [64, 128, 256]}, delay=1.0
        )
        last = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = await pub.status(job_id)
            seen = None if status is None else (status.state, status.progress, status.message)
            if status is not None and seen != last:
                last = seen
                extra = (
                    f"  progress={status.progress:.0%} {status.message!r}"
                    if (status.progress is not None and status.state == "started")
                    else ""
                )
                if status.state == "succeeded":
                    extra = f"  result={json.dumps(status.result)}"
                _say(f"  {job_id[:8]}  {status.state:<9} attempt={status.attempt}{extra}")
                if status.ended:
                    break
            await asyncio.sleep(0.05)
        _say(f"try: LEVERET_STATUS_URL={status_url} leveret job show {job_id}")


async def _show_schedule(port: int) -> None:
    """The schedule fires tidy_up every 2 s: wait for two ticks and show who fired them."""
    _say("\nschedule tidy-up (every 2 s; one leader among the worker processes fires each tick):")
    deadline = time.monotonic() + 15
    while _value(_metrics(port, "leveret_schedule_ticks_total")) < 2:
        if time.monotonic() > deadline:
            _say("  no tick yet; see the worker log (scheduler_leader, schedule_fired)")
            return
        await asyncio.sleep(0.2)
    for line in _metrics(port, "leveret_scheduler_leader") + _metrics(
        port, "leveret_schedule_ticks_total"
    ):
        _say(f"  {line}")
    _say("try: leveret schedule list demo_app:worker (from examples/)")


# -- the order pipeline (examples/orders) --------------------------------------------------------

# The order app runs in a vhost of its own: queues are named by the app, not by the exchange, so
# its `email` queue would otherwise be the demo app's `email` queue, and each worker would take
# the other's `send_email` jobs.
ORDERS_VHOST = "leveret-demo-orders"
# Every job of the pipeline, in the order an order goes through them.
ORDER_STEPS = (
    "place_order",
    "reserve_stock",
    "charge",
    "fulfil",
    "send_email",
    "make_invoice",
    "order_done",
)
# A step of the chain that ends dead ends the order (a follow-up is published only when its step
# succeeded); a group member that ends dead does not: order_done still runs and records it.
CHAIN = ("place_order", "reserve_stock", "charge", "fulfil")
OUTCOME_STYLE = {"succeeded": "green", "retrying": "yellow", "dead": "red", "cancelled": "red"}


@dataclass
class OrderApp:
    """``leveret worker orders.app:worker`` and ``leveret api orders.app:worker`` on their vhost."""

    url: str  # the AMQP URL of ORDERS_VHOST
    exchange: str
    status_url: str
    worker: subprocess.Popen[bytes]
    metrics_port: int
    worker_log: Path
    api: subprocess.Popen[bytes]
    api_url: str
    api_log: Path
    token: str


@dataclass
class Tracker:
    """What the demo sees of the pipeline from outside, as any AMQP client could: a copy of
    every job published (a queue of its own bound to the jobs exchange with the step names:
    job id -> step and payload, so each job is known by its order id) and the worker's outcome
    events (``LEVERET_EVENTS=outcomes`` on ``<exchange>.events``: each run's ending)."""

    jobs: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    async def on_job(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.message_id:
            self.jobs[message.message_id] = (message.routing_key or "", json.loads(message.body))

    async def on_event(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.events.append(json.loads(message.body))

    def runs(self, order_id: str) -> list[tuple[str, dict[str, Any]]]:
        """``(step, event)`` of each run of ``order_id``'s jobs: the jobs in the order they were
        published (each step publishes the next), a job's runs by attempt."""
        published = {job_id: n for n, job_id in enumerate(self.jobs)}
        found = [
            (self.jobs[e["job_id"]][0], e)
            for e in self.events
            if self.jobs.get(e["job_id"], ("", {}))[1].get("order_id") == order_id
        ]
        found.sort(key=lambda pair: (published[pair[1]["job_id"]], pair[1]["attempt"]))
        return found

    def ended(self, order_id: str) -> bool:
        return any(
            (step == "order_done" and e["state"] in ("succeeded", "dead"))
            or (step in CHAIN and e["state"] == "dead")
            for step, e in self.runs(order_id)
        )


def _with_vhost(url: str, vhost: str) -> str:
    """``url`` (each node of a comma-separated list) naming ``vhost`` instead of its own."""
    nodes = [URL(node) for node in split_urls(url)]
    path = "/" + quote(vhost, safe="")
    return ",".join(str(n.with_path(path, encoded=True).with_query(n.query)) for n in nodes)


def _create_vhost(settings: WorkerSettings, vhost: str) -> str | None:
    """Create ``vhost`` and give the AMQP user every right on it, through the management API
    (both idempotent). Returns why that was not possible, or None."""
    from leveret.consumer.ops.management import ManagementTarget

    target = ManagementTarget.from_settings(settings)
    qvhost, quser = quote(vhost, safe=""), quote(target.user, safe="")
    rights = {"configure": ".*", "write": ".*", "read": ".*"}
    for path, body in ((f"/vhosts/{qvhost}", None), (f"/permissions/{qvhost}/{quser}", rights)):
        try:
            response = httpx.put(
                f"{target.base}/api{path}",
                json=body,
                auth=(target.user, target.password),
                timeout=10,
            )
        except httpx.HTTPError as exc:
            return f"the management API at {target.display} is not reachable ({exc!r})"
        if response.status_code >= 300:
            return (
                f"the management API at {target.display} answered {response.status_code} "
                f"to PUT /api{path} (creating a vhost takes a user with the administrator tag)"
            )
    return None


def _start_orders(settings: WorkerSettings, status_url: str, log_dir: Path) -> OrderApp:
    """The order worker and its HTTP API, started at once (they come up while the rest of the
    demo runs); the worker publishes its outcome events, which the demo follows."""
    url = _with_vhost(settings.amqp_url.get_secret_value(), ORDERS_VHOST)
    env = {**os.environ, "LEVERET_AMQP_URL": url, "LEVERET_STATUS_URL": status_url}
    port = _free_port()
    worker_log = log_dir / "leveret-demo-orders-worker.log"
    worker = _spawn(
        ["worker", "orders.app:worker"],
        {**env, "LEVERET_METRICS_PORT": str(port), "LEVERET_EVENTS": "outcomes"},
        worker_log,
    )
    api_log = log_dir / "leveret-demo-orders-api.log"
    api, api_url, token = _start_api("orders.app:worker", api_log, env)
    return OrderApp(
        url, settings.exchange, status_url, worker, port, worker_log, api, api_url, api_log, token
    )


def _money(cents: int) -> str:
    return f"{cents / 100:.2f}"


def _detail(step: str, event: dict[str, Any]) -> str:
    """One run's ending in words: the error, or what its result says."""
    if event["state"] != "succeeded":
        return str(event.get("error") or "")
    result = event.get("result")
    if step == "fulfil":
        return f"published the group {result}"
    if not isinstance(result, dict):
        return "" if result is None else json.dumps(result)
    if step == "place_order":
        return f"valid, total {_money(result['total_cents'])}; next: reserve_stock"
    if step == "reserve_stock":
        return f"{result['qty']} x {result['sku']} reserved holding lock stock:{result['sku']}"
    if step == "charge":
        return f"charged {_money(result['cents'])} as {result['charge_id']}, once per order id"
    if step == "send_email":
        return f"mailed {result['to']}"
    if step == "make_invoice":
        return f"{result['invoice']} for {_money(result['cents'])}"
    if step == "order_done":
        return f"{result['state']}: {result['invoice']}, mailed {result['emailed']}"
    return json.dumps(result)


async def _post_order(client: httpx.AsyncClient, order: dict[str, Any]) -> httpx.Response:
    """POST /jobs/place_order; the API answers 503 until it is connected to the broker."""
    deadline = time.monotonic() + 20
    while True:
        response = await client.post("/jobs/place_order", json=order)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.1)


async def _show_orders(app: OrderApp, console: Console) -> bool:
    """POST two orders and a malformed request to the order API, follow each order through
    its steps and print them; True when each ended as it should."""
    run = secrets.token_hex(2).upper()  # fresh order ids: idempotency keys remember old ones
    good: dict[str, Any] = {
        "order_id": f"D{run}-1", "sku": "LEV-MUG", "qty": 2, "card": TIMEOUT_CARD,
        "email": "ada@example.com",
    }  # fmt: skip
    bad: dict[str, Any] = {
        "order_id": f"D{run}-2", "sku": "LEV-SOFA", "qty": 1, "card": GOOD_CARD,
        "email": "grace@example.com",
    }  # fmt: skip
    # No card, no email: the API refuses it (422) before anything is published.
    malformed: dict[str, Any] = {"order_id": f"D{run}-3", "sku": "LEV-TEE", "qty": 1}
    orders = [
        (good, "card ...0119: the payment sandbox times out once, so charge is retried"),
        (bad, "LEV-SOFA is not in the catalogue: place_order rejects it, to orders.dlq"),
    ]
    _say(
        f"\nthe order pipeline (examples/orders), orders POSTed to its HTTP API; its locks,\n"
        f"idempotency keys and groups in Redis {mask_url(app.status_url)}:\n"
        "  place_order -> reserve_stock -> charge -> fulfil -> group(send_email, make_invoice)"
        " -> order_done"
    )
    _wait_ready(app.metrics_port, app.worker, what="the order worker")
    _wait_api(app.api, app.api_url, app.api_log)
    tracker = Tracker()
    connection = await aio_pika.connect(app.url)
    try:
        channel = await connection.channel()
        copies = await channel.declare_queue(exclusive=True)
        for step in ORDER_STEPS:
            await copies.bind(app.exchange, step)
        events = await channel.declare_queue(exclusive=True)
        await events.bind(events_exchange(app.exchange), "#")
        await copies.consume(tracker.on_job, no_ack=True)
        await events.consume(tracker.on_event, no_ack=True)

        headers = {"Authorization": f"Bearer {app.token}"}
        posted: dict[str, tuple[str, float]] = {}  # order id -> (place_order job id, when)
        async with httpx.AsyncClient(base_url=app.api_url, headers=headers, timeout=10) as http:
            for order, why in orders:
                when = time.time()
                response = await _post_order(http, order)
                job_id = response.json().get("id", "") if response.status_code == 202 else ""
                posted[order["order_id"]] = (job_id, when)
                what = f"{order['order_id']} {order['qty']} x {order['sku']}"
                _say(
                    f"  POST /jobs/place_order {what:<20} -> {response.status_code} "
                    f"{job_id[:8]:<8}  {why}"
                )
            response = await _post_order(http, malformed)
            what = f"{malformed['order_id']} {malformed['qty']} x {malformed['sku']}"
            _say(
                f"  POST /jobs/place_order {what:<20} -> {response.status_code} {'':<8}  "
                "no card, no email: the API checks the request's shape, publishes nothing"
            )
        malformed_ok = response.status_code == 422
        if not all(job_id for job_id, _ in posted.values()):
            _say(f"the order API did not take the orders; see {app.api_log}")
            return False
        deadline = time.monotonic() + 20
        while not all(tracker.ended(order_id) for order_id in posted):
            if time.monotonic() > deadline:
                _say(f"timed out waiting for the orders; see {app.worker_log}")
                break
            await asyncio.sleep(0.05)
    finally:
        await connection.close()

    async with Publisher(app.url, status_url=app.status_url) as pub:
        for order, _why in orders:
            order_id = order["order_id"]
            started = posted[order_id][1]
            table = Table(
                title=f"order {order_id}: {order['qty']} x {order['sku']}, card ending "
                f"{order['card'][-4:]}, {order['email']}",
                title_justify="left",
                box=box.SIMPLE_HEAD,
                show_edge=False,
            )
            table.add_column("since POST", justify="right")
            table.add_column("job")
            table.add_column("try", justify="right")
            table.add_column("outcome")
            table.add_column("detail", overflow="fold")
            for step, event in tracker.runs(order_id):
                after = max(0.0, datetime.fromisoformat(event["at"]).timestamp() - started)
                state = event["state"]
                table.add_row(
                    f"{after:.2f} s",
                    step,
                    str(event["attempt"]),
                    f"[{OUTCOME_STYLE.get(state, '')}]{state}[/]",
                    _detail(step, event),
                )
            console.print()
            console.print(table)
            fulfilled = any(step == "fulfil" for step, _ in tracker.runs(order_id))
            if fulfilled:
                group_id = f"group-order-{order_id}"
                group = await pub.group_status(group_id)
                if group is not None:
                    counts = ", ".join(f"{n} {state}" for state, n in group.counts.items())
                    _say(
                        f"  pub.status({group_id!r}): {group.ended} of {group.total} "
                        f"ended ({counts});\n  then {group.then_job}: {group.then_state}"
                    )
    good_runs = tracker.runs(good["order_id"])
    retried = any(s == "charge" and e["state"] == "retrying" for s, e in good_runs)
    done = any(
        s == "order_done"
        and e["state"] == "succeeded"
        and (e.get("result") or {}).get("state") == "complete"
        for s, e in good_runs
    )
    bad_id = posted[bad["order_id"]][0]
    dead = None
    for _ in range(20):  # its copy in orders.dlq: read until it is there (2 s at most)
        dead = next(
            (m for m in await _dead_letters(app.url, "orders") if m.message_id == bad_id), None
        )
        if dead is not None:
            break
        await asyncio.sleep(0.1)
    if dead is not None:
        h = dead.headers or {}
        _say(
            f"  orders.dlq  {bad_id[:8]}  x-reason={h.get('x-reason')!s}  "
            f"x-attempts={h.get('x-attempts')!s}  x-error={h.get('x-error')!s}"
        )
    _say(f"try: LEVERET_AMQP_URL={mask_url(app.url)} leveret dlq list orders")
    ok = retried and done and dead is not None and malformed_ok
    if not ok:
        _say(
            f"the order pipeline did not end as expected (charge retried: {retried}, order done: "
            f"{done}, bad order in orders.dlq: {dead is not None}, malformed refused: "
            f"{malformed_ok}); see {app.worker_log}"
        )
    return ok


async def main(keep: bool) -> int:
    settings = WorkerSettings()
    url = settings.amqp_url.get_secret_value()
    port = int(os.environ.get("LEVERET_METRICS_PORT") or _free_port())
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "leveret-demo-worker.log"
    _say(f"broker:  {mask_url(url)}")
    _say(f"worker:  leveret worker demo_app:worker  (log: {log_path}, metrics :{port})")
    env = {**os.environ, "LEVERET_METRICS_PORT": str(port), "LEVERET_LOG_LEVEL": "info"}
    proc = _spawn(["worker", "demo_app:worker"], env, log_path)
    api_log = log_path.with_name("leveret-demo-api.log")
    api, api_url, token = _start_api("demo_app:worker", api_log)
    children = [api, proc]
    # The order pipeline needs Redis and a vhost of its own; its worker and API are started once
    # the demo's worker is up, so they come up while the jobs below run instead of slowing the
    # start of the three.
    status_url = os.environ.get("LEVERET_STATUS_URL")
    skipped = (
        "there is no LEVERET_STATUS_URL; its locks, idempotency keys and groups keep their "
        "state in Redis, and scripts/demo.sh sets it when it finds or starts one"
    )
    if status_url:
        reason = _create_vhost(settings, ORDERS_VHOST)
        skipped = f"it needs a vhost of its own, and {reason}" if reason else ""
    orders: OrderApp | None = None
    try:
        _wait_api(api, api_url, api_log)
        console_url = f"{api_url}/ui"
        _say(f"console: {console_url}  (sign in with the API token {token}; log: {api_log})")
        _wait_ready(port, proc)
        if status_url and not skipped:
            orders = _start_orders(settings, status_url, log_path.parent)
            children = [orders.api, orders.worker, *children]
            _say(
                f"orders:  leveret worker orders.app:worker, leveret api orders.app:worker "
                f"(vhost {ORDERS_VHOST}; logs: {orders.worker_log}, {orders.api_log})"
            )
        async with Publisher(url) as pub:
            dlq_before = {q: await _depth(url, f"{q}.dlq") for q in QUEUES}
            _say("\npublishing (each id is returned only after the broker confirmed the job):")
            ids = []
            for job, payload, expected in JOBS:
                job_id = await pub.publish(job, payload)
                ids.append(job_id)
                _say(f"  {job_id}  {job:<13} {payload!s:<52} -> expect {expected}")
        dead_expected = sum(1 for *_, e in JOBS if e.startswith("DLQ"))
        deadline = time.monotonic() + 30
        while True:
            dead_now = 0
            for q in QUEUES:
                dead_now += await _depth(url, f"{q}.dlq") - dlq_before[q]
            done = _value(  # this run's jobs, not the schedule's ticks
                [
                    line
                    for line in _metrics(port)
                    if 'outcome="succeeded"' in line and 'job_name="tidy_up"' not in line
                ]
            )
            if dead_now >= dead_expected and done >= 4:
                break
            if time.monotonic() > deadline:
                _say("timed out waiting for the jobs; see the worker log")
                return 1
            await asyncio.sleep(0.2)

        _say("\nworker metrics (leveret_jobs_completed_total):")
        for line in _metrics(port):
            _say(f"  {line}")
        _say("\ndead-letter queues (x-reason / x-attempts / x-error):")
        ours = set(ids)
        for queue in QUEUES:
            for message in await _dead_letters(url, queue):
                if message.message_id not in ours:
                    continue
                headers = message.headers or {}
                _say(
                    f"  {queue}.dlq  {message.message_id}  {headers.get('x-reason')!s:<9} "
                    f"attempts={headers.get('x-attempts')}  {headers.get('x-error')}"
                )
        _say("\nfrom the worker's log (JSON lines on stderr; these are this run's jobs):")
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("job_id") in ours:
                detail = entry.get("error") or entry.get("to") or entry.get("image") or ""
                _say(
                    f"  {entry['event']:<18} {entry['job_id'][:8]}  attempt={entry.get('attempt')}"
                    f"  {detail}"
                )
        host = urlsplit(url).hostname or "localhost"
        _say(
            f"\nsee it in the management UI: http://{host}:15672/#/queues (guest/guest):\n"
            "  email, images           work queues (x-max-priority 10; Bindings: the job names)\n"
            "  jobs.delay.1s           a retry waits here for its backoff (TTL 1 s; one chain\n"
            "                          of delay queues for every work queue of the exchange)\n"
            "  email.dlq, images.dlq   dead jobs; click one, 'Get messages' shows x-reason\n"
            "try: leveret dlq list email   |   leveret status demo_app:worker (from examples/)"
        )
        await _show_schedule(port)
        if status_url:
            await _show_status(url, status_url)
        else:
            _say("\n(no LEVERET_STATUS_URL: start Redis to see a job's status change as it runs)")
        if orders is not None:
            # rich picks the terminal's width; in a pipe (CI), wider than its default 80.
            console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)
            if not await _show_orders(orders, console):
                return 1
        else:
            _say(f"\n(the order pipeline of examples/orders is skipped: {skipped})")
        _say(f"\nthe web console: {console_url}  (sign in with the API token {token})")
        if keep:
            if orders is not None:
                order_id = f"K{secrets.token_hex(2).upper()}-1"  # a new one for each order
                _say(
                    f"the order API and its console: {orders.api_url}/ui  (token {orders.token});"
                    f" place an order (a new order_id each time: a charge is once per order id):"
                    f"\n  curl -X POST {orders.api_url}/jobs/place_order -H "
                    f"'Authorization: Bearer {orders.token}' -H 'Content-Type: application/json'"
                    f' -d \'{{"order_id": "{order_id}", "sku": "LEV-TEE", "qty": 1, '
                    f'"card": "{GOOD_CARD}", "email": "you@example.com"}}\''
                )
            _say(
                f"workers and consoles keep running (metrics http://127.0.0.1:{port}/metrics); "
                "Ctrl-C stops"
            )
            await asyncio.to_thread(proc.wait)
        return 0
    finally:
        _stop(children)
        if proc.returncode not in (0, None, -signal.SIGTERM):
            _say(f"worker exited with {proc.returncode}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the worker running")
    try:
        sys.exit(asyncio.run(main(parser.parse_args().keep)))
    except KeyboardInterrupt:
        sys.exit(0)
