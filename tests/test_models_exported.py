"""Exported models (.pt2, .onnx) through load_model: tiny graphs built here, checked against a
numpy re-implementation of the card protocol; real shared models against their cards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from segflow.metrics.semantic import ConfusionMatrix
from segflow.models import ModelCardError, SemanticModel, load_model

CLASSES = ["a", "b", "c", "d"]
RNG_SEED = 7


def tiny_weights() -> tuple[np.ndarray, np.ndarray]:
    """Rows summing to zero and a small bias: grey scores every class alike, so the labels
    follow local colour and any change in how pixels are sampled shows."""
    rng = np.random.default_rng(RNG_SEED)
    weight = rng.normal(size=(len(CLASSES), 3))
    weight -= weight.mean(axis=1, keepdims=True)
    bias = rng.normal(scale=0.01, size=len(CLASSES))
    return weight.astype(np.float32), bias.astype(np.float32)


class PoolProjectUpsample(torch.nn.Module):
    """2x2 average pool, per-pixel linear map to class logits, nearest upsample x2: the output
    depends on neighbours, so padding and resizing mistakes change it."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(weight))
        self.bias = torch.nn.Parameter(torch.from_numpy(bias))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(image, 2)
        logits = torch.einsum("nchw,kc->nkhw", pooled, self.weight) + self.bias[None, :, None, None]
        return F.interpolate(logits, scale_factor=2.0, mode="nearest")


def reference_logits(image01: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The same network in float64 numpy, (H, W, 3) -> (C, H, W); H and W even."""
    height, width = image01.shape[:2]
    pooled = image01.reshape(height // 2, 2, width // 2, 2, 3).mean(axis=(1, 3))
    logits = np.einsum("hwc,kc->khw", pooled, weight.astype(np.float64)) + bias[:, None, None]
    return logits.repeat(2, axis=1).repeat(2, axis=2)


def bilinear_reference(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (..., H, W), half-pixel centres, no antialiasing, edges clamped."""

    def taps(size_in: int, size_out: int):
        source = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, source - low

    y0, y1, fy = taps(array.shape[-2], height)
    x0, x1, fx = taps(array.shape[-1], width)
    rows = array[..., y0, :] * (1 - fy)[:, None] + array[..., y1, :] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def write_card(model_path: Path, **input_overrides) -> None:
    contract = {
        "color": "RGB",
        "dtype": "float32",
        "range": [0.0, 1.0],
        "layout": "NCHW",
        "fixed_size": None,
        "size_multiple": 2,
        "batch": "dynamic",
        **input_overrides,
    }
    card = {
        "name": "tiny",
        "task": "semantic",
        "classes": CLASSES,
        "input": contract,
        "output": {"kind": "logits", "layout": "NCHW", "resolution": "same as input"},
    }
    model_path.with_suffix(".json").write_text(json.dumps(card))


def export_pt2(path: Path, *, static_batch: int | None = None, fixed: int | None = None) -> Path:
    network = PoolProjectUpsample(*tiny_weights())
    example = torch.rand(static_batch or 2, 3, fixed or 8, fixed or 10)
    if fixed is None:
        half_height, half_width = torch.export.Dim("half_h", max=512), torch.export.Dim("half_w")
        dims = {2: 2 * half_height, 3: 2 * half_width}
    else:
        dims = {}
    if static_batch is None:
        dims[0] = torch.export.Dim("batch", max=64)
    program = torch.export.export(network, (example,), dynamic_shapes={"image": dims or None})
    torch.export.save(program, path)
    return path


def build_onnx(path: Path) -> Path:
    """The same network as an ONNX graph, written with onnx.helper (no torch exporter)."""
    weight, bias = tiny_weights()
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pooled", "weight", "bias"], ["projected"]),
        helper.make_node(
            "Resize",
            ["projected", "", "scales"],
            ["logits"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
    ]
    initializers = [
        numpy_helper.from_array(weight[:, :, None, None], "weight"),
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4, "h", "w"])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def tiny_pt2(tmp_path_factory) -> Path:
    path = export_pt2(tmp_path_factory.mktemp("pt2") / "tiny.pt2")
    write_card(path)
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    path = build_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    write_card(path)
    return path


def random_images(sizes) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def assert_labels_match(labels: torch.Tensor, reference: np.ndarray) -> None:
    """Equal labels wherever the reference's best class wins by a margin float32 cannot flip."""
    assert labels.dtype == torch.int64
    assert tuple(labels.shape) == reference.shape[1:]
    top_two = np.sort(reference, axis=0)[-2:]
    decisive = top_two[1] - top_two[0] > 1e-4
    assert decisive.mean() > 0.9
    np.testing.assert_array_equal(labels.numpy()[decisive], reference.argmax(axis=0)[decisive])


def padded_reference(image: np.ndarray, multiple: int) -> np.ndarray:
    height, width = image.shape[:2]
    padded = np.zeros((-(-height // multiple) * multiple, -(-width // multiple) * multiple, 3))
    padded[:height, :width] = image / 255.0
    return reference_logits(padded, *tiny_weights())[:, :height, :width]


@pytest.mark.parametrize("model_fixture", ["tiny_pt2", "tiny_onnx"])
def test_size_multiple_pads_and_crops_like_the_reference(model_fixture, request):
    model = load_model(request.getfixturevalue(model_fixture), device="cpu", return_scores=True)
    assert isinstance(model, SemanticModel)
    assert (model.name, model.task, model.classes) == ("tiny", "semantic", tuple(CLASSES))
    images = random_images([(7, 9), (6, 10), (7, 9), (3, 3)])
    predictions = model.predict(images)
    for image, prediction in zip(images, predictions, strict=True):
        reference = padded_reference(image, multiple=2)
        assert_labels_match(prediction.labels, reference)
        probabilities = np.exp(reference - reference.max(axis=0))
        probabilities /= probabilities.sum(axis=0)
        np.testing.assert_allclose(prediction.scores.numpy(), probabilities.max(axis=0), atol=1e-5)


def test_fixed_size_resizes_in_and_logits_back(tmp_path):
    path = export_pt2(tmp_path / "fixed.pt2", fixed=8)
    write_card(path, fixed_size=[8, 8], size_multiple=None)
    images = random_images([(5, 7), (40, 28)])
    predictions = load_model(path, device="cpu").predict(images)
    for image, prediction in zip(images, predictions, strict=True):
        resized = bilinear_reference(image.transpose(2, 0, 1) / 255.0, 8, 8).transpose(1, 2, 0)
        logits = reference_logits(resized, *tiny_weights())
        assert_labels_match(prediction.labels, bilinear_reference(logits, *image.shape[:2]))


def test_static_batch_graph_gets_padded_chunks(tmp_path):
    path = export_pt2(tmp_path / "static.pt2", static_batch=2)
    write_card(path, batch=2)
    images = random_images([(6, 8)] * 3)
    predictions = load_model(path, device="cpu", batch_size=8).predict(images)
    for image, prediction in zip(images, predictions, strict=True):
        assert_labels_match(prediction.labels, padded_reference(image, multiple=2))


def test_card_that_disagrees_with_the_graph_is_reported(tmp_path, tiny_pt2):
    path = tmp_path / "liar.pt2"
    path.write_bytes(tiny_pt2.read_bytes())
    card = json.loads(tiny_pt2.with_suffix(".json").read_text())
    card["classes"] = ["only", "three", "classes"]
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"3 classes"):
        load_model(path, device="cpu").predict(random_images([(4, 4)]))


def test_exported_models_refuse_separate_weights(tiny_pt2):
    with pytest.raises(ValueError, match="carries its own weights"):
        load_model(tiny_pt2, device="cpu", weights="other.pth")


def test_onnx_runs_fp32_only(tiny_onnx):
    with pytest.raises(ValueError, match="precision must be 'auto' or 'fp32'"):
        load_model(tiny_onnx, device="cpu", precision="bf16")


def read_card(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_espnet_camvid_reproduces_its_card(shared, suffix):
    model_path = shared / "models" / f"espnet_camvid{suffix}"
    reference = read_card(model_path)["reference"]
    model = load_model(model_path, device="cpu", batch_size=4)
    image_paths = sorted((shared / "data" / "camvid_val" / "images").glob("*.png"))
    assert len(image_paths) == 101
    confusion = ConfusionMatrix(11, ignore_index=11)
    for start in range(0, len(image_paths), 8):
        chunk = image_paths[start : start + 8]
        images = [np.array(Image.open(path).convert("RGB")) for path in chunk]
        for path, prediction in zip(chunk, model.predict(images), strict=True):
            label_path = shared / "data" / "camvid_val" / "labels" / path.name
            confusion.update(np.array(Image.open(label_path)), prediction.labels)
    scores = confusion.compute()
    print(f"espnet_camvid{suffix}: mIoU {scores.miou:.6f} pixel acc {scores.pixel_accuracy:.6f}")
    assert scores.miou == pytest.approx(reference["mIoU"], abs=1e-4)
    assert scores.pixel_accuracy == pytest.approx(reference["pixel_accuracy"], abs=1e-4)
    np.testing.assert_allclose(scores.per_class_iou, reference["per_class_iou"], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_espnetv2_voc_reproduces_person_iou_on_coco(shared, suffix):
    from pycocotools.coco import COCO

    model_path = shared / "models" / f"espnetv2_voc{suffix}"
    card = read_card(model_path)
    person = card["classes"].index("person")
    root = shared / "data" / "coco_val2017_10"
    coco = COCO(str(root / "annotations" / "instances_val2017_subset.json"))
    image_ids = sorted(coco.getImgIds())
    images = [
        np.array(Image.open(root / "images" / coco.loadImgs(i)[0]["file_name"]).convert("RGB"))
        for i in image_ids
    ]
    predictions = load_model(model_path, device="cpu", batch_size=4).predict(images)
    intersection = union = 0
    for image_id, image, prediction in zip(image_ids, images, predictions, strict=True):
        truth = np.zeros(image.shape[:2], dtype=bool)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id, catIds=[1], iscrowd=None)):
            truth |= coco.annToMask(annotation).astype(bool)
        predicted = prediction.labels.numpy() == person
        intersection += int((predicted & truth).sum())
        union += int((predicted | truth).sum())
    person_iou = intersection / union
    print(f"espnetv2_voc{suffix}: person IoU {person_iou:.6f}")
    assert person_iou == pytest.approx(card["reference"]["person_iou"], abs=1e-4)
