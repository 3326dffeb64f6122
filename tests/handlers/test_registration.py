"""Registration checks: each mistake is a ConfigError when the app loads, never on a message."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

from leveret.consumer import ConfigError, JobContext, Worker


class P(BaseModel):
    n: int


class Pool:
    pass


class Session:
    pass


def test_the_first_parameter_must_be_a_pydantic_model() -> None:
    worker = Worker()
    with pytest.raises(ConfigError, match=r"first parameter of handler 'a' \('n'\).*pydantic"):

        @worker.job("a")
        async def a(n: int) -> None: ...

    with pytest.raises(ConfigError, match="payload as its first parameter"):

        @worker.job("b")
        async def b() -> None: ...

    assert "a" not in worker.jobs.jobs and "b" not in worker.jobs.jobs


def test_a_duplicate_job_name_and_one_job_on_two_queues() -> None:
    worker = Worker()

    @worker.job("charge", queue="billing")
    async def charge(p: P) -> None: ...

    with pytest.raises(ConfigError, match="registered twice"):
        worker.job("charge", queue="billing")(charge)
    with pytest.raises(ConfigError, match="bound to queue 'billing' and again to 'other'"):

        @worker.job("charge", queue="other")
        async def charge_again(p: P) -> None: ...

    with pytest.raises(ConfigError, match="one job on two queues"):
        worker.job("charge_elsewhere", queue="other")(charge)
    # the same function under a second name on the *same* queue is an alias, allowed
    worker.job("charge_alias", queue="billing")(charge)


def test_a_def_handler_cannot_be_cancellable() -> None:
    worker = Worker()
    with pytest.raises(ConfigError, match="cancellable but its handler is a plain `def`"):

        @worker.job("sync", cancellable=True)
        def sync(p: P) -> None: ...

    @worker.job("fine", cancellable=True)
    async def fine(p: P) -> None: ...

    assert worker.jobs.jobs["fine"].cancellable


def test_bad_rates_fail_at_the_decorator() -> None:
    worker = Worker()
    with pytest.raises(ConfigError, match="rate_limit of job 'r'"):
        worker.job("r", rate_limit="100 per second")(_handler)
    with pytest.raises(ConfigError, match="global_rate_limit of job 'g'"):
        worker.job("g", global_rate_limit="0/m")(_handler)
    worker.job("ok", rate_limit="100/s", global_rate_limit="1000/m")(_handler)
    spec = worker.jobs.jobs["ok"]
    assert spec.rate_limit is not None and spec.rate_limit.limit == 100
    assert spec.global_rate_limit is not None and spec.global_rate_limit.window == 60


async def _handler(p: P) -> None: ...


def test_resource_errors_surface_at_check_not_on_a_message() -> None:
    """Missing dependency, cycle, a type two resources provide, a parameter nobody provides."""
    worker = Worker()

    @worker.resource(scope="job")
    async def session(pool: Pool) -> AsyncIterator[Session]:  # Pool: nobody provides it
        yield Session()

    @worker.job("uses")
    async def uses(p: P, s: Session, ctx: JobContext) -> None: ...

    with pytest.raises(ConfigError, match=r"needs .*Pool.*which no resource provides"):
        worker.check()

    @worker.resource()
    def pool(s: Session) -> Pool:  # now Pool <-> Session is a cycle (and process -> job)
        return Pool()

    with pytest.raises(ConfigError, match=r"circular|lives shorter"):
        worker.check()

    with pytest.raises(ConfigError, match="both provide"):

        @worker.resource()
        def another_pool() -> Pool:
            return Pool()

    other = Worker()

    @other.job("orphan")
    async def orphan(p: P, s: Session) -> None: ...

    with pytest.raises(ConfigError, match=r"parameter 's'.*neither the JobContext"):
        other.check()


def test_the_cli_app_loader_runs_check(tmp_path, monkeypatch) -> None:
    """`leveret worker app:worker` refuses an app whose handler asks for what nobody provides."""
    (tmp_path / "badapp.py").write_text(
        "from pydantic import BaseModel\n"
        "from leveret.consumer import Worker\n"
        "worker = Worker()\n"
        "class P(BaseModel):\n    n: int\n"
        "class Db: ...\n"
        "@worker.job('j')\n"
        "async def j(p: P, db: Db) -> None: ...\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from leveret.consumer.cli.common import load_app

    with pytest.raises(SystemExit):
        load_app("badapp:worker")
