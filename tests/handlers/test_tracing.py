"""Tracing: a traceparent given at publish reaches the run, its retries and chained jobs, and
with the SDK configured every run is an OpenTelemetry span in that trace (real broker)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from leveret.consumer import JobContext, Worker
from leveret.consumer.features.tracing import tracing_layer
from leveret.producers import Publisher
from tests.support import Broker, running, unique, wait_for

sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


class P(BaseModel):
    n: int


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk.TracerProvider):
        provider = sdk.TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_spans_continue_the_published_trace_across_retries_and_chains(
    broker: Broker, registry, exporter: InMemorySpanExporter
) -> None:
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("trace")
    seen: list[tuple[str, int, str]] = []

    @worker.job(f"{queue}-first", queue=queue, max_attempts=2, backoff=0.1)
    async def first(p: P, ctx: JobContext) -> None:
        seen.append((ctx.job, ctx.attempt, ctx.headers["traceparent"]))
        if ctx.attempt == 1:
            raise ConnectionError("flaky")
        await ctx.enqueue(f"{queue}-second", {"n": p.n + 1})

    @worker.job(f"{queue}-second", queue=queue)
    async def second(p: P, ctx: JobContext) -> None:
        seen.append((ctx.job, ctx.attempt, ctx.headers["traceparent"]))

    traceparent = f"00-{TRACE_ID}-{PARENT}-01"
    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{queue}-first", {"n": 1}, headers={"traceparent": traceparent})
        await wait_for(lambda: len(seen) == 3, 20, "run, retry and chained job")
    assert seen == [
        (f"{queue}-first", 1, traceparent),
        (f"{queue}-first", 2, traceparent),
        (f"{queue}-second", 1, traceparent),  # the chained job inherited it
    ]
    spans = [
        s
        for s in exporter.get_finished_spans()
        if s.attributes["messaging.destination.name"] == queue
    ]  # type: ignore[index]
    assert len(spans) == 3
    for span in spans:
        assert span.name == f"{queue} process"
        assert span.kind == trace.SpanKind.CONSUMER
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT
    by_attempt = {(s.attributes["leveret.job"], s.attributes["leveret.attempt"]): s for s in spans}  # type: ignore[index]
    failed = by_attempt[(f"{queue}-first", 1)]
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert any(e.name == "exception" for e in failed.events)
    assert by_attempt[(f"{queue}-first", 2)].status.status_code != trace.StatusCode.ERROR


def test_no_layer_without_a_configured_provider(monkeypatch) -> None:
    """The API's default no-op provider: no span layer, so no job pays for one."""
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    assert tracing_layer() is None
    assert tracing_layer(force=True) is not None
