"""``leveret history APP`` (the history writer) and ``leveret history migrate`` (its schema).

Both read ``LEVERET_HISTORY_URL`` (PostgreSQL). ``leveret history APP`` is short for
``leveret history run APP``: the app names the broker and the exchange whose outcome events are
written (see leveret.consumer.history.writer). The history modules, and asyncpg with them, are
imported when one of these commands runs, never by ``leveret worker``.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING, Any

import click

from leveret.consumer.cli.common import command_setup, fail, load_app, loop_option, run_async

if TYPE_CHECKING:
    from leveret.consumer.history.store import HistoryStore
    from leveret.producers.stores import LifecycleSettings

NO_HISTORY = "no job history: set LEVERET_HISTORY_URL (e.g. postgresql://user:pass@host/db)"


class _RunByDefault(click.Group):
    """``leveret history APP`` runs ``leveret history run APP``."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


def history_store(settings: LifecycleSettings | None = None) -> HistoryStore:
    """The store of ``LEVERET_HISTORY_URL``; one line and exit 1 without it."""
    from leveret.consumer.history.store import HistoryStore
    from leveret.producers.stores import LifecycleSettings

    settings = settings if settings is not None else LifecycleSettings()
    url = settings.history_url.get_secret_value().strip() if settings.history_url else ""
    if not url:
        fail(NO_HISTORY)
    return HistoryStore(url)


async def guarded(store: HistoryStore, work: Any) -> Any:
    """Run ``work(store)``, closing the store; a database error becomes one clear line."""
    from leveret.consumer.history.store import HistoryUnavailable

    try:
        return await work(store)
    except HistoryUnavailable:
        raise
    except Exception as exc:
        import asyncpg

        if isinstance(exc, OSError | TimeoutError | asyncpg.PostgresError | asyncpg.InterfaceError):
            raise HistoryUnavailable(
                f"the history database {store.where} failed: {type(exc).__name__}: {exc}"
            ) from None
        raise
    finally:
        await store.close()


@click.group(
    cls=_RunByDefault,
    epilog="""\b
Examples:
  leveret history migrate            create or update the tables (idempotent)
  leveret history myapp.tasks:worker write the app's job outcomes to PostgreSQL
Needs LEVERET_HISTORY_URL=postgresql://user:pass@host:5432/db.""",
)
def history() -> None:
    """The job history in PostgreSQL: its writer and its schema."""


@history.command("migrate")
@command_setup
def migrate() -> None:
    """Create or update the history tables; running it again changes nothing."""
    store = history_store()
    applied = run_async(guarded(store, lambda s: s.migrate()))
    from leveret.consumer.history.schema import LATEST

    if applied:
        click.echo(f"applied migration(s) {', '.join(map(str, applied))}; schema at {LATEST}")
    else:
        click.echo(f"up to date; schema at {LATEST}")


@history.command("run")
@click.argument("app")
@click.option(
    "--prefetch",
    type=click.IntRange(1),
    default=4000,
    show_default=True,
    help="Events held unacknowledged at once.",
)
@click.option(
    "--batch",
    "batch_size",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Events written per upsert at most.",
)
@click.option(
    "--flush-ms",
    type=click.IntRange(1),
    default=200,
    show_default=True,
    help="A batch that is not full is written after this long.",
)
@loop_option
@command_setup
def run(app: str, prefetch: int, batch_size: int, flush_ms: int, loop: str) -> None:
    """Write APP's job outcomes (its lifecycle events) to the history, in batches.

    \b
    Consumes the durable queue <exchange>.history (bound to <exchange>.events);
    acknowledges a batch once it is committed; deletes rows older than
    LEVERET_HISTORY_DAYS hourly. SIGTERM writes what it holds and exits 0.
    Run `leveret history migrate` first. Several replicas may run at once.
    """
    worker = load_app(app)
    store = history_store(worker.settings)
    from leveret.producers import LoopUnavailable, install_loop

    try:
        install_loop(loop)
    except LoopUnavailable as exc:  # uvloop asked for and not installed
        fail(str(exc))
    from leveret.consumer.history.writer import HistoryWriter

    arguments = {"x-queue-type": "quorum"} if worker.settings.queue_type == "quorum" else None
    writer = HistoryWriter(
        worker.settings,
        store,
        days=worker.settings.history_days,
        prefetch=prefetch,
        batch_size=batch_size,
        flush_interval=flush_ms / 1000,
        queue_arguments=arguments,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, writer.stop)
        await guarded(store, lambda _: writer.run())

    run_async(main())
