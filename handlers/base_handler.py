"""BaseHandler: loads a model at initialize and runs preprocess -> inference -> postprocess per batch.

The contract is TorchServe's (ts/torch_handler/base_handler.py); the implementation is marserve's.
Beyond TorchServe, a preprocess step can reject single requests (``reject_request``): they get
their own 4xx response and the rest of the batch goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from handlers import loading
from handlers.errors import PredictionException, RequestError
from handlers.stages import BatchState, StartedBatch
from handlers.utils import ModelLoadError, load_label_mapping, payload, timed

logger = logging.getLogger(__name__)


class BaseHandler:
    """Loads an eager, TorchScript or exported model and serves it; subclass it to customise a step."""

    #: Whether this class's steps may run as a pipeline (``overlapStages``): the next batch's
    #: preprocess on another thread while this batch's inference and postprocess run. A class
    #: declares it for itself (subclasses do not inherit it) once its preprocess touches no state
    #: that inference or postprocess change; ``self.context`` and ``reject_request`` are per batch.
    stages_thread_safe = False

    def __init__(self) -> None:
        self.model: Any = None
        self.mapping: dict[str, str] | None = None
        self.device: torch.device | None = None
        self.map_location: str | None = None
        self.initialized = False
        self.context = None
        self.manifest: dict[str, Any] | None = None
        self.model_pt_path: str | None = None
        self.model_yaml_config: dict[str, Any] = {}
        self.explain = False
        self.target = 0
        self.profiler_args: dict[str, Any] = {}

    # -- per-batch state ------------------------------------------------------------------------

    def _batch_state(self) -> BatchState:
        state: BatchState | None = self.__dict__.get("_batch_state_")
        if state is None:
            # Made on first use: TorchServe handlers may not call BaseHandler.__init__.
            state = self.__dict__.setdefault("_batch_state_", BatchState())
        return state

    @property
    def context(self) -> Any:
        """The context of the batch this thread runs; outside a batch, the one set last."""
        state = self._batch_state()
        return state.context if state.in_batch else self.__dict__.get("_context")

    @context.setter
    def context(self, value: Any) -> None:
        self.__dict__["_context"] = value
        state = self._batch_state()
        if state.in_batch:
            state.context = value

    def _enter_batch(self, context: Any, rejected: dict[int, RequestError]) -> None:
        state = self._batch_state()
        state.in_batch, state.context, state.rejected = True, context, rejected
        self.__dict__["_context"] = context

    @classmethod
    def overlaps_safely(cls) -> bool:
        """Whether this very class declares its steps safe to run as a pipeline (``stages_thread_safe``)."""
        return bool(cls.__dict__.get("stages_thread_safe", False))

    # -- loading ------------------------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        """Pick the device and load the model and ``index_to_name.json``; raises ModelLoadError."""
        self.context = context
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        properties = context.system_properties
        self.device, self.map_location = loading.select_device(properties.get("gpu_id"))
        self.manifest = context.manifest
        model_dir = properties.get("model_dir") or "."
        model_info = (self.manifest or {}).get("model") or {}
        serialized = model_info.get("serializedFile")
        self.model_pt_path = os.path.join(model_dir, serialized) if serialized else None
        self.model = self._load_model(model_dir, model_info.get("modelFile") or "")
        self.model = loading.maybe_compile(self.model, self.model_yaml_config)
        self.mapping = load_label_mapping(os.path.join(model_dir, "index_to_name.json"))
        self.initialized = True

    def _load_model(self, model_dir: str, model_file: str) -> Any:
        # Preference: eager (model file + state_dict), then whatever the serialized file holds.
        if model_file:
            model = self._load_pickled_model(model_dir, model_file, self.model_pt_path)
            model.to(self.device)
            model.eval()
            return model
        path = self.model_pt_path
        if not path:
            raise ModelLoadError("No model weights could be loaded: the manifest names neither a serializedFile nor a modelFile")
        name = os.path.basename(path)
        if not os.path.isfile(path):
            raise ModelLoadError(f"No model weights could be loaded: serialized file {name!r} is missing from the archive")
        kind = loading.serialized_kind(path)
        assert self.device is not None and self.map_location is not None
        if kind == "torchscript":
            model = self._load_torchscript_model(path)
            model.eval()
            return model
        if kind == "exported":
            return loading.load_exported(path, self.device)
        if kind == "aoti":
            return loading.load_aoti(path, self.device)
        if kind == "onnx":
            return loading.load_onnx(path, self.map_location)
        if kind == "pickle":
            raise ModelLoadError(
                f"No model weights could be loaded: {name} is a torch.save file (a state_dict?), "
                "which needs its model class: archive it with --model-file"
            )
        if kind == "so":
            raise ModelLoadError(
                f"No model weights could be loaded: {name}: AOTInductor .so files are not supported; "
                "package the model with torch._inductor.aoti_compile_and_package into a .pt2"
            )
        raise ModelLoadError(
            f"No model weights could be loaded: {name} is neither a TorchScript file, "
            "an exported program (.pt2) nor an ONNX model"
        )

    def _load_pickled_model(self, model_dir: str, model_file: str, model_pt_path: str | None) -> torch.nn.Module:
        """The eager model: the model file's one nn.Module class with the state_dict (weights_only)."""
        assert self.device is not None
        return loading.load_eager(model_dir, model_file, model_pt_path, self.device)

    def _load_torchscript_model(self, model_pt_path: str) -> Any:
        assert self.device is not None
        return loading.load_torchscript(model_pt_path, self.device)

    # -- the three steps ----------------------------------------------------------------------

    @timed
    def preprocess(self, data: Any) -> Any:
        """The batch as one tensor on the model's device.

        Rows in the worker's shape (``{"body": ...}``) contribute their payload, one request at a
        time, so a payload that is not an array of numbers fails only its own request.
        """
        if not (isinstance(data, list) and data and all(isinstance(row, dict) for row in data)):
            return torch.as_tensor(data, device=self.device)
        items: list[tuple[int, torch.Tensor]] = []
        for idx, row in enumerate(data):
            try:
                items.append((idx, self._row_tensor(payload(row))))
            except RequestError as exc:
                self.reject_request(idx, exc.message, exc.code)
        if not items:
            return None
        # Requests of another shape than most of the batch cannot be stacked with it: they fail alone.
        shape = Counter(tensor.shape for _, tensor in items).most_common(1)[0][0]
        kept = []
        for idx, tensor in items:
            if tensor.shape == shape:
                kept.append(tensor)
            else:
                self.reject_request(idx, f"the input has shape {list(tensor.shape)}; this batch has {list(shape)}")
        return torch.stack(kept).to(self.device)

    def _row_tensor(self, value: Any) -> torch.Tensor:
        if isinstance(value, (bytes, bytearray, str)) or value is None:
            raise RequestError("the input must be a JSON array of numbers (send it as application/json)")
        try:
            return torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise RequestError(f"the input is not an array of numbers: {exc}") from None

    @timed
    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the model under ``torch.inference_mode``, with tensor input moved to the model's device."""
        with torch.inference_mode():
            if isinstance(data, torch.Tensor):
                data = data.to(self.device)
            return self.model(data, *args, **kwargs)

    @timed
    def postprocess(self, data: Any) -> Any:
        """One output per request: the rows of the model's output tensor, as lists."""
        return data.tolist()

    # -- the entry point ----------------------------------------------------------------------

    def handle(self, data: list[Any], context: Any) -> Any:
        """preprocess -> inference -> postprocess (or describe/explain, by header); one output per request."""
        start = time.perf_counter()
        self._enter_batch(context, {})
        if os.environ.get("ENABLE_TORCH_PROFILER"):
            output, _ = self._infer_with_profiler(data)
        elif self._is_describe():
            output = [self.describe_handle()]
        else:
            output = self._run(data, _no_record)
        return self._finish_output(output, data, start)

    def start_batch(self, data: list[Any], context: Any) -> StartedBatch:
        """``handle``'s first step, preprocess, for a worker that overlaps stages: it runs on a
        thread of its own while the previous batch's inference runs. ``finish_batch`` does the rest."""
        rejected: dict[int, RequestError] = {}
        self._enter_batch(context, rejected)
        if os.environ.get("ENABLE_TORCH_PROFILER") or self._is_describe():
            return StartedBatch(data, context, whole=True)
        start = time.perf_counter()
        preprocessed = self.preprocess(data)
        return StartedBatch(data, context, preprocessed, rejected, preprocess_ms=(time.perf_counter() - start) * 1000)

    def finish_batch(self, started: StartedBatch) -> Any:
        """``handle``'s other steps, on the worker's inference thread."""
        if started.whole:
            return self.handle(started.data, started.context)
        start = time.perf_counter() - started.preprocess_ms / 1000  # HandlerTime counts both threads' work
        self._enter_batch(started.context, started.rejected)
        output = self._after_preprocess(started.data, started.preprocessed, _no_record)
        return self._finish_output(output, started.data, start)

    def _finish_output(self, output: Any, data: list[Any], start: float) -> Any:
        if self._batch_state().rejected:
            output = self._merge_rejected(output, len(data))
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return output

    def _run(self, data: list[Any], record: Callable[[str], contextlib.AbstractContextManager[Any]]) -> Any:
        with record("preprocess"):
            data_preprocess = self.preprocess(data)
        return self._after_preprocess(data, data_preprocess, record)

    def _after_preprocess(
        self, data: list[Any], data_preprocess: Any, record: Callable[[str], contextlib.AbstractContextManager[Any]]
    ) -> Any:
        rejected = self._batch_state().rejected
        if rejected and len(rejected) >= len(data):
            return []  # every request was rejected: nothing to run the model on
        if self._is_explain():
            with record("explain"):
                return self.explain_handle(data_preprocess, data)
        with record("inference"):
            output = self.inference(data_preprocess)
        with record("postprocess"):
            return self.postprocess(output)

    def reject_request(self, idx: int, message: str, code: int = 400) -> None:
        """Fail request ``idx`` of the batch alone (marserve): call from preprocess and leave it out of
        the tensor; handle() answers it with ``code`` and ``message`` and the others as usual."""
        self._batch_state().rejected[idx] = RequestError(message, code)

    def _merge_rejected(self, output: Any, size: int) -> list[Any]:
        rejected = self._batch_state().rejected
        expected = size - len(rejected)
        if not isinstance(output, list) or len(output) != expected:
            got = len(output) if isinstance(output, list) else type(output).__name__
            raise PredictionException(
                f"handler returned {got} outputs for the {expected} requests left after rejecting {len(rejected)}", 500
            )
        remaining = iter(output)
        merged = []
        for idx in range(size):
            error = rejected.get(idx)
            if error is None:
                merged.append(next(remaining))
                continue
            self.context.set_response_status(error.code, error.message, idx)
            merged.append(error.body())
        return merged

    def _infer_with_profiler(self, data: list[Any]) -> tuple[Any, Any]:
        """handle()'s steps under torch.profiler (env ENABLE_TORCH_PROFILER), traces in /tmp/pytorch_profiler."""
        from torch.profiler import ProfilerActivity, profile, record_function

        if not self.profiler_args:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self.profiler_args = {"activities": activities, "record_shapes": True}
        if "on_trace_ready" not in self.profiler_args:
            model_name = ((self.manifest or self.context.manifest or {}).get("model") or {}).get("modelName", "")
            path = os.path.join("/tmp/pytorch_profiler", model_name)
            self.profiler_args["on_trace_ready"] = torch.profiler.tensorboard_trace_handler(path)
            logger.info("Saving chrome trace to : %s", path)
        with profile(**self.profiler_args) as prof:
            output = self._run(data, record_function)
        logger.info(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10))
        return output, prof

    # -- explain and describe -----------------------------------------------------------------

    def explain_handle(self, data_preprocess: Any, raw_data: list[Any]) -> Any:
        """Explanations for the batch, from request 0's input and ``target`` (default 0)."""
        row = raw_data[0] if raw_data else None
        inputs = payload(row)
        target = (row.get("target") if isinstance(row, dict) else None) or 0
        return self.get_insights(data_preprocess, inputs, target)

    def get_insights(self, tensor_data: Any, raw_data: Any, target: Any = 0) -> Any:
        """Attributions for ``tensor_data``; handlers that support explanations override this."""
        raise PredictionException(f"{type(self).__name__} does not support explanations", 501)

    def describe_handle(self) -> Any:
        """Custom metadata for the describe API (``customizedMetadata``); None by default."""
        return None

    def _header_is_true(self, name: str) -> bool:
        context = self.context
        if context is None or not getattr(context, "request_processor", None):
            return False
        return bool(context.get_request_header(0, name) == "True")

    def _is_explain(self) -> bool:
        if self._header_is_true("explain"):
            self.explain = True
            return True
        return False

    def _is_describe(self) -> bool:
        return self._header_is_true("describe")

    def get_device(self) -> torch.device | None:
        return self.device


@contextlib.contextmanager
def _no_record(_name: str) -> Iterator[None]:
    yield
