"""``ts.handler_utils.utils``: what TorchServe handlers import from it."""

from __future__ import annotations

import importlib
from typing import Any


def send_intermediate_predict_response(
    ret: list[Any], req_id_map: dict[int, str], message: str, code: int, context: Any
) -> None:
    """Send ``ret[idx]`` now as one piece of each listed request's streamed response, as
    TorchServe does (the response carries ``ts_stream_next: true``); the handler's final output
    for the request is its last piece. ``message`` and ``code`` are TorchServe's batch status,
    unused for a piece."""
    for idx in req_id_map:
        context.set_response_header(idx, "ts_stream_next", "true")
        context.send_piece(idx, ret[idx])


def import_class(class_name: str, module_prefix: str | None = None) -> Any:
    """The class ``module.Class`` (or ``Class`` in ``module_prefix``), as TorchServe finds it."""
    module_name, _, name = class_name.rpartition(".")
    if module_prefix:
        module = importlib.import_module(f"{module_prefix}.{module_name}" if module_name else module_prefix)
    elif module_name:
        module = importlib.import_module(module_name)
    else:
        raise ImportError("module name is not defined.")
    found = getattr(module, name, None)
    if found is None:
        raise ImportError(f"class:{name} not found in module:{module_name}.")
    return found
