"""``Cancellation``: the chain layer that honours ``pub.cancel`` (contract: "Cancellation").

One ``Cancellation`` per worker holds the cancelled ids (``ids``: filled by each session's
``CancelWatch`` from the Redis marks and the broadcasts) and the runs of ``cancellable=True``
jobs in progress; ``layer(spec)`` gives each job's layer, outermost after the log context, so a
cancelled job neither waits for its rate limit nor counts as started:

* cancelled before this delivery (queued, delayed, waiting for a retry): not run, ``Cancelled``;
* a running ``cancellable=True`` job whose cancel arrives (``cancel``, the watch's callback):
  its task is cancelled, the handler sees ``CancelledError``, the run ends ``Cancelled``;
* any other job cancelled while it ran finishes its run and is not run again: a failure that
  would have been retried ends ``Cancelled`` instead (a rejection or a last attempt still
  dead-letters, a success still succeeds).

The check costs one dict lookup per run; the layer exists only with a status store (where
cancellation exists at all).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from leveret.consumer.delivery.outcomes import Cancelled
from leveret.consumer.errors import Reject
from leveret.producers.wire import one_line

if TYPE_CHECKING:
    from leveret.consumer.context import JobContext
    from leveret.consumer.delivery.middleware import CallNext, Middleware
    from leveret.consumer.registry import JobSpec


class Cancellation:
    """The worker's cancelled ids and cancellable runs; ``layer(spec)`` per job."""

    def __init__(self) -> None:
        # id -> when it was added (CancelWatch keeps it bounded and ages it out).
        self.ids: OrderedDict[str, float] = OrderedDict()
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._cancelling: dict[str, asyncio.Task[Any]] = {}

    def layer(self, spec: JobSpec) -> Middleware:
        return self._cancellable if spec.cancellable else self._not_cancellable

    def cancel(self, job_id: str) -> None:
        """A cancel arrived while running: cancel the task of a running ``cancellable=True``
        job with that id (another job finishes its run; the id is in ``ids`` for later)."""
        task = self._running.pop(job_id, None)
        if task is not None:
            self._cancelling[job_id] = task
            task.cancel()

    async def _not_cancellable(self, ctx: JobContext, call_next: CallNext) -> Any:
        ids = self.ids
        if ctx.job_id in ids:
            raise Cancelled(ran=False)
        try:
            return await call_next(ctx)
        except Exception as exc:
            retried = ctx.attempt < ctx.max_attempts and not isinstance(exc, Reject | Cancelled)
            if retried and ctx.job_id in ids:  # would run again: it is not
                raise Cancelled(ran=True, error=_described(exc)) from exc
            raise

    async def _cancellable(self, ctx: JobContext, call_next: CallNext) -> Any:
        job_id = ctx.job_id
        if job_id in self.ids:
            raise Cancelled(ran=False)
        task = asyncio.current_task()
        assert task is not None
        self._running[job_id] = task
        try:
            return await call_next(ctx)
        except asyncio.CancelledError:
            if self._cancelling.pop(job_id, None) is task and task.uncancel() == 0:
                raise Cancelled(ran=True, error="CancelledError: cancelled by request") from None
            raise  # a shutdown or a lost connection: the job goes back unburnt
        finally:
            if self._running.get(job_id) is task:
                del self._running[job_id]


def _described(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}")
