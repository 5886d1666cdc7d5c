"""``ts.torch_handler.vision_handler``: an alias of ``handlers.vision_handler`` (see the package docstring)."""

import sys

from handlers import vision_handler as _marserve_module
from handlers.vision_handler import VisionHandler

sys.modules[__name__] = _marserve_module

__all__ = ["VisionHandler"]
