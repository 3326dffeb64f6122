"""The ``pytest11`` entry point of Leveret: ``leveret = "leveret.testing.pytest_plugin"``."""

from leveret.consumer.testing.pytest_plugin import leveret_amqp_url

__all__ = ["leveret_amqp_url"]
