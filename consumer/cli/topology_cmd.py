"""``leveret topology declare|export APP``."""

from __future__ import annotations

import json

import click

from producers.connection import connect
from topology.declare import declare as declare_topology
from topology.definitions import to_definitions

from .common import command_setup, load_app, run_async


@click.group()
def topology() -> None:
    """Declare or export the broker layout an app needs."""


@topology.command(
    epilog="""\b
Example:
  leveret topology declare myapp.tasks:worker
Running it twice changes nothing; a queue that exists with other arguments is
named in the error, with the argument that differs."""
)
@click.argument("app")
@command_setup
def declare(app: str) -> None:
    """Declare exchanges, queues and bindings of APP on the broker."""
    app_worker = load_app(app)
    layout = app_worker.topology

    async def run() -> None:
        connection = await connect(app_worker.settings, robust=False)
        try:
            await declare_topology(connection, layout)
        finally:
            await connection.close()

    run_async(run())
    click.echo(
        f"declared {len(layout.queues)} work queue(s): " + ", ".join(q.name for q in layout.queues),
        err=True,
    )


@topology.command(
    epilog="""\b
Example:
  leveret topology export myapp.tasks:worker > definitions.json
  rabbitmqctl import_definitions definitions.json"""
)
@click.argument("app")
@click.option("--vhost", default="/", show_default=True, help="vhost to put in the definitions.")
@command_setup
def export(app: str, vhost: str) -> None:
    """Print APP's layout as RabbitMQ definitions JSON (stdout only)."""
    app_worker = load_app(app)
    layout = app_worker.topology
    click.echo(json.dumps(to_definitions(layout, vhost), indent=2))
