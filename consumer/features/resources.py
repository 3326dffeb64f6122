"""Scoped resources for handlers: what ``@worker.resource(scope=...)`` registers and resolves.

A handler's parameters after the payload are resolved by their annotated type: ``JobContext``,
or the type a resource provides (its return annotation; for a generator or a context manager,
the yielded type). Resources may depend on other resources and on ``JobContext`` the same way.

Why a hand-written resolver and not dishka (issue 14 asked to evaluate it first; figures and
method in ``bench/DI_EVAL.md``, script ``bench/di_eval.py``): with dishka 1.10.1, one job (enter a
REQUEST scope with the ``JobContext`` as context, resolve one job-scoped async generator that
depends on an APP-scoped resource and on ``JobContext``, close the scope) cost a median of
9-13 µs of CPU on this (loaded, 2-core) machine against 6-9 µs here, over the issue's 10 µs
line in four runs of five. More decisive: dishka *sends* the job's exception into generator
finalizers instead of throwing it, so the contract's ``async with pool.session() as s: yield s``
would commit after a failed job, and it raises finalizer errors out of the scope exit. Here the
job's exception is thrown in (as ``contextlib`` does), a failing close is logged and counted and
never changes the job's outcome, and a handler that needs nothing costs nothing
(``plan.trivial``: the worker skips the scope).

Lifetimes:

- ``process`` resources are opened when ``process_scope()`` is entered (eagerly, in dependency
  order, so a worker whose database is down fails at start, not on its first job), or lazily on
  first use with ``eager=False`` (the test kit, so an overridden session does not open a real
  pool). They are closed in reverse order of opening when the scope exits.
- ``job`` resources are opened per job by ``job_scope(plan, ctx)``, only those the handler needs
  (transitively), and closed in reverse order after the handler whatever its outcome. Each job
  gets its own instances: nothing job-scoped is cached outside the scope object.

Errors at registration (``ConfigError`` naming the function and parameter): a resource without a
usable return annotation, a type two resources provide, a process resource depending on
``JobContext`` (at ``add``); a missing dependency, a cycle, a process resource depending on a job
resource, a handler parameter nobody provides (at ``plan``/``check``, once every decorator ran).
"""

from __future__ import annotations

import asyncio
import collections.abc as cabc
import contextlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import structlog
from prometheus_client import CollectorRegistry, Counter

from leveret.consumer.context import JobContext
from leveret.consumer.errors import ConfigError
from leveret.producers import per_registry

log = structlog.get_logger("leveret.resources")

Scope = Literal["process", "job"]
_Kind = Literal["call", "await", "gen", "agen", "cm", "acm"]

_ASYNC_ITER = (cabc.AsyncIterator, cabc.AsyncGenerator, cabc.AsyncIterable)
_SYNC_ITER = (cabc.Iterator, cabc.Generator, cabc.Iterable)
_ASYNC_CM = (contextlib.AbstractAsyncContextManager,)
_SYNC_CM = (contextlib.AbstractContextManager,)

# Argument sources in a compiled step: where one parameter's value comes from.
_CTX = 0  # the job's JobContext
_PROC = 1  # a process resource (by type)
_JOB = 2  # a job resource opened earlier in this scope (by index)


def _strip(hint: Any) -> Any:
    """``Annotated[T, ...]`` → ``T``: metadata does not change what is resolved."""
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _hints(fn: Callable[..., Any], what: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception as exc:
        raise ConfigError(
            f"cannot resolve the annotations of {what} {_name(fn)!r}: {exc}"
        ) from None


def _provided(fn: Callable[..., Any], hints: dict[str, Any]) -> tuple[Any, _Kind]:
    """What ``fn`` provides and how to get it, from its return annotation and its kind."""
    name = _name(fn)
    if "return" not in hints or hints["return"] is type(None):
        raise ConfigError(
            f"resource {name!r} needs a return annotation naming the type it provides "
            f"(for a generator: AsyncIterator[T] / Iterator[T])"
        )
    ret = _strip(hints["return"])
    origin = typing.get_origin(ret)
    args = typing.get_args(ret)
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        is_async = inspect.isasyncgenfunction(fn)
        wanted = _ASYNC_ITER if is_async else _SYNC_ITER
        if origin not in wanted or not args:
            raise ConfigError(
                f"resource {name!r} is a generator: annotate its return as "
                f"{'AsyncIterator' if is_async else 'Iterator'}[T], got {ret!r}"
            )
        return _strip(args[0]), "agen" if is_async else "gen"
    # A function decorated with @asynccontextmanager keeps the generator's annotation, and a
    # function may return a context manager explicitly: both are entered.
    if args and origin in _ASYNC_ITER + _ASYNC_CM:
        return _strip(args[0]), "acm"
    if args and origin in _SYNC_ITER + _SYNC_CM:
        return _strip(args[0]), "cm"
    return ret, "await" if inspect.iscoroutinefunction(fn) else "call"


@dataclass(frozen=True, slots=True, eq=False)
class Resource:
    """One registered resource: the function, its scope, what it provides and what it needs."""

    fn: Callable[..., Any]
    scope: Scope
    provides: Any
    kind: _Kind
    params: tuple[tuple[str, Any], ...]  # (parameter name, annotated type)
    name: str  # the function's qualified name: logs and the close-failure metric's label

    @property
    def opener(self) -> Callable[..., Any]:
        return self.fn


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """How one handler's parameters after the payload are resolved; computed once per handler.

    ``steps`` lists the job resources to open in order, each with where its arguments come from;
    ``kwargs`` says where each handler parameter comes from. ``trivial`` (no job resources, no
    process resources, no JobContext) lets the worker skip the scope entirely.
    """

    handler: str
    kwargs: tuple[tuple[str, int, Any], ...]  # (param name, source, key)
    steps: tuple[tuple[Resource, Callable[..., Any], tuple[tuple[str, int, Any], ...]], ...]
    process_needed: tuple[Any, ...]  # process resource types used, directly or not

    @property
    def trivial(self) -> bool:
        return not self.kwargs and not self.steps

    @property
    def wants_ctx(self) -> bool:
        return any(src == _CTX for _, src, _ in self.kwargs)

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.kwargs)


def _close_failures_counter(registry: CollectorRegistry | None) -> Counter:
    return Counter(
        "leveret_resource_close_failures",
        "Resources whose close (generator finalizer, __aexit__) raised; the job's outcome stood",
        ["resource"],
        registry=registry,
    )


def _close_failures(registry: CollectorRegistry | None) -> Counter:
    """One counter per metrics registry (several apps or tests may share the default one);
    without a registry, an unregistered counter of this ``Resources`` alone."""
    if registry is None:
        return _close_failures_counter(None)
    return per_registry(registry, _close_failures_counter)


class Resources:
    """The registry of resources of one worker app, and their process scope at run time."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._by_type: dict[Any, Resource] = {}
        self._order: list[Resource] = []
        self._close_failures = _close_failures(registry)
        self._proc_values: dict[Any, Any] = {}
        self._proc_exits: list[tuple[str, tuple[str, Any]]] = []  # opening order
        self._proc_locks: dict[Any, asyncio.Lock] = {}
        self._proc_open = False
        self._overrides: Mapping[Any, Any] = {}

    # -- registration ------------------------------------------------------------------------

    def add(self, fn: Callable[..., Any], scope: Scope = "process") -> Resource:
        """Register ``fn`` as the provider of its return type; see the module docstring."""
        if scope not in ("process", "job"):
            raise ConfigError(
                f"resource {_name(fn)!r}: scope must be 'process' or 'job', got {scope!r}"
            )
        hints = _hints(fn, "resource")
        provides, kind = _provided(fn, hints)
        if provides is JobContext:
            raise ConfigError(f"resource {_name(fn)!r} may not provide JobContext: the worker does")
        if provides in self._by_type:
            other = self._by_type[provides]
            raise ConfigError(
                f"resources {other.name!r} and {_name(fn)!r} both provide {_tname(provides)}: "
                f"parameters are resolved by type, so one type needs one resource"
            )
        params: list[tuple[str, Any]] = []
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(f"resource {_name(fn)!r}: *{p.name} cannot be resolved by type")
            if p.name not in hints:
                raise ConfigError(
                    f"resource {_name(fn)!r}: parameter {p.name!r} needs a type annotation "
                    f"(parameters are resolved by type)"
                )
            hint = _strip(hints[p.name])
            if hint is JobContext and scope == "process":
                raise ConfigError(
                    f"process resource {_name(fn)!r}: parameter {p.name!r} asks for JobContext, "
                    f"which exists only inside a job; make the resource scope='job'"
                )
            params.append((p.name, hint))
        resource = Resource(fn, scope, provides, kind, tuple(params), _name(fn))
        self._by_type[provides] = resource
        self._order.append(resource)
        return resource

    def resource(
        self, scope: Scope = "process"
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of ``add``; returns the function unchanged."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(fn, scope)
            return fn

        return deco

    def __contains__(self, tp: object) -> bool:
        return tp in self._by_type

    def check(self) -> None:
        """Raise ``ConfigError`` for a missing dependency, a cycle or a process→job dependency.

        Run once every decorator ran (resources may name types registered after them).
        """
        for r in self._order:
            self._topo(r, [], set(), [])

    def _topo(self, r: Resource, path: list[Resource], done: set[int], out: list[Resource]) -> None:
        """Depth-first: append ``r``'s dependencies then ``r`` to ``out``; detect cycles."""
        if id(r) in done:
            return
        if r in path:
            cycle = " -> ".join(x.name for x in [*path[path.index(r) :], r])
            raise ConfigError(f"circular dependency between resources: {cycle}")
        path.append(r)
        for pname, tp in r.params:
            if tp is JobContext:
                continue
            dep = self._by_type.get(tp)
            if dep is None:
                raise ConfigError(
                    f"resource {r.name!r}: parameter {pname!r} needs {_tname(tp)}, "
                    f"which no resource provides"
                )
            if r.scope == "process" and dep.scope == "job":
                raise ConfigError(
                    f"process resource {r.name!r}: parameter {pname!r} needs job resource "
                    f"{dep.name!r}, which lives shorter than it; make {r.name!r} scope='job'"
                )
            self._topo(dep, path, done, out)
        path.pop()
        done.add(id(r))
        out.append(r)

    def plan(self, handler: Callable[..., Any], name: str | None = None) -> Plan:
        """Work out, once, how ``handler``'s parameters after the payload are resolved.

        An unannotated parameter named ``ctx`` is the ``JobContext`` (what handlers took before
        resources existed); a parameter with a default that nobody provides keeps its default.
        """
        label = name or _name(handler)
        hints = _hints(handler, "handler")
        params = list(inspect.signature(handler).parameters.values())[1:]
        order: list[Resource] = []
        done: set[int] = set()
        kwargs: list[tuple[str, int, Any]] = []
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(f"handler {label!r}: *{p.name} cannot be resolved by type")
            hint = _strip(hints.get(p.name, JobContext if p.name == "ctx" else None))
            if hint is JobContext:
                kwargs.append((p.name, _CTX, None))
                continue
            r = self._by_type.get(hint)
            if r is None:
                if p.default is not p.empty:
                    continue
                what = "no annotation" if hint is None else _tname(hint)
                raise ConfigError(
                    f"handler {label!r}: parameter {p.name!r} ({what}) is neither the JobContext "
                    f"nor a type any resource provides"
                )
            self._topo(r, [], done, order)
            kwargs.append((p.name, _PROC if r.scope == "process" else _JOB, hint))
        job_index: dict[Any, int] = {}
        steps: list[tuple[Resource, Callable[..., Any], tuple[tuple[str, int, Any], ...]]] = []
        process_needed = []
        for r in order:
            if r.scope == "process":
                process_needed.append(r.provides)
                continue
            sources = tuple(
                (pn, _CTX, None)
                if tp is JobContext
                else (pn, _JOB, job_index[tp])
                if self._by_type[tp].scope == "job"
                else (pn, _PROC, tp)
                for pn, tp in r.params
            )
            job_index[r.provides] = len(steps)
            steps.append((r, r.opener, sources))
        final = tuple((pn, src, job_index[key] if src == _JOB else key) for pn, src, key in kwargs)
        return Plan(label, final, tuple(steps), tuple(process_needed))

    # -- process scope -----------------------------------------------------------------------

    def process_scope(
        self, *, eager: bool = True, overrides: Mapping[Any, Any] | None = None
    ) -> _ProcessScope:
        """``async with resources.process_scope():`` around the worker's life.

        ``overrides`` ({Type: instance}) replace resources of either scope, for tests: an
        overridden resource is never called, and whatever only it needed is never opened (with
        ``eager=False``).
        """
        return _ProcessScope(self, eager, dict(overrides or {}))

    async def _open_process(self, tp: Any) -> Any:
        """The process instance of ``tp``, opening it (and its dependencies) on first use."""
        try:
            return self._proc_values[tp]
        except KeyError:
            pass
        if not self._proc_open:
            raise RuntimeError("process resources used outside resources.process_scope()")
        if tp in self._overrides:
            return self._overrides[tp]
        r = self._by_type[tp]
        lock = self._proc_locks.setdefault(tp, asyncio.Lock())
        async with lock:
            if tp in self._proc_values:
                return self._proc_values[tp]
            kwargs = {pn: await self._open_process(dep) for pn, dep in r.params}
            value, exit_ = await _enter(r, r.opener, kwargs)
            if exit_ is not None:
                self._proc_exits.append((r.name, exit_))
            self._proc_values[tp] = value
            return value

    async def _close_process(self) -> None:
        exits, self._proc_exits = self._proc_exits, []
        self._proc_values.clear()
        self._proc_locks.clear()
        self._proc_open = False
        await _close_all(exits, None, None, None, self._close_failures, "process")

    # -- job scope ---------------------------------------------------------------------------

    async def open_for_job(self, plan: Plan, ctx: JobContext) -> OpenJob:
        """Open ``plan``'s job-scoped resources for one run: the handler's arguments and how to
        close what opened (``OpenJob.close``), what the chain's ``JobScope`` layer drives. With
        test overrides it resolves on demand (``job_scope``); otherwise it runs the opening
        steps directly, with no scope object and no context-manager frames."""
        if self._overrides:
            scope = self.job_scope(plan, ctx)
            return OpenJob(await scope.__aenter__(), scope=scope)
        exits: list[tuple[str, tuple[str, Any]]] = []
        try:
            kwargs = await open_job(self, plan, ctx, exits)
        except BaseException as failure:
            await _close_all(
                exits, type(failure), failure, failure.__traceback__, self._close_failures, "job"
            )
            raise
        return OpenJob(kwargs, exits=exits, failures=self._close_failures)

    def job_scope(
        self, plan: Plan, ctx: JobContext, overrides: Mapping[Any, Any] | None = None
    ) -> _JobScope:
        """``async with resources.job_scope(plan, ctx) as kwargs: await handler(p, **kwargs)``."""
        return _JobScope(self, plan, ctx, overrides or self._overrides)


def _tname(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or repr(tp)


async def _enter(
    r: Resource, opener: Callable[..., Any], kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    """Call a resource and enter what it returns: ``(value, (kind, object to close) or None)``.

    Generators are driven directly rather than through ``contextlib``'s wrappers: same
    semantics, a third of the cost per job.
    """
    obj = opener(**kwargs)
    kind = r.kind
    try:
        if kind == "agen":
            return await obj.__anext__(), ("agen", obj)
        if kind == "gen":
            return next(obj), ("gen", obj)
    except (StopAsyncIteration, StopIteration):
        raise RuntimeError(f"resource {r.name!r} returned without yielding a value") from None
    if kind == "acm":
        return await obj.__aenter__(), ("acm", obj)
    if kind == "cm":
        return obj.__enter__(), ("cm", obj)
    if kind == "await":
        return await obj, None
    return obj, None


async def _exit_one(
    kind: str,
    obj: Any,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Close one resource, throwing the job's exception into it, as ``contextlib`` would."""
    if kind == "acm":
        await obj.__aexit__(exc_type, exc, tb)
        return
    if kind == "cm":
        obj.__exit__(exc_type, exc, tb)
        return
    if exc is None and exc_type is not None:
        exc = exc_type()
    if kind == "agen":
        try:
            if exc is None:
                await obj.__anext__()
            else:
                await obj.athrow(exc)
        except StopAsyncIteration:
            return
        await obj.aclose()
        raise RuntimeError("resource generator yielded more than once")
    try:
        if exc is None:
            next(obj)
        else:
            obj.throw(exc)
    except StopIteration:
        return
    obj.close()
    raise RuntimeError("resource generator yielded more than once")


async def _close_all(
    exits: list[tuple[str, tuple[str, Any]]],
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
    counter: Counter,
    scope: str,
) -> None:
    """Close in reverse order; a close that raises is logged and counted, never propagated.

    The job's own exception is thrown into each (so a generator's ``except``/``finally`` sees
    it, as with ``contextlib``); a close re-raising that same exception is not a failure. A
    close that returns true does not swallow the job's exception: only the handler decides the
    outcome. A ``BaseException`` that is not an ``Exception`` (cancellation) is re-raised after
    the remaining resources are closed, since swallowing cancellation breaks shutdown.
    """
    pending: BaseException | None = None
    for name, (kind, obj) in reversed(exits):
        try:
            if kind == "agen" and exc is None:  # inlined _exit_one for the common case
                try:
                    await obj.__anext__()
                except StopAsyncIteration:
                    continue
                await obj.aclose()
                raise RuntimeError("resource generator yielded more than once")
            await _exit_one(kind, obj, exc_type, exc, tb)
        except Exception as failure:
            if failure is exc:
                continue
            counter.labels(name).inc()
            log.error(
                "resource_close_failed",
                resource=name,
                scope=scope,
                error=f"{type(failure).__name__}: {failure}",
                exc_info=failure,
            )
        except BaseException as failure:  # cancellation: finish closing, then let it through
            if failure is not exc and pending is None:
                pending = failure
    if pending is not None:
        raise pending


class _ProcessScope:
    def __init__(self, resources: Resources, eager: bool, overrides: dict[Any, Any]) -> None:
        self._r = resources
        self._eager = eager
        self._overrides = overrides

    async def __aenter__(self) -> Resources:
        r = self._r
        if r._proc_open:
            raise RuntimeError("the process scope is already open")
        r.check()
        r._overrides = self._overrides
        r._proc_open = True
        if self._eager:
            try:
                for res in r._order:
                    if res.scope == "process" and res.provides not in self._overrides:
                        await r._open_process(res.provides)
            except BaseException:
                await r._close_process()
                raise
        return r

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._r._close_process()
        self._r._overrides = {}


class OpenJob:
    """One run's opened job resources: ``kwargs`` for the handler, ``close(failure)`` after it
    (in reverse order, the run's exception thrown into generators, failures logged and counted
    without changing the outcome)."""

    __slots__ = ("_exits", "_failures", "_scope", "kwargs")

    def __init__(
        self,
        kwargs: dict[str, Any],
        *,
        exits: list[tuple[str, tuple[str, Any]]] | None = None,
        failures: Counter | None = None,
        scope: _JobScope | None = None,
    ) -> None:
        self.kwargs = kwargs
        self._exits = exits
        self._failures = failures
        self._scope = scope

    async def close(self, failure: BaseException | None) -> None:
        exc_type = type(failure) if failure is not None else None
        tb = failure.__traceback__ if failure is not None else None
        if self._scope is not None:
            await self._scope.__aexit__(exc_type, failure, tb)
        elif self._exits:
            assert self._failures is not None
            await _close_all(self._exits, exc_type, failure, tb, self._failures, "job")


class _JobScope:
    """Opens a plan's job resources in order and closes them in reverse; one per job."""

    __slots__ = ("_ctx", "_exits", "_overrides", "_plan", "_r")

    def __init__(
        self, resources: Resources, plan: Plan, ctx: JobContext, overrides: Mapping[Any, Any]
    ) -> None:
        self._r = resources
        self._plan = plan
        self._ctx = ctx
        self._overrides = overrides
        self._exits: list[tuple[str, tuple[str, Any]]] = []

    async def __aenter__(self) -> dict[str, Any]:
        plan, ctx = self._plan, self._ctx
        if not plan.steps and not plan.process_needed:  # fast path: ctx at most
            return {pn: ctx for pn, _, _ in plan.kwargs}
        r = self._r
        overrides = self._overrides
        if overrides:
            return await self._enter_overridden()
        try:
            return await open_job(r, plan, ctx, self._exits)
        except BaseException as failure:
            await self._close(type(failure), failure, failure.__traceback__)
            raise

    async def _enter_overridden(self) -> dict[str, Any]:
        """Slow path for tests: resolve on demand so overridden resources' deps never open."""
        r, ctx, overrides = self._r, self._ctx, self._overrides
        job_values: dict[Any, Any] = {}

        async def get(tp: Any) -> Any:
            if tp is JobContext:
                return ctx
            if tp in overrides:
                return overrides[tp]
            res = r._by_type[tp]
            if res.scope == "process":
                return await r._open_process(tp)
            if tp not in job_values:
                kwargs = {pn: await get(dep) for pn, dep in res.params}
                value, exit_ = await _enter(res, res.opener, kwargs)
                if exit_ is not None:
                    self._exits.append((res.name, exit_))
                job_values[tp] = value
            return job_values[tp]

        try:
            out = {}
            for pn, src, key in self._plan.kwargs:
                tp = (
                    JobContext
                    if src == _CTX
                    else key
                    if src == _PROC
                    else self._plan.steps[key][0].provides
                )
                out[pn] = await get(tp)
            return out
        except BaseException as failure:
            await self._close(type(failure), failure, failure.__traceback__)
            raise

    async def _close(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        exits, self._exits = self._exits, []
        if exits:
            await _close_all(exits, exc_type, exc, tb, self._r._close_failures, "job")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        exits = self._exits
        if exits:
            self._exits = []
            await _close_all(exits, exc_type, exc, tb, self._r._close_failures, "job")


async def _resolve(
    r: Resources, sources: Sequence[tuple[str, int, Any]], ctx: JobContext, values: list[Any]
) -> dict[str, Any]:
    """Arguments by source: the job's context, a job resource opened earlier, or a process one."""
    proc = r._proc_values
    args: dict[str, Any] = {}
    for pn, src, key in sources:
        if src == _CTX:
            args[pn] = ctx
        elif src == _JOB:
            args[pn] = values[key]
        else:
            args[pn] = proc[key] if key in proc else await r._open_process(key)
    return args


async def open_job(
    r: Resources, plan: Plan, ctx: JobContext, exits: list[tuple[str, tuple[str, Any]]]
) -> dict[str, Any]:
    """Open ``plan``'s job resources in order and return the handler's keyword arguments.

    What each opened resource needs to close lands in ``exits`` as it opens, so the caller
    closes exactly what was opened, in reverse, whether this raises or the job does. The one
    copy of the opening steps: ``job_scope`` and the chain's ``JobScope`` layer both use it.
    """
    values: list[Any] = []
    for res, opener, sources in plan.steps:
        kwargs = await _resolve(r, sources, ctx, values)
        if res.kind == "agen":  # inlined _enter for the common case
            obj = opener(**kwargs)
            try:
                values.append(await obj.__anext__())
            except StopAsyncIteration:
                raise RuntimeError(
                    f"resource {res.name!r} returned without yielding a value"
                ) from None
            exits.append((res.name, ("agen", obj)))
        else:
            value, exit_ = await _enter(res, opener, kwargs)
            values.append(value)
            if exit_ is not None:
                exits.append((res.name, exit_))
    return await _resolve(r, plan.kwargs, ctx, values)
