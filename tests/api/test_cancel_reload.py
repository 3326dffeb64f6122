"""``CancelWatch`` loads the marks in the background, with backoff, once Redis is back."""

from __future__ import annotations

from collections.abc import AsyncIterator

from structlog.testing import capture_logs

from leveret.consumer.features.cancel_watch import CancelWatch
from leveret.producers.stores.cancel import CancelMarks
from leveret.producers.stores.status import StatusStoreUnavailable


class FlakyMarks(CancelMarks):
    """Unavailable for the first ``failures`` scans, then one mark."""

    ttl = 60

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.scans = 0

    async def mark(self, job_id: str) -> None:  # pragma: no cover - not used here
        raise NotImplementedError

    async def pending(self) -> AsyncIterator[str]:
        self.scans += 1
        if self.scans <= self.failures:
            raise StatusStoreUnavailable("down")
        yield "j1"


async def test_marks_load_after_failures_with_one_line_per_failure() -> None:
    """Two failed loads log their attempt and next delay (doubling); the third loads the mark."""
    marks = FlakyMarks(failures=2)
    watch = CancelWatch(connection=None, marks=marks)  # type: ignore[arg-type]  # not started
    with capture_logs() as logs:
        await watch._reload_until_loaded(delay=0.01, max_delay=1.0)
    assert "j1" in watch
    assert marks.scans == 3
    failed = [e for e in logs if e["event"] == "cancel.reload_failed"]
    assert [(e["attempt"], e["retry_in"]) for e in failed] == [(1, 0.02), (2, 0.04)]
    assert [e["marks"] for e in logs if e["event"] == "cancel.reloaded"] == [1]
