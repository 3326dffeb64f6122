"""What every command shares: loading ``APP``, settings, and errors as one clear line."""

from __future__ import annotations

import asyncio
import functools
import importlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click
from pydantic import ValidationError

from leveret.consumer.errors import ConfigError
from leveret.consumer.logging import configure_logging
from leveret.consumer.settings import WorkerSettings
from leveret.consumer.worker import Worker
from leveret.producers import LOOP_CHOICES
from leveret.producers.broker import mask_secrets
from leveret.topology.errors import LeveretError

T = TypeVar("T")


# ``--loop`` of the commands that run an event loop (worker, api), declared once.
loop_option = click.option(
    "--loop",
    type=click.Choice(LOOP_CHOICES),
    default="auto",
    show_default=True,
    help="Event loop: auto is uvloop when it is installed, else asyncio.",
)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, no traceback, non-zero exit."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _scrub(text: str) -> str:
    """Belt and braces: never print the configured URL's credentials, whatever produced the
    text (only its ``user:password@`` is masked, so the rest of a message stays readable)."""
    url = os.environ.get("LEVERET_AMQP_URL")
    return mask_secrets(text, url) if url else text


def _settings_error(exc: ValidationError) -> NoReturn:
    first = exc.errors()[0]
    name = "LEVERET_" + str(first["loc"][0]).upper() if first.get("loc") else "LEVERET_*"
    fail(f"setting {name} is invalid: {first['msg']}")


def load_settings(**overrides: Any) -> WorkerSettings:
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        _settings_error(exc)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=overrides) if overrides else settings


def load_app(spec: str) -> Worker:
    """Import ``module:attribute`` from the current directory and check it is a Worker."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        fail(f"APP must look like module:attribute (e.g. myapp.tasks:worker), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            fail(
                f"cannot import module {module_name!r} from {os.getcwd()}: run the command "
                f"from the directory that contains it, or check the spelling"
            )
        fail(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
    except ConfigError as exc:
        fail(f"{module_name!r} registers a job or schedule wrongly: {exc}")
    except ValidationError as exc:
        if exc.title == WorkerSettings.__name__:
            _settings_error(exc)
        fail(f"importing {module_name!r} failed: {_scrub(str(exc).splitlines()[0])}")
    except Exception as exc:
        fail(f"importing {module_name!r} failed: {type(exc).__name__}: {_scrub(str(exc))}")
    try:
        app = getattr(module, attr)
    except AttributeError:
        fail(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(app, Worker):
        fail(f"{spec} is a {type(app).__name__}, not a consumer.Worker")
    try:  # what needs the whole app (a schedule naming an unregistered job): now it is loaded
        app.check()
    except ConfigError as exc:
        fail(f"{spec} is not usable: {exc}")
    return app


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning every error a user can cause into one line."""
    try:
        return asyncio.run(coro)
    except LeveretError as exc:  # every error a user can cause is one, builtins are bugs
        fail(_scrub(str(exc)))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def command_setup(fn: Callable[..., T]) -> Callable[..., T]:
    """Configure logging before a command body runs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        level = os.environ.get("LEVERET_LOG_LEVEL", "info").lower()
        configure_logging(
            level if level in ("debug", "info", "warning", "error") else "info",
            secret_url=os.environ.get("LEVERET_AMQP_URL"),
        )
        return fn(*args, **kwargs)

    return wrapper
