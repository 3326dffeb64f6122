"""``create_app(worker)``: the HTTP service API as a FastAPI app (served by ``leveret api``).

Routes are the contract's table ("HTTP service API"): ``POST /jobs/{job}``, ``GET`` and
``DELETE /jobs/{id}``, ``GET /healthz``, ``GET /openapi.json``. Besides the generic
``POST /jobs/{job}``, each registered job gets its own ``POST /jobs/<name>`` operation whose
request body is that job's pydantic model, so a client generator produces one typed method per
job. Both run the same code: the body is validated by the job's model exactly as the worker
will validate it (a 422 here is a job that would have been dead-lettered as ``invalid``), and
the JSON object the client sent is what gets published, untouched.

Why the broker connection is a background task: the contract wants ``/healthz`` answering while
the broker is down, so the process must start without it. Until the first connection succeeds
(and the app's topology is declared, as a worker would), ``POST`` answers 503 with
``Retry-After``; later drops are the robust connection's business, and a publish that fails
meanwhile is a 503 too. 202 is only ever sent after the broker's confirm (``Publisher``:
confirms + ``mandatory``).

Metrics are not served on the API's port: every request there but ``/healthz`` needs the token
(the contract), and Prometheus scrapes the worker-style endpoint on ``LEVERET_METRICS_PORT``
(``/metrics``, ``/healthz``, ``/readyz``) without one, the port the deployment's NetworkPolicy and
ServiceMonitor already treat as the scrape port.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import structlog
from fastapi import FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from leveret.consumer.api.history_routes import add_history_routes
from leveret.consumer.api.middleware import (
    ApiMetrics,
    AuthMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
)
from leveret.consumer.api.settings import ApiSettings
from leveret.consumer.errors import ConfigError
from leveret.consumer.registry import JobSpec
from leveret.consumer.runtime.health import HealthServer
from leveret.consumer.worker import Worker
from leveret.producers import Publisher, PublishError
from leveret.producers.broker import CONNECTION_ERRORS, connect, mask_url
from leveret.producers.stores import (
    MAX_KEY_LENGTH,
    CancelMarks,
    DedupStore,
    JobAlreadyEnded,
    LifecycleSettings,
    RedisStatusStore,
    StatusStore,
    StatusStoreUnavailable,
    Stores,
    UnknownJob,
    broadcast_cancel,
    declare_cancel_exchange,
    publish_once,
    request_cancel,
)
from leveret.producers.wire import new_job_id
from leveret.topology.declare import declare
from leveret.topology.delay import MAX_DELAY_S
from leveret.topology.errors import InvalidValueError, LeveretError

log = structlog.get_logger("leveret.api")

RETRY_AFTER_S = "5"
# What a publish raises when the broker did not take the job: 503. ``RuntimeError`` is a robust
# channel that is reconnecting (aio-pika raises it from ``get_underlay_channel``).
_SEND_ERRORS: tuple[type[BaseException], ...] = (
    PublishError,
    TimeoutError,
    RuntimeError,
    *CONNECTION_ERRORS,
)
PublisherFactory = Callable[[], Publisher]


class Accepted(BaseModel):
    """202: the broker confirmed the job (or a held ``dedup_key`` named this earlier job)."""

    id: str


class CancelAccepted(BaseModel):
    """202: cancellation recorded; ``state`` is the job's state when it was asked."""

    id: str
    state: str


class Problem(BaseModel):
    detail: Any


class StatusOut(BaseModel):
    """The contract's status object."""

    id: str
    job: str
    queue: str | None
    state: str
    attempt: int
    result: Any = None
    error: str | None = None
    progress: float | None = None
    message: str | None = None
    updated_at: str
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None


@dataclass
class ApiState:
    """What the routes share; ``app.state.leveret`` (tests read ``connected`` from it)."""

    worker: Worker
    settings: ApiSettings
    publisher_factory: PublisherFactory
    store: StatusStore | None
    marks: CancelMarks | None
    dedup: DedupStore | None
    metrics: ApiMetrics
    metrics_port: int
    publisher: Publisher | None = None
    cancel_channel: Any = None  # a confirming aiormq channel, once connected
    connected: bool = False
    connect_failures: int = 0
    health_port: int | None = None
    _connection: Any = None
    _owned: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def broadcast(self, job_id: str) -> None:
        if self.cancel_channel is None:
            raise ConnectionError("not connected to the broker")
        await broadcast_cancel(
            self.cancel_channel,
            self.worker.settings.exchange,
            job_id,
            timeout=self.worker.settings.publish_timeout,
        )


def payload_model(spec: JobSpec) -> type[BaseModel] | None:
    """The pydantic model of a job's first parameter; ``None`` for a ``dict`` payload."""
    model = getattr(spec, "model", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    first = next(iter(inspect.signature(spec.fn).parameters.values()))
    hint = typing.get_type_hints(spec.fn).get(first.name)
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


def _errors(exc: ValidationError) -> Any:
    """The model's errors as JSON (pydantic's own shape: ``loc``, ``msg``, ``type``, ``input``).
    A body that is not UTF-8 comes back in ``input`` as bytes, which pydantic cannot serialise:
    those values are given as their ``repr``."""
    return json.loads(json.dumps(exc.errors(include_url=False), default=repr))


def _problem(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _unavailable(detail: str) -> JSONResponse:
    return _problem(503, detail, {"Retry-After": RETRY_AFTER_S})


_POST_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "model": Accepted,
        "description": "Confirmed by the broker; the job's id.",
        # OpenAPI links: what a client (or schemathesis' stateful phase) does with the id.
        "links": {
            "GetStatus": {
                "operationId": "get_status",
                "parameters": {"job_id": "$response.body#/id"},
            },
            "Cancel": {"operationId": "cancel", "parameters": {"job_id": "$response.body#/id"}},
        },
    },
    401: {"model": Problem, "description": "Missing or wrong bearer token."},
    404: {"model": Problem, "description": "No job of that name."},
    413: {"model": Problem, "description": "Body over LEVERET_API_MAX_BODY."},
    422: {"model": Problem, "description": "The payload fails the job's model."},
    501: {"model": Problem, "description": "dedup_key without a status store."},
    503: {"model": Problem, "description": "Broker (or status store) unreachable."},
}


def _lifespan(
    state: ApiState, registry: CollectorRegistry, token: str | None
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Connect to the broker in the background, serve /metrics and /readyz, close what the app
    opened on the way out."""
    worker = state.worker

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        connector = asyncio.create_task(_connect_loop(state), name="leveret-api-connect")
        health: HealthServer | None = None
        try:
            if state.metrics_port:
                health = HealthServer(
                    worker.settings.metrics_host,
                    state.metrics_port,
                    registry,
                    lambda: state.connected,
                )
                await health.start()
                state.health_port = health.port
            log.info("api.started", jobs=sorted(worker.jobs.jobs), auth=token is not None)
            yield
        finally:
            connector.cancel()
            await asyncio.gather(connector, return_exceptions=True)
            if health is not None:
                await health.stop()
            await _disconnect(state)
            for close in state._owned:
                with contextlib.suppress(Exception):
                    await close()
            log.info("api.stopped")

    return lifespan


def _stores(
    status_store: StatusStore | None,
    cancel_marks: CancelMarks | None,
    dedup_store: DedupStore | None,
    lifecycle: LifecycleSettings | None,
    owned: list[Callable[[], Awaitable[None]]],
) -> tuple[StatusStore | None, CancelMarks | None, DedupStore | None]:
    """The stores not given, from ``LEVERET_STATUS_URL``: one Redis client shared by status,
    cancel marks and de-duplication; what is opened here is closed with the app (``owned``)."""
    if status_store is None:
        lifecycle = lifecycle if lifecycle is not None else LifecycleSettings()
        if lifecycle.status_url is not None:
            status_store = RedisStatusStore.from_url(
                lifecycle.status_url.get_secret_value(), ttl=lifecycle.status_ttl
            )
            owned.append(status_store.close)
    stores = Stores.of(status_store)
    if stores is not None:
        cancel_marks = cancel_marks if cancel_marks is not None else stores.marks
        dedup_store = dedup_store if dedup_store is not None else stores.dedup
    return status_store, cancel_marks, dedup_store


def _token(worker: Worker, settings: ApiSettings, insecure_no_auth: bool) -> str | None:
    """The bearer token; no token is refused unless ``insecure_no_auth`` says so, and so is an
    app without jobs (nothing to serve)."""
    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    if token is None and not insecure_no_auth:
        raise ConfigError(
            "LEVERET_API_TOKEN is not set: the API refuses to start without a token "
            "(pass --insecure-no-auth to run it open, e.g. behind an authenticating proxy)"
        )
    if token is not None and not token.strip():
        raise ConfigError("LEVERET_API_TOKEN is empty")
    if not worker.jobs.jobs:
        raise ConfigError("this app has no jobs: register handlers with @worker.job(...)")
    return token


def create_app(
    worker: Worker,
    settings: ApiSettings | None = None,
    *,
    publisher_factory: PublisherFactory | None = None,
    status_store: StatusStore | None = None,
    cancel_marks: CancelMarks | None = None,
    dedup_store: DedupStore | None = None,
    lifecycle: LifecycleSettings | None = None,
    insecure_no_auth: bool = False,
    registry: CollectorRegistry | None = None,
    metrics_port: int | None = None,
    ui: bool = True,
) -> FastAPI:
    """The API for ``worker``'s jobs. Without a token (``LEVERET_API_TOKEN``) this raises
    ``ConfigError`` unless ``insecure_no_auth``. Stores not given are built from
    ``LEVERET_STATUS_URL`` (``_stores``); without it, ``GET``/``DELETE`` answer 503 and a
    ``dedup_key`` 501. ``metrics_port`` defaults to ``LEVERET_METRICS_PORT`` (0: off).
    ``ui`` serves the web console at ``/ui`` (``leveret.consumer.console``; ``--no-ui``: off).
    """
    settings = settings if settings is not None else ApiSettings()
    token = _token(worker, settings, insecure_no_auth)
    owned: list[Callable[[], Awaitable[None]]] = []
    status_store, cancel_marks, dedup_store = _stores(
        status_store, cancel_marks, dedup_store, lifecycle, owned
    )
    registry = registry if registry is not None else worker.metrics.registry
    metrics = ApiMetrics.for_registry(registry)
    if publisher_factory is None:
        # The API loads the app, so its jobs' ``queued`` statuses name their queue at once.
        queues = {name: spec.queue for name, spec in worker.jobs.jobs.items()}
        publisher_factory = functools.partial(
            Publisher, settings=worker.settings, registry=registry, queues=queues
        )
    state = ApiState(
        worker=worker,
        settings=settings,
        publisher_factory=publisher_factory,
        store=status_store,
        marks=cancel_marks,
        dedup=dedup_store,
        metrics=metrics,
        metrics_port=worker.settings.metrics_port if metrics_port is None else metrics_port,
        _owned=owned,
    )

    app = FastAPI(
        title="Leveret job API",
        version="2",
        description="Publish, read and cancel background jobs. Every route but /healthz needs "
        "`Authorization: Bearer <LEVERET_API_TOKEN>`.",
        lifespan=_lifespan(state, registry, token),
        openapi_url=None,  # served below, behind auth like every route but /healthz
        docs_url=None,
        redoc_url=None,
    )
    app.state.leveret = state
    _add_routes(app, state)
    add_history_routes(app, lifecycle, owned)  # GET /jobs, GET /stats (LEVERET_HISTORY_URL)
    app.add_middleware(BodyLimitMiddleware, limit=settings.api_max_body)
    app.add_middleware(AuthMiddleware, token=token)
    if ui:  # outside the bearer check: the console signs in with its own cookie
        from leveret.consumer.console import add_console

        add_console(app, state)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    return app


# --- the broker connection ----------------------------------------------------------------------


async def _connect_loop(state: ApiState) -> None:
    """Connect, declare the topology, open the publisher; retry with backoff until it works
    (``api_connect_backoff`` doubling up to ``api_connect_backoff_max``), one line per failure."""
    settings = state.worker.settings

    def log_failure(retry: RetryCallState) -> None:
        exc = retry.outcome.exception() if retry.outcome is not None else None
        state.connect_failures += 1
        log.warning(
            "api.broker_unavailable",
            broker=mask_url(settings.amqp_url.get_secret_value()),
            error=str(exc) if isinstance(exc, LeveretError) else type(exc).__name__,
            failures=state.connect_failures,
            retry_in=round(retry.upcoming_sleep, 2),
        )

    retrying = AsyncRetrying(
        wait=wait_exponential(
            multiplier=state.settings.api_connect_backoff,
            max=state.settings.api_connect_backoff_max,
        ),
        retry=retry_if_exception_type(Exception),  # a cancel (BaseException) ends the loop
        before_sleep=log_failure,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            connection, channel, publisher = await _open_broker(state)
    state._connection = connection
    state.cancel_channel = await channel.get_underlay_channel()
    state.publisher = publisher
    state.connected = True
    log.info("api.broker_connected", failures=state.connect_failures)


async def _open_broker(state: ApiState) -> tuple[Any, Any, Publisher]:
    """One try: the connection, its confirming channel and the publisher; what was opened is
    closed again when a step fails or the try is cancelled."""
    settings = state.worker.settings
    connection = publisher = None
    try:
        connection = await connect(settings)
        await declare(connection, state.worker.topology)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_cancel_exchange(channel, settings.exchange)
        publisher = state.publisher_factory()
        await publisher.connect()
    except BaseException:
        for closing in (publisher, connection):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing.close()
        raise
    return connection, channel, publisher


async def _disconnect(state: ApiState) -> None:
    state.connected = False
    publisher, connection = state.publisher, state._connection
    state.publisher = state.cancel_channel = state._connection = None
    for closing in (publisher, connection):
        if closing is not None:
            with contextlib.suppress(Exception):
                await closing.close()


# --- routes -------------------------------------------------------------------------------------

Priority = Annotated[int | None, Query(ge=0, le=9, description="0-9, higher runs first.")]
Delay = Annotated[
    float | None,
    Query(ge=0, le=MAX_DELAY_S, allow_inf_nan=False, description="Seconds before it may run."),
]
DedupKey = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        description="While a job published with this key is live, publishing it again "
        "returns that job's id and enqueues nothing.",
    ),
]


async def _publish(
    state: ApiState,
    job: str,
    request: Request,
    priority: int | None,
    delay: float | None,
    dedup_key: str | None,
) -> JSONResponse:
    spec = state.worker.jobs.jobs.get(job)
    if spec is None:
        return _problem(404, f"no job named {job!r}")
    body = await request.body()  # bounded by BodyLimitMiddleware while it is read
    try:
        spec.validate(body)
    except ValidationError as exc:
        return _problem(422, _errors(exc))
    payload = json.loads(body)
    if not isinstance(payload, dict):  # a dict-typed job's adapter already refuses this
        return _problem(422, "the body must be a JSON object")
    if dedup_key is not None and state.dedup is None:
        return _problem(501, "dedup_key needs a status store (LEVERET_STATUS_URL) on the server")
    publisher = state.publisher
    if publisher is None:
        return _unavailable("not connected to the broker yet; try again shortly")

    async def send(job_id: str, headers: dict[str, str]) -> None:
        async with asyncio.timeout(state.worker.settings.publish_timeout + 5):
            await publisher.publish(
                job, payload, priority=priority, delay=delay, job_id=job_id, headers=headers
            )

    try:
        if dedup_key is not None:
            assert state.dedup is not None
            job_id, published = await publish_once(state.dedup, dedup_key, new_job_id(), send)
        else:
            job_id, published = new_job_id(), True
            await send(job_id, {})
    except InvalidValueError as exc:
        return _problem(422, str(exc))
    except StatusStoreUnavailable as exc:
        log.warning("api.store_unavailable", error=str(exc))
        return _unavailable("the status store is unreachable")
    except _SEND_ERRORS as exc:
        log.warning("api.publish_failed", job=job, error=f"{type(exc).__name__}: {exc}")
        return _unavailable(
            str(exc) if isinstance(exc, PublishError) else "the broker is unreachable"
        )
    if published and state.store is not None:
        try:
            await state.store.set_queued(job_id, job, spec.queue)
        except Exception as exc:  # the job is queued; its status appears with its first event
            log.warning("api.set_queued_failed", job_id=job_id, error=str(exc))
    return JSONResponse({"id": job_id}, status_code=202)


def _job_route(state: ApiState, job: str) -> Callable[..., Awaitable[JSONResponse]]:
    async def publish_job(
        request: Request,
        priority: Priority = None,
        delay: Delay = None,
        dedup_key: DedupKey = None,
    ) -> JSONResponse:
        return await _publish(state, job, request, priority, delay, dedup_key)

    return publish_job


def _add_routes(app: FastAPI, state: ApiState) -> None:
    models = _add_job_routes(app, state)
    _add_status_routes(app, state)
    _add_ops_routes(app, models)


def _add_job_routes(app: FastAPI, state: ApiState) -> dict[str, dict[str, Any]]:
    """``POST /jobs/<name>`` per job, typed by its payload model, and the untyped
    ``POST /jobs/{job}``; returns the payload models' schemas by component name."""
    models: dict[str, dict[str, Any]] = {}  # component name -> schema
    names: dict[type[BaseModel], str] = {}
    for name, spec in sorted(state.worker.jobs.jobs.items()):
        model = payload_model(spec)
        if model is None:
            body_schema: dict[str, Any] = {"type": "object", "additionalProperties": True}
        else:
            component = names.get(model)
            if component is None:
                component = model.__name__ if model.__name__ not in models else f"{name}_payload"
                names[model] = component
                models[component] = model.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
            body_schema = {"$ref": f"#/components/schemas/{component}"}
        app.add_api_route(
            f"/jobs/{name}",
            _job_route(state, name),
            methods=["POST"],
            status_code=202,
            operation_id=f"publish_{name}",
            summary=f"Publish a {name} job",
            tags=["jobs"],
            responses=_POST_RESPONSES,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": body_schema}},
                }
            },
        )

    @app.post(
        "/jobs/{job}",
        status_code=202,
        operation_id="publish",
        summary="Publish a job by name (the typed per-job operations are the same)",
        tags=["jobs"],
        responses=_POST_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    )
    async def publish(
        job: str,
        request: Request,
        priority: Priority = None,
        delay: Delay = None,
        dedup_key: DedupKey = None,
    ) -> JSONResponse:
        return await _publish(state, job, request, priority, delay, dedup_key)

    return models


def _add_status_routes(app: FastAPI, state: ApiState) -> None:
    """``GET``/``DELETE /jobs/{job_id}``: the status store's read and cancellation."""

    @app.get(
        "/jobs/{job_id}",
        operation_id="get_status",
        summary="The job's status",
        tags=["jobs"],
        responses={
            200: {"model": StatusOut, "description": "The status object."},
            401: {"model": Problem, "description": "Missing or wrong bearer token."},
            404: {"model": Problem, "description": "Unknown (or expired) job id."},
            503: {"model": Problem, "description": "Status store unreachable or not set."},
        },
    )
    async def get_status(job_id: str) -> JSONResponse:
        if state.store is None:
            return _unavailable("no status store is configured (LEVERET_STATUS_URL)")
        try:
            status = await state.store.get(job_id)
        except StatusStoreUnavailable:
            return _unavailable("the status store is unreachable")
        if status is None:
            return _problem(404, "unknown job id")
        return JSONResponse(status.model_dump(mode="json"))

    @app.delete(
        "/jobs/{job_id}",
        status_code=202,
        operation_id="cancel",
        summary="Request cancellation",
        tags=["jobs"],
        responses={
            202: {"model": CancelAccepted, "description": "Cancellation requested."},
            401: {"model": Problem, "description": "Missing or wrong bearer token."},
            404: {"model": Problem, "description": "Unknown (or expired) job id."},
            409: {"model": Problem, "description": "The job already ended."},
            503: {"model": Problem, "description": "Status store unreachable or not set."},
        },
    )
    async def cancel(job_id: str) -> JSONResponse:
        if state.store is None or state.marks is None:
            return _unavailable("cancellation needs the status store (LEVERET_STATUS_URL)")
        try:
            status = await request_cancel(state.store, state.marks, job_id, state.broadcast)
        except UnknownJob:
            return _problem(404, "unknown job id")
        except JobAlreadyEnded as exc:
            return _problem(409, f"the job already ended ({exc.status.state})")
        except StatusStoreUnavailable:
            return _unavailable("the status store is unreachable")
        return JSONResponse({"id": job_id, "state": status.state}, status_code=202)


def _add_ops_routes(app: FastAPI, models: dict[str, dict[str, Any]]) -> None:
    """``/healthz`` and the OpenAPI document (the job payload models, bearer auth)."""

    @app.get("/healthz", operation_id="healthz", summary="Liveness", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema["components"] = components = schema.get("components", {})
            target = components.setdefault("schemas", {})
            for name, generated in models.items():
                model_schema = dict(generated)
                target.update(model_schema.pop("$defs", {}))
                target[name] = model_schema
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            schema["security"] = [{"bearer": []}]
            schema["paths"]["/healthz"]["get"]["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
