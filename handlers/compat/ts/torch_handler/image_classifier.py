"""``ts.torch_handler.image_classifier``: an alias of ``handlers.image_classifier`` (see the package docstring)."""

import sys

from handlers import image_classifier as _marserve_module
from handlers.image_classifier import ImageClassifier

sys.modules[__name__] = _marserve_module

__all__ = ["ImageClassifier"]
