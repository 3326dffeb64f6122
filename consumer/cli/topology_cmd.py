"""``leveret topology declare|export APP``."""

from __future__ import annotations

import json

import click
from yarl import URL

from producers.connection import connect
from topology.declare import declare as declare_topology
from topology.definitions import to_definitions

from .common import command_setup, fail, load_app, run_async


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
Examples:
  leveret topology export myapp.tasks:worker > definitions.json
  rabbitmqctl import_definitions definitions.json
  curl -u admin -H 'content-type: application/json' -d @definitions.json \\
       http://rabbit:15672/api/definitions/%2F
  leveret topology export myapp.tasks:worker --vhost jobs --with-vhost --with-users
--with-users adds the user of LEVERET_AMQP_URL with a salted hash of its
password (treat the file as a secret: importing it sets that user's password)
and the least permissions the app needs on the vhost."""
)
@click.argument("app")
@click.option("--vhost", default="/", show_default=True, help="vhost to put in the definitions.")
@click.option("--with-vhost", is_flag=True, help="Also define the vhost itself.")
@click.option(
    "--with-users", is_flag=True, help="Also define the AMQP URL's user and its permissions."
)
@command_setup
def export(app: str, vhost: str, with_vhost: bool, with_users: bool) -> None:
    """Print APP's layout as RabbitMQ definitions JSON (stdout only)."""
    app_worker = load_app(app)
    layout = app_worker.topology
    users = None
    if with_users:
        url = URL(app_worker.settings.amqp_url.get_secret_value())
        if not url.user:
            fail("--with-users needs a user in LEVERET_AMQP_URL (amqp://USER:PASSWORD@host/)")
        users = {url.user: url.password or ""}
    document = to_definitions(layout, vhost, with_vhost=with_vhost, users=users)
    click.echo(json.dumps(document, indent=2))
