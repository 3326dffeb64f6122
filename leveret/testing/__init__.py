"""``leveret.testing``: the test kit for users' own tests (see ``leveret.consumer.testing``).

A real package rather than a fourth symlink: the kit lives with the consumer it drives, and a
second path to the same files would import them twice as two modules (two ``TestBroker``
classes). This re-exports the public names; the plugin is ``leveret.testing.pytest_plugin``.
"""

from leveret.consumer.testing import (
    DeadJob,
    Enqueued,
    Retry,
    SucceededJob,
    TestBroker,
    run_job,
)

__all__ = ["DeadJob", "Enqueued", "Retry", "SucceededJob", "TestBroker", "run_job"]
