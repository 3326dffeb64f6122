"""The AMQP connection (``connection``) and the one confirmed-publish path (``batch``, a single
publish being a batch of one in ``confirm``), aiormq's internals behind ``adapter`` (writing)
and ``frames`` (reading: frames in bulk, deliveries without a wrapper task). Public
to the worker (``leveret.consumer`` imports these names, nothing deeper).

The names load on first use (PEP 562), so a worker pays only for the modules it uses (the
stores import Redis-only code that a worker without ``LEVERET_STATUS_URL`` never loads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leveret.producers.lazy import load

if TYPE_CHECKING:
    from leveret.producers.broker.batch import (
        BatchPublishError,
        publish_batch,
    )
    from leveret.producers.broker.confirm import (
        publish_confirmed,
    )
    from leveret.producers.broker.connection import (
        CONNECTION_ERRORS,
        connect,
        connected_url,
        mask_secrets,
        mask_url,
        split_urls,
    )
    from leveret.producers.broker.frames import deliver_directly

_HOME = {
    "BatchPublishError": "leveret.producers.broker.batch",
    "publish_batch": "leveret.producers.broker.batch",
    "publish_confirmed": "leveret.producers.broker.confirm",
    "CONNECTION_ERRORS": "leveret.producers.broker.connection",
    "connect": "leveret.producers.broker.connection",
    "connected_url": "leveret.producers.broker.connection",
    "mask_secrets": "leveret.producers.broker.connection",
    "mask_url": "leveret.producers.broker.connection",
    "split_urls": "leveret.producers.broker.connection",
    "deliver_directly": "leveret.producers.broker.frames",
}

__all__ = [
    "CONNECTION_ERRORS",
    "BatchPublishError",
    "connect",
    "connected_url",
    "deliver_directly",
    "mask_secrets",
    "mask_url",
    "publish_batch",
    "publish_confirmed",
    "split_urls",
]


def __getattr__(name: str) -> object:
    return load(__name__, _HOME, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
