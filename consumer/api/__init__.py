"""The HTTP service API (``leveret api APP``): publish, read and cancel jobs over HTTP.

Install with the ``api`` extra (FastAPI and uvicorn); nothing else in Leveret imports this
package, so a worker never pays for it.
"""

from leveret.consumer.api.app import ApiState, create_app
from leveret.consumer.api.settings import ApiSettings

__all__ = ["ApiSettings", "ApiState", "create_app"]
