"""Outcomes a layer of the chain decides instead of the handler: ``Postponed``, ``Cancelled``,
``AlreadyEnded``.

A layer (rate limits, cancellation, or a user's middleware) that decides a run's outcome raises
one of these through the rest of the chain; the pipeline hands any ``DecidedOutcome`` to its
``settle``, exactly as it hands a return value to ``Settler.succeeded`` or any other exception
to ``Settler.failed``. So the delivery path has no special case per feature: a new kind of
outcome is a new subclass, and a layer that replaces a built-in one raises the same classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leveret.consumer.delivery.envelope import Delivery
    from leveret.consumer.delivery.settle import Settler


class DecidedOutcome(Exception):
    """Raised by a layer: the run's outcome is decided; ``settle`` carries it out."""

    async def settle(
        self, settler: Settler, d: Delivery, job: str, attempt: int, duration: float
    ) -> None:
        raise NotImplementedError


class Postponed(DecidedOutcome):
    """The job may not start yet (its rate limit, a lock held, the limiter's store down): give
    it back through the delay chain for ``delay_s``, with the *same* attempt count, confirmed
    before the ack. Not a failure: no attempt burns, nothing is counted as run."""

    def __init__(self, delay_s: float, why: str) -> None:
        super().__init__(f"{why}; back in {delay_s:.3f} s")
        self.delay_s = delay_s

    async def settle(
        self, settler: Settler, d: Delivery, job: str, attempt: int, duration: float
    ) -> None:
        await settler.postpone(d, self.delay_s)


class Cancelled(DecidedOutcome):
    """The job was cancelled (``pub.cancel``): it ends ``cancelled`` and is acked, neither
    retried nor given back. ``ran`` says whether a handler ran for it now (its duration is
    then the run's); ``error`` is what the cancelled run raised, if anything."""

    def __init__(self, *, ran: bool, error: str | None = None) -> None:
        super().__init__(error or "cancelled")
        self.ran = ran
        self.error = error

    async def settle(
        self, settler: Settler, d: Delivery, job: str, attempt: int, duration: float
    ) -> None:
        if self.ran:
            await settler.cancelled(d, job, attempt, duration, self.error)
        else:  # its last run was the one before this delivery
            await settler.cancelled(d, job, d.attempts)


class AlreadyEnded(DecidedOutcome):
    """This delivery is a second copy of a job whose outcome is already recorded (a group's
    final job published twice across a crash): it is acked and nothing else — no event, no
    status write, not counted as a run — so the first run's outcome, whatever it was, stands
    alone."""

    def __init__(self, state: str) -> None:
        super().__init__(f"already ended {state}")
        self.state = state

    async def settle(
        self, settler: Settler, d: Delivery, job: str, attempt: int, duration: float
    ) -> None:
        await settler.drop_duplicate(d, job, self.state)
