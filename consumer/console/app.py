"""The console's routes: server-rendered pages under ``/ui`` (Jinja2), htmx polling for live
figures, every asset served from the package (``static/``: htmx 2.0.11, the CSS, a few lines of
JS that show times in the viewer's zone).

``add_console(app, state)`` mounts it on the API app. The API's bearer-token middleware would
refuse a browser (it sends a cookie, not a header), so ``ConsoleGate``, a middleware added just
outside it, hands every ``/ui`` request straight to the app's router, where the console's own
mount checks the session cookie (``auth``); any other path goes on through the bearer check as
before. The mount is a real route, so the API's request metrics count console requests under
the route ``/ui``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from leveret.consumer.api.middleware import BodyLimitMiddleware
from leveret.consumer.console import data
from leveret.consumer.console.auth import (
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    Session,
    Signer,
    same_origin,
)
from leveret.consumer.ops.dlq import DeadLetters, DlqError, Filter
from leveret.producers.stores import (
    JobAlreadyEnded,
    StatusStoreUnavailable,
    UnknownJob,
    request_cancel,
)

log = structlog.get_logger("leveret.console")
# What a dead-letter operation raises when the queue or the broker is not there.
DLQ_ERRORS: tuple[type[BaseException], ...] = (DlqError, *data.BROKER_ERRORS)

PREFIX = "/ui"
HERE = Path(__file__).parent
POLL_S = 3
DEAD_PAGE = 50
JOBS_PAGE = 50
COUNTS_H = 24  # the jobs page's per-state counts cover the last day
COUNTS_TTL_S = 15.0
COUNTS_WAIT_S = 0.05
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}
STATE_CLASS = {
    "queued": "s-queued",
    "started": "s-running",
    "running": "s-running",
    "retrying": "s-retrying",
    "succeeded": "s-ok",
    "failed": "s-failed",
    "dead": "s-dead",
    "cancelled": "s-cancelled",
}


class ConsoleGate:
    """Sends ``/ui`` and ``/ui/...`` to ``console`` (which checks its own cookie), the rest on."""

    def __init__(self, app: ASGIApp, console: ASGIApp) -> None:
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == PREFIX or path.startswith(PREFIX + "/"):
            await self.console(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def add_console(app: Any, state: Any) -> None:
    """Serve the console at ``/ui`` on the API ``app`` (a FastAPI app of ``create_app``).

    Call it after the auth middleware is added, so the gate sits outside it."""
    token = state.settings.api_token.get_secret_value() if state.settings.api_token else None
    console = Console(state, Signer(token))
    app.mount(PREFIX, console.asgi, name="console")
    limited = BodyLimitMiddleware(app.router, limit=state.settings.api_max_body)
    app.add_middleware(ConsoleGate, console=limited)


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["state_class"] = lambda s: STATE_CLASS.get(str(s), "s-other")
    env.filters["num"] = lambda v: "–" if v is None else f"{v:,}"
    env.filters["rate"] = lambda v: "–" if v is None else f"{v:.1f}/s"
    env.filters["q"] = lambda v: quote(str(v), safe="")
    env.filters["pretty"] = _pretty
    return env


def _pretty(value: Any) -> str:
    if isinstance(value, bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return str(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return str(value)
    return str(json.dumps(value, indent=2, sort_keys=True, default=str))


async def _form(request: Request) -> dict[str, list[str]]:
    """An urlencoded form body (no python-multipart needed); bounded by the body limit."""
    body = (await request.body()).decode("utf-8", "replace")
    return parse_qs(body, keep_blank_values=True)


class Console:
    def __init__(self, state: Any, signer: Signer) -> None:
        self.state = state
        self.signer = signer
        self.env = _env()
        self._history: data.History | None = None
        self._counts_value: dict[str, int] | None = None
        self._counts_at: float | None = None
        self._counts_task: asyncio.Task[dict[str, int] | None] | None = None
        static = StaticFiles(directory=HERE / "static")
        self.asgi = Starlette(
            routes=[
                Route("/", self.home),
                Route("/login", self.login, methods=["GET", "POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/queues", self.queues),
                Route("/jobs", self.jobs),
                Route("/jobs/{job_id}", self.job),
                Route("/jobs/{job_id}/cancel", self.cancel, methods=["POST"]),
                Route("/dead", self.dead_index),
                Route("/dead/{queue}", self.dead),
                Route("/dead/{queue}/replay", self.replay, methods=["POST"]),
                Route("/dead/{queue}/purge", self.purge, methods=["GET", "POST"]),
                Route("/schedules", self.schedules),
                Mount("/static", app=static, name="static"),
            ]
        )

    # -- plumbing ------------------------------------------------------------------------------

    def history(self) -> data.History:
        """The history store, opened once (its pool closes with the app)."""
        if self._history is None:
            self._history = data.open_history()
            store = self._history.store
            if store is not None:
                self.state._owned.append(store.close)
        return self._history

    async def _counts(self, history: data.History) -> dict[str, int] | None:
        """Jobs per state over the last ``COUNTS_H`` hours, at most ``COUNTS_TTL_S`` old.

        ``stats`` aggregates the whole window (durations' percentiles included), which takes
        longer than a page may (140 ms for 43,000 rows): it runs in the background, a page
        waits for it at most ``COUNTS_WAIT_S`` and otherwise shows the last counts (or none
        yet); the next poll has fresh ones."""
        task = self._counts_task
        if task is not None and task.done():  # finished after the page that started it
            self._counts_value, self._counts_at = task.result(), time.monotonic()
            self._counts_task = task = None
        if self._counts_at is not None and time.monotonic() - self._counts_at < COUNTS_TTL_S:
            return self._counts_value
        if task is None:
            since = datetime.now(UTC) - timedelta(hours=COUNTS_H)
            task = self._counts_task = asyncio.create_task(data.history_counts(history, since))
        done, _ = await asyncio.wait({task}, timeout=COUNTS_WAIT_S)
        if task in done:
            self._counts_value, self._counts_at = task.result(), time.monotonic()
            self._counts_task = None
        return self._counts_value

    def _session(self, request: Request) -> Session | None:
        if self.signer.open:
            return Session("open", 0)
        return self.signer.session(request.cookies.get(COOKIE))

    def _render(
        self,
        request: Request,
        template: str,
        session: Session | None,
        code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        timer = context.pop("timer", None) or data.Timer()
        html = self.env.get_template(template).render(
            request=request,
            prefix=PREFIX,
            csrf=self.signer.csrf(session) if session else "",
            signed_in=session is not None and not self.signer.open,
            poll_s=POLL_S,
            path=request.url.path,
            msg=request.query_params.get("msg"),
            err=request.query_params.get("err"),
            now=data.iso(datetime.now(UTC)),
            **context,
        )
        response = HTMLResponse(html, status_code=code)
        self._secure(response)
        response.headers["server-timing"] = f"app;dur={timer.ms():.1f}"
        return response

    @staticmethod
    def _secure(response: Response) -> None:
        response.headers.update(SECURITY_HEADERS)
        response.headers["cache-control"] = "no-store"

    def _to_login(self, request: Request) -> Response:
        if request.headers.get("hx-request"):
            response: Response = Response(
                status_code=401, headers={"HX-Redirect": PREFIX + "/login"}
            )
        else:
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            response = RedirectResponse(
                f"{PREFIX}/login?{urlencode({'next': nxt})}", status_code=303
            )
        self._secure(response)
        return response

    def _forbidden(self, request: Request, why: str) -> HTMLResponse:
        log.warning("console.refused", path=request.url.path, why=why)
        return self._render(request, "error.html", None, 403, title="Refused", detail=why)

    async def _post_guard(
        self, request: Request
    ) -> tuple[Session | None, dict[str, list[str]], Response | None]:
        """The session and form of a state-changing request, or the response refusing it."""
        session = self._session(request)
        if session is None:
            return None, {}, self._to_login(request)
        if not same_origin(request):
            return (
                None,
                {},
                self._forbidden(request, "cross-site request (Origin is not this console)"),
            )
        form = await _form(request)
        candidate = request.headers.get(CSRF_HEADER) or (form.get(CSRF_FIELD) or [""])[0]
        if not self.signer.csrf_ok(session, candidate):
            return None, {}, self._forbidden(request, "missing or wrong anti-forgery token")
        return session, form, None

    def _redirect(self, where: str, **query: str) -> RedirectResponse:
        target = PREFIX + where + (("?" + urlencode(query)) if query else "")
        response = RedirectResponse(target, status_code=303)
        self._secure(response)
        return response

    # -- sign-in -------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return self._redirect("/queues")

    async def login(self, request: Request) -> Response:
        nxt = request.query_params.get("next") or PREFIX + "/queues"
        if not nxt.startswith(PREFIX + "/") or nxt.startswith("//"):
            nxt = PREFIX + "/queues"
        if request.method == "GET":
            if self._session(request) is not None:
                return self._redirect(nxt[len(PREFIX) :])
            return self._render(request, "login.html", None, next=nxt)
        if not same_origin(request):
            return self._forbidden(request, "cross-site sign-in (Origin is not this console)")
        form = await _form(request)
        if not self.signer.check_token((form.get("token") or [""])[0]):
            log.warning("console.sign_in_refused")
            return self._render(request, "login.html", None, 401, next=nxt, error="Wrong token.")
        response = RedirectResponse(nxt, status_code=303)
        response.set_cookie(
            COOKIE,
            self.signer.new_cookie(),
            max_age=int(self.signer.ttl_s),
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        self._secure(response)
        log.info("console.signed_in")
        return response

    async def logout(self, request: Request) -> Response:
        _, _, refused = await self._post_guard(request)
        if refused is not None:
            return refused
        response = self._redirect("/login")
        response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return response

    # -- pages ---------------------------------------------------------------------------------

    async def queues(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_login(request)
        timer = data.Timer()
        view = await data.queues_view(self.state.worker)
        return self._render(
            request,
            "queues.html",
            session,
            timer=timer,
            view=view,
            page="queues",
            connected=self.state.connected,
        )

    async def jobs(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_login(request)
        timer = data.Timer()
        job_id = (request.query_params.get("id") or "").strip()
        if job_id:
            return self._redirect(f"/jobs/{quote(job_id, safe='')}")
        history = self.history()
        q = request.query_params
        state = q.get("state") or None
        state = state if state in history.states else None
        job = q.get("job") or None
        queue = q.get("queue") or None
        rows, next_cursor, error = await data.list_jobs(
            history, state, job, queue, JOBS_PAGE, q.get("cursor") or None
        )
        counts = await self._counts(history)
        return self._render(
            request,
            "jobs.html",
            session,
            timer=timer,
            page="jobs",
            history=history,
            rows=rows,
            next_cursor=next_cursor,
            error=error,
            state=state,
            job=job,
            queue=queue,
            states=history.states,
            counts=counts,
            counts_h=COUNTS_H,
        )

    async def job(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_login(request)
        timer = data.Timer()
        job_id = request.path_params["job_id"]
        status = None
        store_error = None
        if self.state.store is None:
            store_error = "no status store is configured (LEVERET_STATUS_URL)"
        else:
            try:
                status = await self.state.store.get(job_id)
            except StatusStoreUnavailable:
                store_error = "the status store is unreachable"
        history = self.history()
        hjob, history_error = await data.history_job(history, job_id)
        found = status is not None or hjob is not None
        src: Any = status if status is not None else hjob
        return self._render(
            request,
            "job.html",
            session,
            200 if found or store_error else 404,
            timer=timer,
            page="jobs",
            job_id=job_id,
            status=src,
            status_updated=data.iso(src.updated_at) if src is not None else None,
            store_error=store_error or history_error,
            hjob=hjob,
            payload=data._field(hjob, "payload"),
            attempts=data._field(hjob, "attempts"),
            history=history,
            found=found,
            timeline=data.timeline(status, hjob),
            cancellable=status is not None and not status.ended and self.state.marks is not None,
        )

    async def cancel(self, request: Request) -> Response:
        _, _, refused = await self._post_guard(request)
        if refused is not None:
            return refused
        job_id = request.path_params["job_id"]
        where = f"/jobs/{quote(job_id, safe='')}"
        if self.state.store is None or self.state.marks is None:
            return self._redirect(where, err="cancellation needs the status store")
        try:
            await request_cancel(self.state.store, self.state.marks, job_id, self.state.broadcast)
        except UnknownJob:
            return self._redirect(where, err="unknown job id")
        except JobAlreadyEnded as exc:
            return self._redirect(where, err=f"the job already ended ({exc.status.state})")
        except StatusStoreUnavailable:
            return self._redirect(where, err="the status store is unreachable")
        log.info("console.cancel", job_id=job_id)
        return self._redirect(where, msg="Cancellation requested.")

    async def dead_index(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_login(request)
        timer = data.Timer()
        view = await data.queues_view(self.state.worker)
        return self._render(
            request, "dead_index.html", session, timer=timer, page="dead", view=view
        )

    def _queue(self, request: Request) -> str | None:
        queue = str(request.path_params["queue"])
        return queue if queue in data.work_queues(self.state.worker) else None

    async def dead(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_login(request)
        timer = data.Timer()
        queue = self._queue(request)
        if queue is None:
            return self._render(
                request,
                "error.html",
                session,
                404,
                title="Not found",
                detail="no such work queue in this app",
            )
        rows: list[Any] = []
        depth = None
        error = None
        try:
            async with DeadLetters(
                self.state.worker.settings, queue, status_store=self.state.store
            ) as dlq:
                depth = await dlq.depth()
                async with contextlib.aclosing(dlq.list(limit=DEAD_PAGE)) as jobs:
                    rows = [j async for j in jobs]
        except DLQ_ERRORS as exc:
            error = str(exc) or type(exc).__name__
        return self._render(
            request,
            "dead.html",
            session,
            timer=timer,
            page="dead",
            queue=queue,
            rows=rows,
            depth=depth,
            error=error,
            limit=DEAD_PAGE,
        )

    async def replay(self, request: Request) -> Response:
        _, form, refused = await self._post_guard(request)
        if refused is not None:
            return refused
        queue = self._queue(request)
        if queue is None:
            return self._redirect("/dead", err="no such work queue")
        ids = frozenset(i for i in form.get("id", []) if i)
        if not ids:
            return self._redirect(f"/dead/{quote(queue)}", err="no job selected")
        try:
            async with DeadLetters(
                self.state.worker.settings, queue, status_store=self.state.store
            ) as dlq:
                moved = await dlq.replay(Filter(ids=ids))
        except DLQ_ERRORS as exc:
            return self._redirect(f"/dead/{quote(queue)}", err=str(exc) or type(exc).__name__)
        log.info("console.replay", queue=queue, asked=len(ids), moved=moved)
        return self._redirect(f"/dead/{quote(queue)}", msg=f"Replayed {moved} job(s) to {queue}.")

    async def purge(self, request: Request) -> Response:
        queue = self._queue(request)
        if request.method == "GET":
            session = self._session(request)
            if session is None:
                return self._to_login(request)
            if queue is None:
                return self._redirect("/dead", err="no such work queue")
            depth = None
            with contextlib.suppress(*DLQ_ERRORS):
                async with DeadLetters(self.state.worker.settings, queue) as dlq:
                    depth = await dlq.depth()
            return self._render(
                request, "purge.html", session, page="dead", queue=queue, depth=depth
            )
        _, form, refused = await self._post_guard(request)
        if refused is not None:
            return refused
        if queue is None:
            return self._redirect("/dead", err="no such work queue")
        if (form.get("confirm") or [""])[0] != queue:
            return self._redirect(
                f"/dead/{quote(queue)}/purge", err="type the queue's name to confirm"
            )
        try:
            async with DeadLetters(self.state.worker.settings, queue) as dlq:
                purged = await dlq.purge()
        except DLQ_ERRORS as exc:
            return self._redirect(f"/dead/{quote(queue)}", err=str(exc) or type(exc).__name__)
        log.info("console.purge", queue=queue, purged=purged)
        return self._redirect(f"/dead/{quote(queue)}", msg=f"Purged {purged} dead job(s).")

    async def schedules(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return self._to_login(request)
        timer = data.Timer()
        view = await data.schedules_view(self.state.worker, self.state.store)
        return self._render(
            request, "schedules.html", session, timer=timer, page="schedules", view=view
        )
