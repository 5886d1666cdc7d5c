"""``ts.torch_handler.base_handler``: an alias of ``handlers.base_handler`` (see the package docstring)."""

import sys

from handlers import base_handler as _marserve_module
from handlers.base_handler import BaseHandler

sys.modules[__name__] = _marserve_module

__all__ = ["BaseHandler"]
