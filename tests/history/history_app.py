"""An APP for ``leveret history APP`` in the tests: settings from LEVERET_* like a user's."""

from __future__ import annotations

import os
from typing import Any

from leveret import Worker

worker = Worker()
QUEUE = os.environ.get("HISTORY_TEST_QUEUE", "history_test")


@worker.job("history_ok", queue=QUEUE)
async def ok(payload: dict[str, Any]) -> dict[str, Any]:
    return {"n": payload.get("n")}
