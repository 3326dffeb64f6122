"""``leveret topology declare|export APP``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from yarl import URL

from leveret.consumer.cli.common import command_setup, fail, load_app, run_async
from leveret.producers.broker import connect
from leveret.topology.declare import declare as declare_topology
from leveret.topology.definitions import to_definitions


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


@topology.command(
    epilog="""\b
Examples:
  leveret topology schema myapp.tasks:worker > asyncapi.json
  leveret topology schema myapp.tasks:worker --job send_email
  leveret topology schema myapp.tasks:worker --out schemas/
The schemas come from the handlers' pydantic models (what the worker accepts);
publishers in any language can validate payloads against them before sending."""
)
@click.argument("app")
@click.option("--job", "job", help="Print only this job's payload JSON Schema.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write asyncapi.json and JOB.schema.json files into this directory instead.",
)
@command_setup
def schema(app: str, job: str | None, out: Path | None) -> None:
    """Print an AsyncAPI 2.6 document (or one job's JSON Schema) for APP's jobs."""
    from leveret.consumer.ops.management import amqp_vhost
    from leveret.consumer.ops.schema import asyncapi, job_schema, job_schemas

    app_worker = load_app(app)
    url = app_worker.settings.amqp_url.get_secret_value()
    if job is not None:
        spec = app_worker.jobs.jobs.get(job)
        if spec is None:
            known = ", ".join(sorted(app_worker.jobs.jobs)) or "none"
            fail(f"{app} has no job {job!r} (its jobs: {known})")
        click.echo(json.dumps(job_schema(spec), indent=2))
        return
    document = asyncapi(app_worker.jobs, app_worker.topology, amqp_url=url, vhost=amqp_vhost(url))
    if out is None:
        click.echo(json.dumps(document, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "asyncapi.json").write_text(json.dumps(document, indent=2) + "\n")
    for name, one in job_schemas(app_worker.jobs).items():
        (out / f"{name}.schema.json").write_text(json.dumps(one, indent=2) + "\n")
    click.echo(
        f"wrote asyncapi.json and {len(app_worker.jobs.jobs)} job schema(s) to {out}", err=True
    )
