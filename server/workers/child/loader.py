"""Resolving a manifest's handler string to an entry point, TorchServe's way (ts/model_loader.py)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

from handlers.utils import list_classes_from_module

Entry = Callable[[Any, Any], Any]


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Fall back to a built-in only when the module itself is missing: an ImportError
        # raised inside a handler that does exist must surface, not be masked by the fallback.
        if exc.name != module_name:
            raise
    try:
        return importlib.import_module(f"ts.torch_handler.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"ts.torch_handler.{module_name}", "ts", "ts.torch_handler"):
            raise
    return importlib.import_module(f"handlers.{module_name}")


def handler_module(handler: str) -> tuple[str, str]:
    """``(module, function)`` for ``module[.py][:function]``: only the last ``/`` part of the module
    counts (TorchServe's rule), and it is imported from ``sys.path``, the model's directory first.

    The frontend confines the files this names to the archive with ``archiver.handler_module``,
    which must agree with this one (tests/server/test_manifest_paths.py checks that they do); it
    is not imported here because the worker does not load the archiver (or pydantic).
    """
    module_part, _, function = handler.partition(":")
    module_name = module_part.rsplit("/", 1)[-1]
    return module_name.removesuffix(".py"), function


def load_handler(handler: str) -> tuple[Callable[[Any], Any], Entry]:
    """Return ``(initialize, entry)`` for ``module[.py][:function]`` or a built-in name."""
    module_name, function = handler_module(handler)
    module = _import(module_name)
    function = function or "handle"
    entry = getattr(module, function, None)
    if entry is not None and callable(entry) and not inspect.isclass(entry):
        # A function entry point is initialised by calling it with no data.
        return (lambda context: entry(None, context)), entry
    classes = list_classes_from_module(module)
    if len(classes) != 1:
        raise ValueError(
            f"Expected only one class in custom service code or a function entry point {classes}"
        )
    service = classes[0]()
    if not hasattr(service, "handle"):
        raise ValueError(f"Expect handle method in class {classes[0]}")
    return service.initialize, service.handle
