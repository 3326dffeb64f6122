"""The dedicated-node fixtures of the fault tests, for the delayed-job broker restart."""

from tests.faults.conftest import certs, node

__all__ = ["certs", "node"]
