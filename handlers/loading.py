"""Choosing a device and loading a model's files, for BaseHandler.initialize.

Every failure is a ModelLoadError with one line that names the file and the way out, since the
management API shows it verbatim to whoever registered the model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn

from handlers.utils import ModelLoadError, list_classes_from_module, one_line

logger = logging.getLogger(__name__)


def select_device(gpu_id: int | None) -> tuple[torch.device, str]:
    """``(device, map_location)`` for the worker's ``gpu_id``: the GPU it was given, else the CPU."""
    if gpu_id is not None:
        if torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id}"), "cuda"
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available():
            return torch.device(f"xpu:{gpu_id}"), "xpu"
        if torch.backends.mps.is_available():
            return torch.device("mps"), "mps"
    return torch.device("cpu"), "cpu"


def serialized_kind(path: str) -> str:
    """What a serialized file holds, judged by its contents rather than its extension.

    One of ``torchscript``, ``exported`` (torch.export), ``aoti`` (AOTInductor package),
    ``pickle`` (a torch.save file: a state_dict or a whole pickled model), ``onnx``, ``so`` or
    ``unknown``.
    """
    if path.endswith(".onnx"):
        return "onnx"
    if path.endswith(".so"):
        return "so"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "unknown"
    # Entries sit under one top folder whose name is arbitrary (the file's stem when saved).
    inner = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in inner:
        if any(name.startswith("models/") and name.endswith(".json") for name in inner):
            return "exported"
        if any(name.startswith("data/aotinductor/") for name in inner):
            return "aoti"
        return "unknown"
    if "constants.pkl" in inner or any(name.startswith("code/") for name in inner):
        return "torchscript"
    if "data.pkl" in inner:
        return "pickle"
    return "unknown"


def import_model_file(model_dir: str, model_file: str) -> ModuleType:
    """Import the archive's model file under its own name, as TorchServe does (``model.py`` is ``model``).

    The file is loaded from its path, not found on sys.path, so a same-named module imported
    earlier from elsewhere cannot stand in for it.
    """
    path = os.path.join(model_dir, model_file)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file {model_file!r} named in the manifest is missing from the archive")
    name = os.path.basename(model_file).split(".")[0]
    existing = sys.modules.get(name)
    existing_file = getattr(existing, "__file__", None)
    if existing_file and os.path.realpath(existing_file) == os.path.realpath(path):
        return existing  # type: ignore[return-value]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"model file {model_file!r} cannot be imported (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    # Registered before running so that the handler's "from model import Net" and pickles see it.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        reason = f"{type(exc).__name__}: {one_line(exc)}"
        raise ModelLoadError(f"importing model file {model_file!r} failed: {reason}") from exc
    return module


def _is_legacy_pickle(path: str) -> bool:
    # torch.save before 1.6 (and _use_new_zipfile_serialization=False) writes a bare pickle.
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def load_state_dict(pt_path: str, device: torch.device) -> Mapping[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, no code from the file."""
    name = os.path.basename(pt_path)
    if not os.path.isfile(pt_path):
        raise ModelLoadError(f"serialized file {name!r} named in the manifest is missing from the archive")
    kind = serialized_kind(pt_path)
    if kind in ("torchscript", "exported", "aoti"):
        what = "a TorchScript file" if kind == "torchscript" else "an exported program"
        raise ModelLoadError(f"{name} is {what}, not a state_dict: archive it without --model-file")
    if kind != "pickle" and not _is_legacy_pickle(pt_path):
        raise ModelLoadError(f"{name} is not a torch.save file, so it holds no state_dict for the model file's class")
    try:
        state = torch.load(pt_path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        culprit = f"it pickles {found.group(1)}" if found else "it holds more than tensors and plain containers"
        raise ModelLoadError(
            f"{name} is not a plain state_dict: {culprit}, which torch.load(weights_only=True) refuses; "
            "save model.state_dict() instead of the model"
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"cannot read {name} as a state_dict: {one_line(exc)}") from None
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{name} holds a {type(state).__name__}, not a state_dict")
    return state


def load_eager(model_dir: str, model_file: str, pt_path: str | None, device: torch.device) -> nn.Module:
    """The model file's one ``nn.Module`` class, built with no arguments, with the state_dict loaded."""
    module = import_model_file(model_dir, model_file)
    classes = list_classes_from_module(module, nn.Module)
    if len(classes) != 1:
        found = ", ".join(cls.__name__ for cls in classes) or "none"
        raise ModelLoadError(
            f"model file {model_file!r} must define exactly one nn.Module class, found {len(classes)}: {found}"
        )
    model_class = classes[0]
    try:
        model: torch.nn.Module = model_class()
    except Exception as exc:
        raise ModelLoadError(f"{model_class.__name__}() failed: {type(exc).__name__}: {one_line(exc)}") from exc
    if pt_path:
        state = load_state_dict(pt_path, device)
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise ModelLoadError(
                f"{os.path.basename(pt_path)} does not fit {model_class.__name__}: {one_line(exc)}"
            ) from None
    return model


def load_torchscript(pt_path: str, device: torch.device) -> Any:
    with warnings.catch_warnings():
        # torch >= 2.9 marks TorchScript deprecated; archives made with it still have to load.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return torch.jit.load(pt_path, map_location=device)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ModelLoadError(f"cannot load TorchScript file {os.path.basename(pt_path)}: {one_line(exc)}") from None


def load_exported(pt_path: str, device: torch.device) -> Any:
    """An exported program's module, moved to ``device`` (programs are saved on one device)."""
    try:
        program = torch.export.load(pt_path)
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return program.module()
    except Exception as exc:
        raise ModelLoadError(f"cannot load exported program {os.path.basename(pt_path)}: {one_line(exc)}") from None


def load_aoti(pt_path: str, device: torch.device) -> Any:
    index = device.index if device.type == "cuda" and device.index is not None else -1
    try:
        return torch._inductor.aoti_load_package(pt_path, device_index=index)
    except Exception as exc:
        raise ModelLoadError(f"cannot load AOTInductor package {os.path.basename(pt_path)}: {one_line(exc)}") from None


def load_onnx(pt_path: str, map_location: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError(
            f"{os.path.basename(pt_path)} is an ONNX model, which needs onnxruntime (pip install onnxruntime)"
        ) from None
    providers = ["CPUExecutionProvider"]
    if map_location == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(pt_path, providers=providers)
    except Exception as exc:
        raise ModelLoadError(f"cannot load ONNX model {os.path.basename(pt_path)}: {one_line(exc)}") from None


def compile_options(model_yaml_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments from the model YAML's ``pt2`` section, or None for no compile.

    Accepts TorchServe's forms: ``pt2: {compile: {enable: true, backend: ..., mode: ...}}`` and the
    older ``pt2: "<backend>"`` or ``pt2: {backend: ..., ...}``.
    """
    pt2 = model_yaml_config.get("pt2")
    if pt2 is None:
        return None
    if isinstance(pt2, str):
        return {"backend": pt2}
    if not isinstance(pt2, Mapping):
        raise ModelLoadError("model config: pt2 must be a string or a mapping")
    if "export" in pt2:
        return None
    if "compile" in pt2:
        options = dict(pt2["compile"] or {})
        return options if options.pop("enable", False) else None
    return dict(pt2)


def maybe_compile(model: Any, model_yaml_config: Mapping[str, Any]) -> Any:
    """``torch.compile`` the model when the YAML asks for it; a failure only costs speed, so it only warns."""
    options = compile_options(model_yaml_config)
    if options is None:
        return model
    try:
        compiled = torch.compile(model, **options)
    except Exception as exc:
        logger.warning("torch.compile(%s) failed, serving the model uncompiled: %s", options, one_line(exc))
        return model
    logger.info("compiled the model with torch.compile(%s)", options)
    return compiled
