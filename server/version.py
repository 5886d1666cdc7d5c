"""Which versions marserve reports: its own, and the TorchServe API it is compatible with."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: The TorchServe release whose APIs, archives and handler contract marserve follows. Handlers
#: see it as ``context.system_properties["server_version"]``, as they would under TorchServe.
TORCHSERVE_VERSION = "0.12.0"


def marserve_version() -> str:
    try:
        return version("marserve")
    except PackageNotFoundError:
        return "unknown"
