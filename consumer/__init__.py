"""The worker runtime: handlers, the consume loop, its CLI, metrics and health endpoints."""

from leveret.consumer.context import JobContext
from leveret.consumer.errors import ConfigError, Reject
from leveret.consumer.registry import JobSpec
from leveret.consumer.settings import WorkerSettings
from leveret.consumer.worker import Worker

__all__ = ["ConfigError", "JobContext", "JobSpec", "Reject", "Worker", "WorkerSettings"]
