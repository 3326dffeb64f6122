"""OpenTelemetry spans around job runs (the ``otel`` extra: ``opentelemetry-api``).

A run's span continues the trace the publisher started: its parent comes from the W3C
``traceparent``/``tracestate`` headers in ``ctx.headers`` (``publish(..., headers=...)``; retries
keep them, and ``ctx.enqueue`` copies them into the follow-up job), so the publish, every attempt
and the chained jobs share one trace. The span is a ``CONSUMER`` span named ``<queue> process``
with the messaging attributes; an exception that ends the run is recorded and sets the status.

Only built when the API is importable *and* a real tracer provider is installed when the worker
starts (the API's default is a no-op proxy): without one, no job pays for a layer that would
record nothing. Lives outside the job's metrics layer and inside the rate limit, so a postponed
delivery makes no span.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from leveret.consumer.context import JobContext
from leveret.consumer.delivery.middleware import CallNext, Middleware


def tracing_layer(force: bool = False) -> Middleware | None:
    """The span layer, or ``None`` without opentelemetry or a configured tracer provider."""
    if (
        not force
        and "opentelemetry.trace" not in sys.modules
        and "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ
    ):
        # Nobody configured a provider: that takes importing opentelemetry.trace first
        # (``set_tracer_provider``) or naming one in the environment. Not importing it here
        # keeps ~0.5 MiB out of every worker that does not trace.
        return None
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if not force and isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    tracer = trace.get_tracer("leveret")
    extract = propagate.extract
    consumer = trace.SpanKind.CONSUMER

    async def traced(ctx: JobContext, call_next: CallNext) -> Any:
        parent = extract(ctx.headers) if ctx.headers else None
        with tracer.start_as_current_span(
            f"{ctx.queue} process",
            context=parent,
            kind=consumer,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation": "process",
                "messaging.destination.name": ctx.queue,
                "messaging.message.id": ctx.job_id,
                "leveret.job": ctx.job,
                "leveret.attempt": ctx.attempt,
            },
        ):
            return await call_next(ctx)

    return traced
