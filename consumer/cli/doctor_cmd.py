"""``leveret doctor APP``: check the broker against the app before anything goes wrong."""

from __future__ import annotations

import click

from leveret.consumer.cli.common import command_setup, load_app, run_async

_LABELS = {"error": "ERROR", "warning": "WARN", "info": "info", "ok": "ok"}


@click.command(
    epilog="""\b
Example:
  leveret doctor myapp.tasks:worker
Checks: broker version and the features it implies, consumer_timeout against
the longest job timeout, existing queues whose arguments differ from the app's
topology, the user's permissions, the management plugin. Each finding says
what to change. Exits 1 when a finding is an error. `leveret worker` logs the
same findings when it starts (and starts anyway).""",
)
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per finding and line.")
@command_setup
def doctor(app: str, as_json: bool) -> None:
    """Check the broker against APP: versions, timeouts, queue arguments, permissions."""
    # Here, not at the top: the checks bring httpx, which `leveret worker` need not load with
    # the CLI (tests/package/test_lean_imports.py).
    from leveret.consumer.ops.doctor import diagnose, to_json

    app_worker = load_app(app)
    findings = run_async(diagnose(app_worker.settings, app_worker.jobs, app_worker.topology))
    if as_json:
        if findings:
            click.echo(to_json(findings))
    else:
        width = max((len(f.check) for f in findings), default=0)
        for finding in findings:
            click.echo(
                f"{_LABELS[finding.severity]:<6} {finding.check:<{width}}  {finding.message}"
            )
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    click.echo(f"{errors} error(s), {warnings} warning(s)", err=True)
    if errors:
        raise SystemExit(1)
