"""The HTTP service API (``leveret api APP``): publish, read and cancel jobs over HTTP.

Install with the ``api`` extra (FastAPI and uvicorn); nothing else in Leveret imports this
package, so a worker never pays for it.
"""

from .app import ApiState, create_app
from .settings import ApiSettings

__all__ = ["ApiSettings", "ApiState", "create_app"]
