"""A model's Open Inference Protocol signature: the ``oip`` key of its model YAML.

Read by the frontend (model metadata, server/apis/oip.py) and by the worker (tensor decoding,
server/workers/child/oip.py), with the same rules and messages; pure Python, so that the frontend
imports neither numpy nor torch for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The protocol's tensor datatypes.
DATATYPE_NAMES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BF16", "BYTES",
)  # fmt: skip
#: The platform metadata names when the signature names none.
PLATFORM = "pytorch_torchserve"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class Signature:
    """The tensors a model declares under ``oip`` in its model YAML, and its platform."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    platform: str = PLATFORM

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None


def read_signature(model_yaml_config: Mapping[str, Any] | None) -> Signature | None:
    """The ``oip`` key of a model YAML (``{inputs: [{name, datatype, shape}], outputs: [...],
    platform}``); None without one. ValueError, naming the problem, for one that is not that."""
    spec = (model_yaml_config or {}).get("oip")
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ValueError("its model config's oip must be a mapping with inputs and outputs")
    platform = spec.get("platform", PLATFORM)
    if not isinstance(platform, str) or not platform:
        raise ValueError("oip.platform must be a non-empty string")
    return Signature(_specs(spec, "inputs"), _specs(spec, "outputs"), platform)


def _specs(spec: Mapping[str, Any], key: str) -> tuple[TensorSpec, ...]:
    entries = spec.get(key) or []
    if not isinstance(entries, list):
        raise ValueError(f"oip.{key} must be a list of tensors")
    specs = []
    for i, entry in enumerate(entries):
        where = f"oip.{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a mapping with name, datatype and shape")
        name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape", [])
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name must be a non-empty string")
        if datatype not in DATATYPE_NAMES:
            raise ValueError(f"{where}.datatype must be one of {', '.join(DATATYPE_NAMES)}, not {datatype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= -1 for d in shape):
            raise ValueError(f"{where}.shape must be a list of integers, -1 for a variable dimension")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    return tuple(specs)
