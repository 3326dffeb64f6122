"""Scenario 9: amqps:// to a broker listener that requires TLS and a client certificate."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from leveret.consumer import JobContext, Worker, WorkerSettings
from leveret.producers import Publisher
from leveret.producers.errors import BrokerUnavailable
from tests.faults.plumbing import Certs, DedicatedNode, record
from tests.support import leveret_cli, running, unique, wait_for

pytestmark = pytest.mark.slow  # they share the dedicated node


class Item(BaseModel):
    n: int


def tls_settings(node: DedicatedNode, **tls: object) -> WorkerSettings:
    return WorkerSettings(amqp_url=node.tls_url, metrics_port=0, connect_timeout=5, **tls)  # type: ignore[arg-type]


async def test_jobs_flow_over_verified_tls_with_a_client_certificate(
    node: DedicatedNode, certs: Certs, registry
) -> None:
    """With the CA, client certificate and key set, publishing and consuming work over TLS."""
    settings = tls_settings(
        node, tls_ca_file=certs.ca, tls_cert_file=certs.client_cert, tls_key_file=certs.client_key
    )
    worker = Worker(settings, registry=registry)
    queue = unique("tls")
    seen: list[str] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(item: Item, ctx: JobContext) -> None:
        seen.append(ctx.job_id)

    t0 = time.monotonic()
    async with running(worker):
        async with Publisher(settings=settings) as pub:
            ids = await pub.publish_many([(f"{queue}-job", {"n": i}) for i in range(50)])
        await wait_for(lambda: set(seen) >= set(ids), 20, "the jobs over TLS")
    record(
        "TLS (CA + client certificate)",
        jobs=len(ids),
        lost=len(set(ids) - set(seen)),
        duplicated=len(seen) - len(set(seen)),
        recovery_s=round(time.monotonic() - t0, 2),
    )


@pytest.mark.parametrize(
    "case", ["system trust only", "a CA that signed nothing here", "no client certificate"]
)
async def test_a_wrong_tls_setup_fails_fast_with_a_clear_error(
    node: DedicatedNode, certs: Certs, case: str
) -> None:
    """The server certificate is verified by default; a wrong CA or a missing client cert fails."""
    tls: dict[str, object] = {
        "system trust only": {},
        "a CA that signed nothing here": {"tls_ca_file": certs.other_ca},
        "no client certificate": {"tls_ca_file": certs.ca},
    }[case]  # type: ignore[assignment]
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        async with Publisher(settings=tls_settings(node, **tls)):
            pass
    took = time.monotonic() - t0
    message = str(caught.value)
    assert took < 10
    assert "\n" not in message and "guest:guest" not in message
    if case == "no client certificate":
        assert "certificate" in message.lower(), message
        assert "LEVERET_TLS_CERT_FILE" in message, message
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in message or "verify failed" in message, message
        assert "LEVERET_TLS_CA_FILE" in message, message


async def test_the_cli_reports_a_wrong_ca_in_one_line(
    node: DedicatedNode, certs: Certs, tmp_path: Path
) -> None:
    """`leveret publish` against amqps:// with a wrong CA: non-zero exit, one line, no trace."""
    env = {
        "LEVERET_AMQP_URL": node.tls_url,
        "LEVERET_TLS_CA_FILE": str(certs.other_ca),
        "LEVERET_CONNECT_TIMEOUT": "5",
    }
    done = await asyncio.to_thread(leveret_cli, "publish", "anything", "{}", env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "LEVERET_TLS_CA_FILE" in done.stderr
