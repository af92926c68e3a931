"""load_model's resolution and its errors: names, paths, cards, weights, devices, extras."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segflow.models import (
    MissingDependencyError,
    MissingWeightsError,
    ModelCardError,
    UnknownModelError,
    available_models,
    load_model,
)

TORCHVISION_SEMANTIC = {
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
}
TORCHVISION_INSTANCE = {"maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"}

VALID_CARD = {
    "name": "card-test",
    "task": "semantic",
    "classes": ["background", "thing"],
    "input": {
        "color": "RGB",
        "dtype": "float32",
        "range": [0.0, 1.0],
        "layout": "NCHW",
        "fixed_size": None,
        "size_multiple": 8,
        "batch": "dynamic",
    },
    "output": {"kind": "logits", "layout": "NCHW", "resolution": "same as input"},
}


def test_importing_segflow_models_loads_no_backend():
    heavy = ["torchvision.models.detection", "onnxruntime", "segmentation_models_pytorch"]
    code = f"import sys, segflow.models\nprint([name for name in {heavy!r} if name in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_available_models_lists_every_builtin_with_task_and_source():
    listed = {info.name: info for info in available_models()}
    smp_names = {"smp:Unet", "smp:DeepLabV3Plus", "smp:PSPNet", "smp:FPN"}
    assert set(listed) == TORCHVISION_SEMANTIC | TORCHVISION_INSTANCE | smp_names
    for name in TORCHVISION_SEMANTIC:
        assert (listed[name].task, listed[name].source) == ("semantic", "torchvision")
    for name in TORCHVISION_INSTANCE:
        assert (listed[name].task, listed[name].source) == ("instance", "torchvision")
    assert listed["smp:Unet"].extra == "smp"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownModelError, match="deeplabv3_resnet50") as raised:
        load_model("deeplabv3_resnet5")
    assert "Did you mean" in str(raised.value)


def test_missing_exported_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.pt2"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_model(missing)


def test_missing_card_is_named(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read before the card")
    with pytest.raises(ModelCardError, match=str(model.with_suffix(".json"))):
        load_model(model, device="cpu")


def _mutated(path: tuple[str, ...], value: object) -> dict:
    card = json.loads(json.dumps(VALID_CARD))
    target = card
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return card


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("task",), "panoptic", "task"),
        (("classes",), [], "classes"),
        (("classes",), ["ok", 3], "classes"),
        (("input",), KeyError, "input"),
        (("input", "color"), "BGR", "input.color"),
        (("input", "dtype"), "uint8", "input.dtype"),
        (("input", "range"), [0, 255], "input.range"),
        (("input", "layout"), "NHWC", "input.layout"),
        (("input", "fixed_size"), [384], "input.fixed_size"),
        (("input", "fixed_size"), KeyError, "input.fixed_size"),
        (("input", "size_multiple"), 0, "input.size_multiple"),
        (("input", "batch"), "some", "input.batch"),
        (("output", "kind"), "probabilities", "output.kind"),
    ],
)
def test_invalid_card_names_file_and_field(tmp_path, path, value, field):
    model = tmp_path / "model.pt2"
    model.write_bytes(b"")
    model.with_suffix(".json").write_text(json.dumps(_mutated(path, value)))
    with pytest.raises(ModelCardError) as raised:
        load_model(model, device="cpu")
    message = str(raised.value)
    assert str(model.with_suffix(".json")) in message
    assert repr(field) in message


def test_card_that_is_not_json_is_named(tmp_path):
    model = tmp_path / "model.pt2"
    model.write_bytes(b"")
    model.with_suffix(".json").write_text("{not json")
    with pytest.raises(ModelCardError, match="not readable JSON"):
        load_model(model, device="cpu")


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'segflow\[onnx\]'"):
        load_model(model)


def test_missing_smp_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'segflow\[smp\]'"):
        load_model("smp:Unet", classes=2, weights="none")


def test_missing_pretrained_weights_name_the_expected_path(tmp_path, monkeypatch):
    from torchvision.models import get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = get_model_weights("deeplabv3_resnet50").DEFAULT.url
    expected = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    with pytest.raises(MissingWeightsError) as raised:
        load_model("deeplabv3_resnet50", device="cpu")
    message = str(raised.value)
    assert str(expected) in message
    assert "weights=" in message
    assert not expected.exists()


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "absent.pth"
    with pytest.raises(MissingWeightsError, match=str(missing)):
        load_model("lraspp_mobilenet_v3_large", device="cpu", weights=missing)


def test_weights_file_that_needs_unpickling_code_is_refused(tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": Path("objects are not weights")}, unsafe)
    with pytest.raises(ValueError, match="not a weights-only PyTorch file"):
        load_model("lraspp_mobilenet_v3_large", device="cpu", weights=unsafe)


def test_weights_for_another_architecture_are_refused(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1, 3, 1, 1)}, wrong)
    with pytest.raises(ValueError, match=f"weights file {wrong} does not fit the model"):
        load_model("lraspp_mobilenet_v3_large", device="cpu", weights=wrong)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "tpu"}, "device must be"),
        ({"precision": "fp16", "device": "cpu"}, "'fp16' needs a CUDA device"),
        ({"precision": "fp64", "device": "cpu"}, "precision must be"),
        ({"batch_size": 0, "device": "cpu"}, "batch_size must be a positive integer"),
        ({"resize_size": -1, "device": "cpu"}, "resize_size must be a positive integer"),
    ],
)
def test_bad_runtime_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        load_model("lraspp_mobilenet_v3_large", weights="none", **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_explicit_cuda_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model("lraspp_mobilenet_v3_large", weights="none", device="cuda")


def test_auto_device_picks_cuda_only_when_available():
    model = load_model("lraspp_mobilenet_v3_large", weights="none")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
