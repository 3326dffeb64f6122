"""The ``leveret`` command line."""

from __future__ import annotations

import click

from leveret.consumer.cli.api_cmd import api
from leveret.consumer.cli.cancel_cmd import cancel
from leveret.consumer.cli.dlq_cmd import dlq
from leveret.consumer.cli.doctor_cmd import doctor
from leveret.consumer.cli.history_cmd import history
from leveret.consumer.cli.job_cmd import job
from leveret.consumer.cli.jobs_cmd import jobs, stats
from leveret.consumer.cli.publish_cmd import publish
from leveret.consumer.cli.schedule_cmd import schedule
from leveret.consumer.cli.status_cmd import status
from leveret.consumer.cli.topology_cmd import topology
from leveret.consumer.cli.worker_cmd import worker


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
cli.add_command(history)
cli.add_command(jobs)
cli.add_command(stats)


def main() -> None:
    cli()
