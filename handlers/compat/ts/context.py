"""``ts.context``: marserve's Context."""

from handlers.context import Context, RequestProcessor

__all__ = ["Context", "RequestProcessor"]
