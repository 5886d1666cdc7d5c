"""``ts.torch_handler.vision_handler``: marserve's handlers.vision_handler (see the package docstring for the alias)."""

import sys

from handlers import vision_handler as _marserve_module
from handlers.vision_handler import VisionHandler

sys.modules[__name__] = _marserve_module

__all__ = ["VisionHandler"]
