"""Handler-side API: the Context a handler receives, its errors, BaseHandler and the built-ins."""

import os

#: Directory holding the ``ts`` compatibility package (``import ts.torch_handler...`` for handlers
#: written for TorchServe). Workers put it on sys.path; it is deliberately not an installed
#: top-level package, so a real TorchServe installed beside marserve is never shadowed.
COMPAT_PATH: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat")
