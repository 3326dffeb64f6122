"""The worker runtime: handlers, the consume loop, its CLI, metrics and health endpoints."""

from .context import JobContext
from .errors import ConfigError, Reject
from .registry import JobSpec
from .settings import WorkerSettings
from .worker import Worker

__all__ = ["ConfigError", "JobContext", "JobSpec", "Reject", "Worker", "WorkerSettings"]
