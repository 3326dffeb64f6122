"""``GET /jobs`` and ``GET /stats``: the job history (``LEVERET_HISTORY_URL``) over HTTP.

Added to the app by ``add_history_routes`` (one call in ``create_app``); behind the API token
like every route but ``/healthz``. Without a history store both answer 503 with one clear
``detail``; an unreachable database is a 503 with ``Retry-After`` too. The store is also left on
``app.state.history`` (``None`` without one) for the console, which reads the same history.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import structlog
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from leveret.consumer.history.store import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    HistoryStore,
    HistoryUnavailable,
    InvalidQuery,
    decode_cursor,
    parse_moment,
)
from leveret.producers.stores import LifecycleSettings

log = structlog.get_logger("leveret.api")

NO_HISTORY = "no job history is configured (set LEVERET_HISTORY_URL)"
DEFAULT_STATS_SINCE = "24h"
RETRY_AFTER_S = "5"

State = Literal["started", "retrying", "succeeded", "dead", "cancelled"]


class JobOut(BaseModel):
    """One ``leveret_jobs`` row."""

    id: str
    job: str
    queue: str
    state: str
    attempts: int
    payload: Any = None
    result: Any = None
    error: str | None = None
    progress: float | None = None
    message: str | None = None
    created_at: str
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    updated_at: str


class JobsPage(BaseModel):
    """Newest first; ``next_cursor`` (``null`` on the last page) fetches the next page."""

    jobs: list[JobOut]
    next_cursor: str | None


class JobStatsOut(BaseModel):
    job: str
    total: int
    counts: dict[str, int]
    p50: float | None
    p95: float | None
    p99: float | None
    failure_rate: float | None


class StatsOut(BaseModel):
    since: str
    jobs: list[JobStatsOut]


class _Detail(BaseModel):
    detail: Any


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": RETRY_AFTER_S})


def _invalid(name: str, exc: Exception) -> JSONResponse:
    """FastAPI's own 422 shape, so a client handles a bad ``since`` like a bad ``limit``."""
    return JSONResponse(
        {"detail": [{"loc": ["query", name], "msg": str(exc), "type": "value_error"}]},
        status_code=422,
    )


def _moment(name: str, value: str | None) -> datetime | JSONResponse | None:
    if value is None:
        return None
    try:
        return parse_moment(value)
    except InvalidQuery as exc:
        return _invalid(name, exc)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": _Detail, "description": "Missing or wrong bearer token."},
    503: {"model": _Detail, "description": "No history store configured, or it is unreachable."},
}

Since = Annotated[
    str | None,
    Query(description="Created at or after: `1h`, `30m`, `2d` ago, or an ISO 8601 time."),
]


def add_history_routes(
    app: FastAPI,
    lifecycle: LifecycleSettings | None = None,
    owned: list[Callable[[], Awaitable[None]]] | None = None,
    store: HistoryStore | None = None,
) -> HistoryStore | None:
    """Add the routes; the store is built from ``LEVERET_HISTORY_URL`` unless given (then
    closed with the app through ``owned``, the list ``create_app`` closes on shutdown)."""
    if store is None:
        lifecycle = lifecycle if lifecycle is not None else LifecycleSettings()
        url = lifecycle.history_url.get_secret_value().strip() if lifecycle.history_url else ""
        if url:
            store = HistoryStore(url)
            if owned is not None:
                owned.append(store.close)
    app.state.history = store
    # An app without a history answers 503 on both routes but does not advertise them in its
    # OpenAPI document (a client generated from it has no operation that cannot work).
    _add_listing(app, store, documented=store is not None)
    _add_stats(app, store, documented=store is not None)
    return store


def _add_listing(app: FastAPI, store: HistoryStore | None, *, documented: bool) -> None:
    """``GET /jobs``: the history's jobs, newest first, with a cursor for the next page."""

    @app.get(
        "/jobs",
        operation_id="list_jobs",
        summary="Jobs from the history, newest first",
        tags=["history"],
        include_in_schema=documented,
        response_model=JobsPage,
        responses=_RESPONSES,
    )
    async def list_jobs(
        state: State | None = None,
        job: str | None = None,
        queue: str | None = None,
        since: Since = None,
        until: Annotated[str | None, Query(description="Created before (as `since`).")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
        cursor: Annotated[str | None, Query(description="A previous page's next_cursor.")] = None,
    ) -> Any:
        if store is None:
            return _unavailable(NO_HISTORY)
        since_at, until_at = _moment("since", since), _moment("until", until)
        for bad in (since_at, until_at):
            if isinstance(bad, JSONResponse):
                return bad
        if cursor is not None:
            try:
                decode_cursor(cursor)
            except InvalidQuery as exc:
                return _invalid("cursor", exc)
        assert not isinstance(since_at, JSONResponse) and not isinstance(until_at, JSONResponse)
        try:
            rows, next_cursor = await store.list_jobs(
                state=state,
                job=job,
                queue=queue,
                since=since_at,
                until=until_at,
                limit=limit,
                cursor=cursor,
            )
        except HistoryUnavailable as exc:
            log.warning("api.history_unavailable", error=str(exc))
            return _unavailable("the job history is unreachable")
        except InvalidQuery as exc:
            return _invalid(exc.field or "query", exc)
        return JSONResponse({"jobs": [r.to_json() for r in rows], "next_cursor": next_cursor})


def _add_stats(app: FastAPI, store: HistoryStore | None, *, documented: bool) -> None:
    """``GET /stats``: per job name, counts per outcome, duration percentiles, failure rate."""

    @app.get(
        "/stats",
        operation_id="job_stats",
        summary="Per job name: counts per outcome, duration percentiles, failure rate",
        tags=["history"],
        include_in_schema=documented,
        response_model=StatsOut,
        responses=_RESPONSES,
    )
    async def stats(
        since: Annotated[
            str,
            Query(description="Jobs created since: `1h`, `2d` ago, or an ISO 8601 time."),
        ] = DEFAULT_STATS_SINCE,
    ) -> Any:
        if store is None:
            return _unavailable(NO_HISTORY)
        since_at = _moment("since", since)
        if isinstance(since_at, JSONResponse):
            return since_at
        since_at = since_at or datetime.now(UTC) - timedelta(days=1)
        try:
            figures = await store.stats(since_at)
        except HistoryUnavailable as exc:
            log.warning("api.history_unavailable", error=str(exc))
            return _unavailable("the job history is unreachable")
        return JSONResponse(
            {
                "since": since_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "jobs": [f.to_json() for f in figures],
            }
        )
