"""What to send, for teams publishing from other languages: JSON Schema and AsyncAPI.

Both come from the same pydantic models the worker validates with (validation mode, so the
schema describes what the worker *accepts*: defaults make a field optional, extra fields pass
unless the model forbids them). The AsyncAPI 2.6 document describes the whole layout: one
channel per job name (the routing key on the ``jobs`` direct exchange), with the AMQP bindings
and message properties of wire format v1.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from pydantic import TypeAdapter
from yarl import URL

from leveret.consumer.registry import JobSpec, Registry
from leveret.topology.delay import (
    DELAY_BITS,
    DELAY_UNIT_S,
    MAX_DELAY_S,
    delay_exchange_name,
    delayed_job_route,
)
from leveret.topology.model import Topology

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_VERSION = "2.6.0"
AMQP_BINDING_VERSION = "0.2.0"


def payload_type(spec: JobSpec) -> Any:
    """The annotation of the handler's first parameter (a pydantic model or a dict type)."""
    first = next(iter(inspect.signature(spec.fn).parameters.values()))
    return typing.get_type_hints(spec.fn)[first.name]


def job_schema(spec: JobSpec) -> dict[str, Any]:
    """A standalone JSON Schema (draft 2020-12) for the payload of one job."""
    schema = TypeAdapter(payload_type(spec)).json_schema(mode="validation")
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def job_schemas(registry: Registry) -> dict[str, dict[str, Any]]:
    return {name: job_schema(spec) for name, spec in sorted(registry.jobs.items())}


def _server(amqp_url: str | None) -> dict[str, Any]:
    url = URL(amqp_url or "amqp://localhost:5672/")
    return {
        "url": f"{url.host or 'localhost'}:{url.port or 5672}",
        "protocol": "amqps" if url.scheme == "amqps" else "amqp",
        "protocolVersion": "0.9.1",
        "description": "RabbitMQ. Credentials are not part of this document.",
    }


def _headers_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Optional application headers; the x-* headers are Leveret's own and "
        "must not be set by publishers.",
        "properties": {},
    }


def _message(spec: JobSpec, payload: Any) -> dict[str, Any]:
    """The AsyncAPI message of one job: its payload schema and the AMQP properties it uses."""
    return {
        "name": spec.name,
        "title": spec.name,
        "summary": f"Job {spec.name!r}, run from queue {spec.queue!r}.",
        "contentType": "application/json",
        "payload": payload,
        "headers": _headers_schema(),
        "correlationId": {
            "description": "The job id: AMQP message_id (kept through retries and replays)",
            "location": "$message.header#/message_id",
        },
        "bindings": {
            "amqp": {
                "contentEncoding": "utf-8",
                "messageType": spec.name,
                "bindingVersion": AMQP_BINDING_VERSION,
            },
        },
    }


def _channel(spec: JobSpec, exchange_name: str, exchange: dict[str, Any]) -> dict[str, Any]:
    """The AsyncAPI channel of one job: its routing key on the jobs exchange, and how to publish."""
    description = inspect.getdoc(spec.fn) or ""
    return {
        "description": (
            f"Routing key {spec.name!r} on exchange {exchange_name!r}, bound to work "
            f"queue {spec.queue!r} (retries and delayed jobs wait in the exchange's shared "
            f"delay chain, {exchange_name}.delay.*, and come back to {spec.queue!r}; dead jobs "
            f"in {spec.queue}.dlq). " + description
        ).strip(),
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": exchange,
                "bindingVersion": AMQP_BINDING_VERSION,
            },
        },
        "publish": {
            "operationId": f"submit_{spec.name}",
            "summary": f"Submit a {spec.name} job; the broker confirms it or returns it.",
            "bindings": {
                "amqp": {
                    "deliveryMode": 2,
                    "mandatory": True,
                    "priority": 0,
                    "ack": True,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
            "message": {"$ref": f"#/components/messages/{spec.name}"},
        },
    }


def _delay_channel(topology: Topology, vhost: str, jobs: list[str]) -> dict[str, Any]:
    """The shared delay chain: how ``Publisher.publish(..., delay=...)`` sends a delayed job."""
    ex = topology.exchange
    return {
        "description": (
            f"Delayed jobs (leveret.topology.delay). Publish the same message to the chain "
            f"exchange of the delay's highest set bit ({delay_exchange_name(ex, 0)} … "
            f"{delay_exchange_name(ex, DELAY_BITS - 1)}, topic; {delay_exchange_name(ex, -1)} "
            f"for no delay) with routing key: the delay in {DELAY_UNIT_S * 1000:g} ms units as "
            f"{DELAY_BITS} words, most significant first, '+' for 1 and '=' for 0, then 'j' and "
            f"the job name (e.g. 1 s: "
            f"{delayed_job_route(ex, 1.0, 'JOB')[1]}). It waits in the shared delay queues "
            f"({ex}.delay.<ttl>, {DELAY_BITS} for the exchange) and is then routed like a job "
            f"published to {ex!r}. Up to {MAX_DELAY_S / 86_400:.0f} days."
        ),
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": delay_exchange_name(ex, 0).rsplit(".", 1)[0] + ".<ttl>",
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                    "vhost": vhost,
                },
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
        "publish": {
            "operationId": "submit_delayed",
            "summary": "Submit a delayed job; the broker confirms it.",
            "message": {"oneOf": [{"$ref": f"#/components/messages/{j}"} for j in jobs]},
        },
    }


def asyncapi(
    registry: Registry, topology: Topology, *, amqp_url: str | None = None, vhost: str = "/"
) -> dict[str, Any]:
    """An AsyncAPI 2.6 document for every job of ``registry`` on ``topology``."""
    specs = sorted(registry.jobs.values(), key=lambda s: s.name)
    keys, top = TypeAdapter.json_schemas(
        [(spec.name, "validation", TypeAdapter(payload_type(spec))) for spec in specs],
        ref_template="#/components/schemas/{model}",
    )
    exchange = {
        "name": topology.exchange,
        "type": "direct",
        "durable": True,
        "autoDelete": False,
        "vhost": vhost,
    }
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in specs:
        messages[spec.name] = _message(spec, keys[(spec.name, "validation")])
        channels[spec.name] = _channel(spec, topology.exchange, exchange)
    if specs:
        channels[delay_exchange_name(topology.exchange, 0).rsplit(".", 1)[0] + ".*"] = (
            _delay_channel(topology, vhost, [s.name for s in specs])
        )
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": f"urn:leveret:{topology.exchange}",
        "info": {
            "title": f"Leveret jobs on exchange {topology.exchange!r}",
            "version": "1",
            "description": (
                "Wire format v1. Publish to the direct exchange with the job name as routing "
                "key, a UTF-8 JSON object body, content_type application/json, type = the job "
                "name, message_id = the job id, optional priority 0-9, delivery_mode 2, with "
                "publisher confirms and the mandatory flag."
            ),
        },
        "servers": {"rabbitmq": _server(amqp_url)},
        "defaultContentType": "application/json",
        "channels": channels,
        "components": {"messages": messages, "schemas": top.get("$defs", {})},
    }


__all__ = ["asyncapi", "job_schema", "job_schemas", "payload_type"]
