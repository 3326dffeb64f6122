"""Redis-backed state both sides share: statuses (``status``), dedup claims (``dedup``), cancel
marks and requests (``cancel``), the one client builder (``redis``), their bundle (``bundle``)
and settings. Public to the worker (``leveret.consumer`` imports these names, nothing deeper).

The names load on first use (PEP 562), so a worker pays only for the modules it uses (the
stores import Redis-only code that a worker without ``LEVERET_STATUS_URL`` never loads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leveret.producers.lazy import load

if TYPE_CHECKING:
    from leveret.producers.stores.bundle import (
        Stores,
    )
    from leveret.producers.stores.cancel import (
        DEFAULT_MAX_IDS,
        CancelMarks,
        JobAlreadyEnded,
        UnknownJob,
        broadcast_cancel,
        cancel_exchange,
        declare_cancel_exchange,
        request_cancel,
    )
    from leveret.producers.stores.dedup import (
        HEADER_DEDUP_KEY,
        MAX_KEY_LENGTH,
        DedupStore,
        DedupUnavailableError,
        check_dedup_key,
        publish_once,
    )
    from leveret.producers.stores.redis import (
        DEFAULT_RATELIMIT_PREFIX,
        StatusStoreError,
        redis_call,
        redis_client,
    )
    from leveret.producers.stores.settings import (
        LifecycleSettings,
    )
    from leveret.producers.stores.status import (
        JobCancelled,
        JobFailed,
        JobStatus,
        RedisStatusStore,
        StatusStore,
        StatusStoreUnavailable,
        StatusWrite,
        status_write,
    )

_HOME = {
    "Stores": "leveret.producers.stores.bundle",
    "CancelMarks": "leveret.producers.stores.cancel",
    "DEFAULT_MAX_IDS": "leveret.producers.stores.cancel",
    "JobAlreadyEnded": "leveret.producers.stores.cancel",
    "UnknownJob": "leveret.producers.stores.cancel",
    "broadcast_cancel": "leveret.producers.stores.cancel",
    "cancel_exchange": "leveret.producers.stores.cancel",
    "declare_cancel_exchange": "leveret.producers.stores.cancel",
    "request_cancel": "leveret.producers.stores.cancel",
    "DedupStore": "leveret.producers.stores.dedup",
    "DedupUnavailableError": "leveret.producers.stores.dedup",
    "HEADER_DEDUP_KEY": "leveret.producers.stores.dedup",
    "MAX_KEY_LENGTH": "leveret.producers.stores.dedup",
    "check_dedup_key": "leveret.producers.stores.dedup",
    "publish_once": "leveret.producers.stores.dedup",
    "DEFAULT_RATELIMIT_PREFIX": "leveret.producers.stores.redis",
    "StatusStoreError": "leveret.producers.stores.redis",
    "redis_call": "leveret.producers.stores.redis",
    "redis_client": "leveret.producers.stores.redis",
    "LifecycleSettings": "leveret.producers.stores.settings",
    "JobCancelled": "leveret.producers.stores.status",
    "JobFailed": "leveret.producers.stores.status",
    "JobStatus": "leveret.producers.stores.status",
    "RedisStatusStore": "leveret.producers.stores.status",
    "StatusStore": "leveret.producers.stores.status",
    "StatusStoreUnavailable": "leveret.producers.stores.status",
    "StatusWrite": "leveret.producers.stores.status",
    "status_write": "leveret.producers.stores.status",
}

__all__ = [
    "DEFAULT_MAX_IDS",
    "DEFAULT_RATELIMIT_PREFIX",
    "HEADER_DEDUP_KEY",
    "MAX_KEY_LENGTH",
    "CancelMarks",
    "DedupStore",
    "DedupUnavailableError",
    "JobAlreadyEnded",
    "JobCancelled",
    "JobFailed",
    "JobStatus",
    "LifecycleSettings",
    "RedisStatusStore",
    "StatusStore",
    "StatusStoreError",
    "StatusStoreUnavailable",
    "StatusWrite",
    "Stores",
    "UnknownJob",
    "broadcast_cancel",
    "cancel_exchange",
    "check_dedup_key",
    "declare_cancel_exchange",
    "publish_once",
    "redis_call",
    "redis_client",
    "request_cancel",
    "status_write",
]


def __getattr__(name: str) -> object:
    return load(__name__, _HOME, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
