"""BaseHandler: loading eager, TorchScript and exported models, load errors, and handle()'s contract."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from handlers import loading
from handlers.base_handler import BaseHandler
from handlers.utils import ModelLoadError, load_label_mapping, map_class_to_label
from tests.handlers.conftest import MetricsRecorder, make_context, run_batch, write_model_file

LINEAR = """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.saw_inference_mode = None

        def forward(self, x):
            self.saw_inference_mode = torch.is_inference_mode_enabled()
            return self.fc(x)
"""


def _weights() -> dict[str, torch.Tensor]:
    weight = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    return {"fc.weight": weight, "fc.bias": torch.tensor([0.5, -1.0])}


def _expected(rows: list[list[float]]) -> list[list[float]]:
    w = _weights()
    return (torch.tensor(rows) @ w["fc.weight"].T + w["fc.bias"]).tolist()


def _close(actual: object, expected: object) -> None:
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected))


def _reference_linear() -> nn.Linear:
    layer = nn.Linear(4, 2)
    layer.load_state_dict({"weight": _weights()["fc.weight"], "bias": _weights()["fc.bias"]})
    return layer.eval()


def _load(model_dir: Path, **model: str) -> BaseHandler:
    handler = BaseHandler()
    handler.initialize(make_context(model_dir, model))
    return handler


ROWS = [[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.5, 2.0]]


def test_eager_model_file_plus_state_dict(model_dir: Path) -> None:
    torch.save(_weights(), model_dir / "weights.pt")
    handler = _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="weights.pt")
    assert handler.initialized and handler.device == torch.device("cpu")
    assert not handler.model.training
    out = run_batch(handler, handler.context, [{"body": row} for row in ROWS])
    _close(out, _expected(ROWS))
    assert handler.model.saw_inference_mode is True  # inference runs under torch.inference_mode


def test_state_dict_is_loaded_with_weights_only(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save(_weights(), model_dir / "weights.pt")
    _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="weights.pt")
    assert seen.get("weights_only") is True


def test_torchscript_scripted_and_traced(model_dir: Path) -> None:
    model = _reference_linear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(model_dir / "scripted.pt"))
        torch.jit.trace(model, torch.zeros(1, 4)).save(str(model_dir / "traced.pt"))
    for name in ("scripted.pt", "traced.pt"):
        handler = _load(model_dir, serializedFile=name)
        _close(run_batch(handler, handler.context, [{"body": row} for row in ROWS]), _expected(ROWS))


def test_exported_program(model_dir: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(_reference_linear(), (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(model_dir / "model.pt2"))
    handler = _load(model_dir, serializedFile="model.pt2")
    rows = ROWS + [[9.0, 9.0, 9.0, 9.0]]
    _close(run_batch(handler, handler.context, [{"body": row} for row in rows]), _expected(rows))


@pytest.mark.parametrize(
    ("files", "model", "message"),
    [
        ({}, {}, "No model weights could be loaded: the manifest names neither"),
        ({}, {"serializedFile": "gone.pt"}, "No model weights could be loaded: serialized file 'gone.pt' is missing"),
        ({"w.pt": "state_dict"}, {"serializedFile": "w.pt"}, "is a torch.save file (a state_dict?), which needs"),
        ({"junk.pt": b"not a model"}, {"serializedFile": "junk.pt"}, "junk.pt is neither a TorchScript file"),
        ({}, {"modelFile": "missing.py", "serializedFile": "w.pt"}, "model file 'missing.py' named in the manifest"),
    ],
)
def test_load_failures_are_one_clear_line(
    model_dir: Path, files: dict[str, object], model: dict[str, str], message: str
) -> None:
    for name, content in files.items():
        if content == "state_dict":
            torch.save(_weights(), model_dir / name)
        else:
            (model_dir / name).write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError) as info:
        _load(model_dir, **model)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_model_file_needs_exactly_one_module(model_dir: Path) -> None:
    source = LINEAR + "\n\n    class Other(nn.Module):\n        pass\n"
    torch.save(_weights(), model_dir / "weights.pt")
    with pytest.raises(ModelLoadError, match=r"exactly one nn.Module class, found 2: Net, Other"):
        _load(model_dir, modelFile=write_model_file(model_dir, source), serializedFile="weights.pt")


def test_helper_classes_beside_the_module_are_fine(model_dir: Path) -> None:
    source = LINEAR + "\n\n    class Config:\n        width = 4\n"
    torch.save(_weights(), model_dir / "weights.pt")
    handler = _load(model_dir, modelFile=write_model_file(model_dir, source), serializedFile="weights.pt")
    assert type(handler.model).__name__ == "Net"


def test_pickled_whole_model_is_refused_by_weights_only(model_dir: Path) -> None:
    model_file = write_model_file(model_dir, LINEAR)
    torch.save(_reference_linear(), model_dir / "whole.pt")
    with pytest.raises(ModelLoadError) as info:
        _load(model_dir, modelFile=model_file, serializedFile="whole.pt")
    text = str(info.value)
    assert "whole.pt is not a plain state_dict: it pickles torch.nn.modules.linear.Linear" in text
    assert "weights_only=True" in text and "\n" not in text


def test_weights_that_are_not_a_torch_save_file(model_dir: Path) -> None:
    (model_dir / "labels.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="labels.json is not a torch.save file"):
        _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="labels.json")


def test_torchscript_file_with_model_file_says_what_to_do(model_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_reference_linear()).save(str(model_dir / "scripted.pt"))
    with pytest.raises(ModelLoadError, match="TorchScript file, not a state_dict: archive it without --model-file"):
        _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="scripted.pt")


def test_state_dict_that_does_not_fit(model_dir: Path) -> None:
    torch.save({"fc.weight": torch.zeros(3, 4)}, model_dir / "weights.pt")
    with pytest.raises(ModelLoadError, match="weights.pt does not fit Net: .*Missing key") as info:
        _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="weights.pt")
    assert "\n" not in str(info.value)


def test_model_file_that_fails_to_import(model_dir: Path) -> None:
    torch.save(_weights(), model_dir / "weights.pt")
    with pytest.raises(ModelLoadError, match="importing model file 'model.py' failed: ZeroDivisionError"):
        _load(model_dir, modelFile=write_model_file(model_dir, "x = 1 / 0\n"), serializedFile="weights.pt")


def test_index_to_name(model_dir: Path) -> None:
    (model_dir / "index_to_name.json").write_text(json.dumps({"0": ["n01", "tench"], "1": "goldfish"}))
    assert load_label_mapping(str(model_dir / "index_to_name.json")) == {"0": "tench", "1": "goldfish"}
    (model_dir / "index_to_name.json").write_text(json.dumps({"object_type_names": ["bg", "cat"]}))
    assert load_label_mapping(str(model_dir / "index_to_name.json")) == {"0": "bg", "1": "cat"}
    assert load_label_mapping(str(model_dir / "absent.json")) is None
    (model_dir / "index_to_name.json").write_text(json.dumps({"0": 7}))
    with pytest.raises(ModelLoadError, match="label of class '0' must be a string"):
        load_label_mapping(str(model_dir / "index_to_name.json"))
    (model_dir / "index_to_name.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="index_to_name.json is not valid JSON"):
        load_label_mapping(str(model_dir / "index_to_name.json"))


def test_handler_loads_mapping(model_dir: Path) -> None:
    torch.save(_weights(), model_dir / "weights.pt")
    (model_dir / "index_to_name.json").write_text(json.dumps({"0": "a", "1": ["x", "b"]}))
    handler = _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="weights.pt")
    assert handler.mapping == {"0": "a", "1": "b"}


def test_map_class_to_label() -> None:
    assert map_class_to_label([[0.7, 0.3]], {"1": "b", "0": "a"}, [[1, 0]]) == [{"b": 0.7, "a": 0.3}]
    assert map_class_to_label([[0.1, 0.9]]) == [{"0": 0.1, "1": 0.9}]
    assert map_class_to_label([[0.5]], {"0": "a"}, [[3]]) == [{"3": 0.5}]  # unmapped: the index


def test_bad_rows_fail_alone(model_dir: Path) -> None:
    torch.save(_weights(), model_dir / "weights.pt")
    handler = _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="weights.pt")
    data = [{"body": ROWS[0]}, {"body": bytearray(b"\x00\x01")}, {"body": [1.0, 2.0]}, {"data": ROWS[1]}]
    out = run_batch(handler, handler.context, data)
    ctx = handler.context
    assert [ctx.get_response_status(i)[0] for i in range(4)] == [200, 400, 400, 200]
    _close([out[0], out[3]], _expected(ROWS))
    assert out[1]["code"] == 400 and "JSON array of numbers" in out[1]["message"]
    assert "shape [2]" in out[2]["message"]


def test_raw_tensor_input_as_in_torchserve(model_dir: Path) -> None:
    torch.save(_weights(), model_dir / "weights.pt")
    handler = _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="weights.pt")
    # An envelope hands the handler bare payloads; the default preprocess is torch.as_tensor.
    _close(run_batch(handler, handler.context, ROWS), _expected(ROWS))


def test_describe_and_explain_headers(model_dir: Path) -> None:
    torch.save(_weights(), model_dir / "weights.pt")
    handler = _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="weights.pt")
    handler.describe_handle = lambda: {"about": "linear"}  # type: ignore[method-assign]
    assert run_batch(handler, handler.context, [{"body": ROWS[0]}], {"describe": "True"}) == [{"about": "linear"}]
    handler.get_insights = lambda tensor, raw, target: [["insight", raw, target]]  # type: ignore[method-assign]
    data = [{"body": ROWS[0], "target": 1}]
    assert run_batch(handler, handler.context, data, {"explain": "True"}) == [["insight", ROWS[0], 1]]
    assert handler.explain is True


def test_explain_without_support_is_501(model_dir: Path) -> None:
    from handlers.errors import PredictionException

    torch.save(_weights(), model_dir / "weights.pt")
    handler = _load(model_dir, modelFile=write_model_file(model_dir, LINEAR), serializedFile="weights.pt")
    with pytest.raises(PredictionException) as info:
        run_batch(handler, handler.context, [{"body": ROWS[0]}], {"explain": "True"})
    assert info.value.error_code == 501


def test_metrics(model_dir: Path) -> None:
    torch.save(_weights(), model_dir / "weights.pt")
    model_file = write_model_file(model_dir, LINEAR)
    handler = _load(model_dir, modelFile=model_file, serializedFile="weights.pt")
    assert handler.context.metrics is None
    run_batch(handler, handler.context, [{"body": ROWS[0]}])  # no metrics object: nothing to emit, no error
    recorder = MetricsRecorder()
    context = make_context(
        model_dir, {"modelFile": model_file, "serializedFile": "weights.pt"},
        metrics=recorder, yaml_config={"handler": {"profile": True}},
    )  # fmt: skip
    handler = BaseHandler()
    handler.initialize(context)
    run_batch(handler, context, [{"body": ROWS[0]}])
    names = [name for name, _ in recorder.times]
    assert names == ["ts_handler_preprocess", "ts_handler_inference", "ts_handler_postprocess", "HandlerTime"]
    assert all(value >= 0 for _, value in recorder.times)


def test_device_falls_back_to_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert loading.select_device(None) == (torch.device("cpu"), "cpu")
    assert loading.select_device(0)[0].type in ("cpu", "mps", "xpu")


def test_compile_options() -> None:
    assert loading.compile_options({}) is None
    assert loading.compile_options({"pt2": "inductor"}) == {"backend": "inductor"}
    config = {"pt2": {"compile": {"enable": True, "backend": "inductor", "mode": "max-autotune"}}}
    assert loading.compile_options(config) == {"backend": "inductor", "mode": "max-autotune"}
    assert config["pt2"]["compile"]["enable"] is True  # the model's config is left as it was
    assert loading.compile_options({"pt2": {"compile": {"enable": False}}}) is None
    assert loading.compile_options({"pt2": {"export": {"aot_compile": True}}}) is None


def test_serialized_kind(model_dir: Path) -> None:
    torch.save(_weights(), model_dir / "sd.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_reference_linear()).save(str(model_dir / "ts.pt"))
    torch.export.save(torch.export.export(_reference_linear(), (torch.zeros(1, 4),)), str(model_dir / "ep.pt2"))
    (model_dir / "x.bin").write_bytes(b"junk")
    kinds = {name: loading.serialized_kind(str(model_dir / name)) for name in ("sd.pt", "ts.pt", "ep.pt2", "x.bin")}
    assert kinds == {"sd.pt": "pickle", "ts.pt": "torchscript", "ep.pt2": "exported", "x.bin": "unknown"}
