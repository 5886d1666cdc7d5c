"""Helpers with TorchServe's names and contracts (ts/utils/util.py, ts/handler_utils/timer.py).

Handlers written for TorchServe import these through the ``ts`` shim (handlers/compat).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar

from handlers.errors import PredictionException

__all__ = [
    "ModelLoadError",
    "PredictionException",
    "get_yaml_config",
    "label_for",
    "list_classes_from_module",
    "load_label_mapping",
    "map_class_to_label",
    "one_line",
    "timed",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class ModelLoadError(RuntimeError):
    """A model could not be loaded. The message is one line: the management API shows it as is."""


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's text squeezed onto one line, since torch's errors run to a dozen lines."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def list_classes_from_module(module: ModuleType, parent_class: type | None = None) -> list[type]:
    """Classes defined in ``module`` itself (imported ones don't count), optionally subclasses of a parent."""
    classes = [
        member
        for _, member in inspect.getmembers(module, inspect.isclass)
        if member.__module__ == module.__name__
    ]
    if parent_class is not None:
        classes = [cls for cls in classes if issubclass(cls, parent_class)]
    return classes


def load_label_mapping(mapping_file_path: str) -> dict[str, str] | None:
    """Read ``index_to_name.json`` into ``{"<index>": "<label>"}``; None (with a warning) when absent.

    A list value stands for its last element (``["n02123045", "tabby"]`` is ``tabby``), and the older
    ``{"object_type_names": [...]}`` form is accepted too. A malformed file is a load error.
    """
    if not os.path.isfile(mapping_file_path):
        logger.warning("%s is missing; outputs will use class indices instead of names", mapping_file_path)
        return None
    name = os.path.basename(mapping_file_path)
    try:
        with open(mapping_file_path, encoding="utf-8") as f:
            mapping = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{name} is not valid JSON: {one_line(exc)}") from None
    if not isinstance(mapping, dict):
        raise ModelLoadError(f'{name} must be a JSON object {{"<class index>": "<label>", ...}}')
    names = mapping.get("object_type_names")
    if isinstance(names, list):
        mapping = dict(enumerate(names))
    labels: dict[str, str] = {}
    for key, value in mapping.items():
        label = value[-1] if isinstance(value, list) and value else value
        if not isinstance(label, str):
            raise ModelLoadError(f"{name}: the label of class {key!r} must be a string or a list of strings")
        labels[str(key)] = label
    return labels


def label_for(mapping: Mapping[str, str] | None, class_index: Any) -> str:
    """A class index's label; the index itself (as text) when the mapping lacks it."""
    key = str(class_index)
    return mapping.get(key, key) if mapping is not None else key


def map_class_to_label(
    probs: list[list[Any]],
    mapping: Mapping[str, str] | None = None,
    lbl_classes: Iterable[Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Per row, ``{label: prob}`` in the given order (TorchServe's signature and output)."""
    if not isinstance(probs, list):
        raise TypeError("map_class_to_label needs probs as a list (call .tolist() first)")
    if mapping is not None and not isinstance(mapping, Mapping):
        raise TypeError("map_class_to_label needs mapping as a dict")
    if lbl_classes is None:
        lbl_classes = itertools.repeat(range(len(probs[0])) if probs else range(0), len(probs))
    return [
        {label_for(mapping, cls): prob for cls, prob in zip(classes, row)}
        for classes, row in zip(lbl_classes, probs)
    ]


def get_yaml_config(yaml_file_path: str) -> dict[str, Any]:
    """A YAML file as a dict (TorchServe's helper for model-config.yaml)."""
    import yaml

    with open(yaml_file_path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _profiling(handler: Any) -> bool:
    context = getattr(handler, "context", None)
    config = getattr(context, "model_yaml_config", None) or {}
    section = config.get("handler")
    return isinstance(section, dict) and bool(section.get("profile"))


def timed(func: F) -> F:
    """Emit ``ts_handler_<name>`` (ms) when the model YAML has ``handler: {profile: true}``."""

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _profiling(self):
            return func(self, *args, **kwargs)
        device = getattr(self, "device", None)
        # GPU work is asynchronous: without a sync the time would only cover the kernel launches.
        sync = getattr(device, "type", "cpu") == "cuda"
        if sync:
            import torch

            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = func(self, *args, **kwargs)
        if sync:
            torch.cuda.synchronize(device)
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None:
            metrics.add_time("ts_handler_" + func.__name__, (time.perf_counter() - start) * 1000)
        return result

    return wrapper  # type: ignore[return-value]


def payload(row: Any) -> Any:
    """The request's input: ``data`` (multipart) or ``body`` (raw) of a row, or the row itself (envelopes)."""
    if isinstance(row, dict):
        value = row.get("data")
        return value if value is not None else row.get("body")
    return row
