"""Job registrations, checked and resolved once when the decorator runs.

A bad registration fails at import time with a ``ConfigError``, never on a message; everything
a delivery needs (validator, sync or async, the backoff, the rate limits) is worked out here so
the hot path only looks things up. Checked here, at the decorator: the payload parameter (a
pydantic model, or a ``dict``), a job name registered twice, one job bound to two queues (the
same name, or the same function, on a second queue: a job lives on one queue), a plain ``def``
handler marked ``cancellable`` (only a coroutine can be cancelled), a bad rate. What the
parameters after the payload resolve to needs every resource registered, so it is worked out
when the app has loaded (``Worker.check``, ``Resources.plan``).
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydantic import BaseModel, TypeAdapter
from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_exponential

from leveret.consumer.errors import ConfigError, Retry
from leveret.consumer.features.locks import key_template
from leveret.consumer.features.ratelimit.limiters import Rate, parse_rate
from leveret.topology.delay import MAX_DELAY_S
from leveret.topology.model import Topology, WorkQueue, check_name

Backoff = float | int | wait_base

DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 3
# 2 s, 4 s, 8 s … capped at an hour: the usual shape for transient failures.
DEFAULT_BACKOFF = wait_exponential(multiplier=2, max=3600)


@dataclass(frozen=True, slots=True)
class JobSpec:
    name: str
    queue: str
    fn: Callable[..., Any]
    validate: Callable[[bytes], Any]  # body bytes -> the handler's first argument
    is_async: bool
    max_attempts: int
    backoff: Backoff
    timeout_s: float | None
    cancellable: bool = False
    rate_limit: Rate | None = None  # per worker process
    global_rate_limit: Rate | None = None  # across every worker
    # ``lock=``/``idempotency_key=``: the template as given and its renderer (payload -> key);
    # ``retry_on``: the exceptions that are retried, others dead-letter ``rejected``.
    lock: str | None = None
    lock_key: Callable[[Any], str] | None = None
    idempotency_key: str | None = None
    idempotency_key_of: Callable[[Any], str] | None = None
    retry_on: tuple[type[BaseException], ...] | None = None

    def retries(self, error: BaseException) -> bool:
        """Whether ``error`` may be retried (``retry_on``; a ``Retry`` always may)."""
        return self.retry_on is None or isinstance(error, (Retry, *self.retry_on))

    def delay_after(self, attempt: int, error: BaseException) -> float:
        """Seconds to wait before the run after failed run number ``attempt``."""
        if isinstance(self.backoff, int | float):
            delay = float(self.backoff)
        else:
            state = RetryCallState(retry_object=None, fn=self.fn, args=(), kwargs={})  # type: ignore[arg-type]
            state.attempt_number = attempt
            state.set_exception((type(error), error, error.__traceback__))
            delay = float(self.backoff(state))
        if not math.isfinite(delay):
            raise ValueError(f"backoff of job {self.name!r} returned {delay} seconds")
        return min(max(delay, 0.0), MAX_DELAY_S)


def _validator(fn: Callable[..., Any], name: str) -> Callable[[bytes], Any]:
    """The payload parameter: first, positional, a pydantic model (or ``dict``)."""
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ConfigError(
            f"handler for job {name!r} must take the payload as its first parameter, "
            f"annotated with a pydantic model"
        )
    try:
        hints = typing.get_type_hints(fn, include_extras=False)
    except Exception as exc:
        raise ConfigError(f"cannot resolve the annotations of handler {name!r}: {exc}") from None
    model = hints.get(params[0].name)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model.model_validate_json
    if model is dict or typing.get_origin(model) is dict:
        adapter: TypeAdapter[Any] = TypeAdapter(cast(Any, model))
        return adapter.validate_json
    raise ConfigError(
        f"the first parameter of handler {name!r} ({params[0].name!r}) must be annotated with a "
        f"pydantic model (or dict): it is the payload, validated before the handler runs; "
        f"got {model!r}"
    )


def _check_numbers(name: str, max_attempts: int, backoff: Backoff, timeout: float | None) -> None:
    """Refused when the app loads, not at the first delivery of the job."""
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigError(f"max_attempts of job {name!r} must be 1 or more")
    if isinstance(backoff, int | float):
        if not 0 <= backoff <= MAX_DELAY_S or math.isnan(backoff):
            raise ConfigError(
                f"backoff of job {name!r} must be 0 to {MAX_DELAY_S:g} seconds, got {backoff}"
            )
    elif not isinstance(backoff, wait_base):
        raise ConfigError(f"backoff of job {name!r} must be seconds or a tenacity wait strategy")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"timeout of job {name!r} must be a positive number of seconds")


def _payload_model(fn: Callable[..., Any]) -> Any:
    """The payload's annotation (``_validator`` checked it), to check key templates against."""
    first = next(iter(inspect.signature(fn).parameters))
    return typing.get_type_hints(fn).get(first)


def _retry_on(retry_on: object, name: str) -> tuple[type[BaseException], ...] | None:
    """``retry_on=`` as a tuple of exception classes; anything else is refused now."""
    if retry_on is None:
        return None
    classes = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    if not classes or not all(
        isinstance(c, type) and issubclass(c, BaseException) for c in classes
    ):
        raise ConfigError(
            f"retry_on of job {name!r} must be an exception class or a tuple of them, "
            f"got {retry_on!r}"
        )
    return classes


class Registry:
    """Job name → ``JobSpec``, and the topology those jobs need."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobSpec] = {}

    def add(
        self,
        fn: Callable[..., Any],
        name: str,
        queue: str,
        max_attempts: int,
        backoff: Backoff,
        timeout: float | None,
        *,
        cancellable: bool = False,
        rate_limit: str | None = None,
        global_rate_limit: str | None = None,
        lock: str | None = None,
        idempotency_key: str | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    ) -> JobSpec:
        is_async = self._check_shape(fn, name, queue, cancellable)
        limits = (
            None if rate_limit is None else parse_rate(rate_limit, f"rate_limit of job {name!r}"),
            None
            if global_rate_limit is None
            else parse_rate(global_rate_limit, f"global_rate_limit of job {name!r}"),
        )
        _check_numbers(name, max_attempts, backoff, timeout)
        validate = _validator(fn, name)
        model = _payload_model(fn)
        lock_key = None if lock is None else key_template(lock, "lock", name, model)
        done_key = (
            None
            if idempotency_key is None
            else key_template(idempotency_key, "idempotency_key", name, model)
        )
        spec = JobSpec(
            name=name,
            queue=queue,
            fn=fn,
            validate=validate,
            is_async=is_async,
            max_attempts=max_attempts,
            backoff=backoff,
            timeout_s=timeout,
            cancellable=cancellable,
            rate_limit=limits[0],
            global_rate_limit=limits[1],
            lock=lock,
            lock_key=lock_key,
            idempotency_key=idempotency_key,
            idempotency_key_of=done_key,
            retry_on=_retry_on(retry_on, name),
        )
        self.jobs[name] = spec
        return spec

    def _check_shape(
        self, fn: Callable[..., Any], name: str, queue: str, cancellable: bool
    ) -> bool:
        """The name, the queue, uniqueness, the handler's parameters; ``True`` if async."""
        try:
            check_name("job", name)
            WorkQueue(name=queue)
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[-1] if "\n" in str(exc) else str(exc)) from None
        self._check_unique(fn, name, queue)
        is_async = inspect.iscoroutinefunction(fn)
        if cancellable and not is_async:
            raise ConfigError(
                f"job {name!r} is marked cancellable but its handler is a plain `def`: Python "
                f"cannot stop a thread, so only an `async def` handler can be cancelled"
            )
        for p in list(inspect.signature(fn).parameters.values())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(
                    f"handler {name!r}: *{p.name} cannot be resolved (parameters after the "
                    f"payload are resolved by their annotated type)"
                )
        return is_async

    def _check_unique(self, fn: Callable[..., Any], name: str, queue: str) -> None:
        """One job per name, on one queue; one handler on one queue."""
        if name in self.jobs:
            other = self.jobs[name]
            if other.queue != queue:
                raise ConfigError(
                    f"job {name!r} is bound to queue {other.queue!r} and again to {queue!r}: a "
                    f"job lives on one queue (publishers route by job name, so a second binding "
                    f"would run it twice)"
                )
            raise ConfigError(f"job {name!r} is registered twice; job names must be unique")
        for other in self.jobs.values():
            if other.fn is fn and other.queue != queue:
                raise ConfigError(
                    f"handler {getattr(fn, '__qualname__', fn)!r} is registered as job "
                    f"{other.name!r} on queue {other.queue!r} and as {name!r} on {queue!r}: "
                    f"one job on two queues is almost always a copy-paste slip; give the second "
                    f"its own function if it is meant"
                )

    @property
    def queues(self) -> list[str]:
        return sorted({spec.queue for spec in self.jobs.values()})

    def select(self, queues: list[str] | None) -> list[str]:
        """The queues a worker consumes: those asked for (each once), else all of its jobs'."""
        if not self.jobs:
            raise ConfigError("this worker has no jobs: register handlers with @worker.job(...)")
        known = self.queues
        queues = list(dict.fromkeys(queues or known))
        unknown = [q for q in queues if q not in known]
        if unknown:
            raise ConfigError(
                f"no job is registered on queue(s) {', '.join(unknown)}; "
                f"this app serves: {', '.join(known)}"
            )
        return queues

    def topology(self, exchange: str, queue_type: str = "classic") -> Topology:
        by_queue: dict[str, list[str]] = {}
        for spec in self.jobs.values():
            by_queue.setdefault(spec.queue, []).append(spec.name)
        return Topology(
            exchange=exchange,
            queues=tuple(
                WorkQueue(name=q, jobs=tuple(jobs), queue_type=queue_type)
                for q, jobs in by_queue.items()
            ),
        )
