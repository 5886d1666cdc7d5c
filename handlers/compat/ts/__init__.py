"""TorchServe's import names for handlers written for it, backed by marserve (no TorchServe code).

Only on a worker's sys.path (handlers.COMPAT_PATH), never installed as a top-level package.
"""

__version__ = "0.12.0"
