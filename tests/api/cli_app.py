"""An APP for the ``leveret api`` command tests: settings from LEVERET_* like a user's."""

from __future__ import annotations

from pydantic import BaseModel

from leveret import Worker

worker = Worker()


class Ping(BaseModel):
    n: int


@worker.job("api_cli_ping", queue="api_cli")
async def ping(payload: Ping) -> None:
    pass
