"""The ``leveret`` command line."""

from __future__ import annotations

import click

from .api_cmd import api
from .cancel_cmd import cancel
from .dlq_cmd import dlq
from .doctor_cmd import doctor
from .job_cmd import job
from .publish_cmd import publish
from .schedule_cmd import schedule
from .status_cmd import status
from .topology_cmd import topology
from .worker_cmd import worker


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="""\b
Settings come from LEVERET_* environment variables, e.g.
  LEVERET_AMQP_URL=amqp://guest:guest@localhost:5672/   broker (amqps:// for TLS)
  LEVERET_PREFETCH=50                                  jobs one worker runs at once
Run `leveret COMMAND --help` for examples.""",
)
@click.version_option(package_name="leveret")
def cli() -> None:
    """Leveret: background jobs on RabbitMQ."""


cli.add_command(worker)
cli.add_command(topology)
cli.add_command(publish)
cli.add_command(dlq)
cli.add_command(status)
cli.add_command(doctor)
cli.add_command(schedule)
cli.add_command(api)
cli.add_command(job)
cli.add_command(cancel)


def main() -> None:
    cli()
