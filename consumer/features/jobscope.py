"""``JobScope``: the chain layer that opens a job's job-scoped resources and closes them after.

It exists only in the chain of a job whose handler (or whose resources) ask for a job-scoped
resource (``execution.build_chain``); the resolved arguments reach the handler through
``RESOLVED``, a context variable, since the layers between pass only ``ctx`` along.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

from leveret.consumer.features.resources import Plan, Resources

if TYPE_CHECKING:
    from leveret.consumer.context import JobContext
    from leveret.consumer.delivery.middleware import CallNext


# The job's resolved handler arguments, from ``JobScope`` to the invoker inside the timeout.
# Each delivery runs in a task of its own, so one job never sees another's (a context copy).
RESOLVED: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("leveret_resolved")


class JobScope:
    """Opens the job's job-scoped resources around the rest of the chain (``Resources``).

    Outside ``JobTimeout``: opening a session is not the handler's time. Whatever the outcome,
    they are closed in reverse order, the run's exception thrown into generator resources (so a
    transaction rolls back), a failing close logged and counted without changing the outcome.

    It drives ``Resources.open_for_job``, the resources' public way to open one run's
    job-scoped resources and close them after.
    """

    __slots__ = ("_plan", "_resources")

    def __init__(self, resources: Resources, plan: Plan) -> None:
        self._resources = resources
        self._plan = plan

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        opened = await self._resources.open_for_job(self._plan, ctx)
        token = RESOLVED.set(opened.kwargs)
        try:
            result = await call_next(ctx)
        except BaseException as failure:
            RESOLVED.reset(token)
            await opened.close(failure)
            raise
        RESOLVED.reset(token)
        await opened.close(None)
        return result
