"""The demo corpus (segflow.demo.corpus) and the demo models in models/demo: the corpus is
deterministic and self-consistent (checked with pycocotools, not segflow's RLE), its broken
files fail to decode, its large images are tiled; the models load through the registry and
reach their goals on held-out scenes, as segflow's own evaluation measures them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from segflow.decode import (
    EmptyImageError,
    NotAnImageError,
    TruncatedImageError,
    decode_image,
    decode_label_map,
)
from segflow.demo.corpus import (
    CLASSES,
    GEO_COLUMNS,
    GEO_ORIGIN,
    GEO_PIXEL,
    NODATA_MARGIN,
    THINGS,
    render_scene,
    scene_rng,
    write_corpus,
)
from segflow.demo.corpus import main as corpus_main
from segflow.evaluation import evaluate_run
from segflow.groundtruth import open_ground_truth
from segflow.manifest import Shard
from segflow.models import ModelCardError, load_model
from segflow.models.semantic import DEFAULT_TILE_SIZE
from segflow.shard import segment_images
from segflow.store import RunStore
from tests.conftest import manifest_uris

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO_ROOT / "models" / "demo"
SMALL = (192, 160)
LARGE = (1100, 1040)  # above the tile size on one side only


def write_small(uri: str) -> None:
    write_corpus(
        uri, split="heldout", images=3, seed=5, size=SMALL, large=1, large_size=LARGE, broken=3
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_small(str(root))
    return root / "heldout"


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_scenes(corpus, tmp_path):
    write_small(str(tmp_path / "again"))
    assert files_of(tmp_path / "again" / "heldout") == files_of(corpus)
    write_corpus(str(tmp_path / "other"), split="heldout", images=1, seed=6, size=SMALL)
    other = (tmp_path / "other" / "heldout" / "images" / "heldout-00000.jpg").read_bytes()
    assert other != (corpus / "images" / "heldout-00000.jpg").read_bytes()


def test_splits_do_not_share_scenes(tmp_path):
    for split in ("train", "heldout"):
        write_corpus(str(tmp_path), split=split, images=2, seed=0, size=SMALL)
    train = files_of(tmp_path / "train" / "images").values()
    heldout = files_of(tmp_path / "heldout" / "images").values()
    assert not set(train) & set(heldout)


def test_label_maps_and_coco_instances_agree(corpus):
    coco = json.loads((corpus / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(names.values()) == sorted(CLASSES[t] for t in THINGS)
    assert len(coco["images"]) == 4
    assert {a["category_id"] for a in coco["annotations"]} == set(names)
    by_image: dict[int, list[dict]] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for entry in coco["images"]:
        stem = entry["file_name"].rsplit(".", 1)[0]
        labels = decode_label_map((corpus / "labels" / f"{stem}.png").read_bytes())
        image = decode_image((corpus / "images" / entry["file_name"]).read_bytes())
        assert labels.shape == image.shape[:2] == (entry["height"], entry["width"])
        assert set(np.unique(labels).tolist()) <= set(range(len(CLASSES)))
        annotations = by_image.get(entry["id"], [])
        masks = np.zeros((*labels.shape, 0), np.uint8)
        if annotations:
            masks = coco_mask.decode([a["segmentation"] for a in annotations])  # (H, W, N)
        assert masks.sum(axis=2).max(initial=0) <= 1  # instances do not overlap
        for annotation, k in zip(annotations, range(masks.shape[2]), strict=True):
            assert annotation["iscrowd"] == 0
            assert annotation["area"] == masks[..., k].sum() > 0
            np.testing.assert_allclose(
                annotation["bbox"], coco_mask.toBbox(annotation["segmentation"])
            )
        for category, name in names.items():
            of_class = [k for k, a in enumerate(annotations) if a["category_id"] == category]
            union = masks[..., of_class].any(axis=2)
            np.testing.assert_array_equal(union, labels == CLASSES.index(name))


def test_broken_files_are_broken_and_not_annotated(corpus):
    broken = sorted((corpus / "images").glob("*broken*"))
    expected = {
        "truncated.jpg": TruncatedImageError,
        "empty.jpg": EmptyImageError,
        "text.png": NotAnImageError,
    }
    assert len(broken) == 3
    for path in broken:
        [error] = [e for suffix, e in expected.items() if path.name.endswith(suffix)]
        with pytest.raises(error):
            decode_image(path.read_bytes(), name=path.name)
    listed = {
        image["file_name"]
        for image in json.loads((corpus / "instances.json").read_text())["images"]
    }
    assert not listed & {p.name for p in broken}
    # segflow's manifest lists them with the scenes, so a run meets them.
    assert len(manifest_uris(str(corpus / "images"))) == 4 + 3


def test_large_images_are_larger_than_the_tile_size(corpus):
    sizes = [Image.open(p).size for p in sorted((corpus / "images").glob("heldout-0*.jpg"))]
    assert sizes == [SMALL] * 3 + [LARGE]
    assert max(LARGE) > DEFAULT_TILE_SIZE >= max(SMALL)


def test_geotiff_tiles_are_a_georeferenced_mosaic_with_nodata_margins(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    split = write_corpus(str(tmp_path), split="heldout", images=4, seed=5, size=SMALL, geotiff=4)
    tiles = sorted(Path(split.geotiff).glob("*.tif"))
    assert [path.stem for path in tiles] == [f"heldout-{i:05d}" for i in range(4)]
    width, height = SMALL
    bounds = []
    for index, path in enumerate(tiles):
        with rasterio.open(path) as tile:
            assert tile.crs.to_epsg() == 32640 and tile.res == (GEO_PIXEL, GEO_PIXEL)
            assert (tile.width, tile.height, tile.nodata) == (width, height, 0)
            valid, pixels = tile.dataset_mask() > 0, tile.read()
            bounds.append(tile.bounds)
        row, column = divmod(index, GEO_COLUMNS)
        expected = np.ones((height, width), bool)
        if column == GEO_COLUMNS - 1 or index == 3:  # the mosaic's right edge
            expected[:, width - NODATA_MARGIN :] = False
        if row == 1:  # its bottom row
            expected[height - NODATA_MARGIN :] = False
        np.testing.assert_array_equal(valid, expected)
        scene = render_scene(scene_rng(5, "heldout", index), width, height).image
        np.testing.assert_array_equal(pixels.transpose(1, 2, 0)[valid], np.maximum(scene, 1)[valid])
    assert bounds[0].left == GEO_ORIGIN[0] and bounds[0].top == GEO_ORIGIN[1]
    assert bounds[1].left == pytest.approx(bounds[0].right)  # tiles adjoin
    assert bounds[3].top == pytest.approx(bounds[0].bottom)
    with pytest.raises(ValueError, match=r"geotiff must be at most images \(1\)"):
        write_corpus(str(tmp_path / "x"), images=1, geotiff=2)


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"split": "test"}, "split must be one of train, heldout, got 'test'"),
        ({"images": -1}, "images must be an integer >= 0"),
        ({"size": (32, 512)}, "size must be (width, height), each >= 64"),
        ({"broken": 1.5}, "broken must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_named(tmp_path, arguments, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        write_corpus(str(tmp_path), **arguments)
    assert not any(tmp_path.iterdir())


def test_the_command_writes_a_split_or_names_a_bad_argument(tmp_path, capsys):
    corpus_main([str(tmp_path), "--split", "heldout", "--images", "1", "--size", "96x80"])
    assert Image.open(tmp_path / "heldout" / "images" / "heldout-00000.jpg").size == (96, 80)
    assert f"masks:{tmp_path}/heldout/labels" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        corpus_main([str(tmp_path), "--size", "96"])
    assert exited.value.code == 2
    assert "size must be WIDTHxHEIGHT" in capsys.readouterr().err


@pytest.mark.integration
def test_writes_to_s3(s3_env, monkeypatch):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    split = write_corpus("s3://demo-corpus/aerial", split="heldout", images=2, size=SMALL, broken=1)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert len(manifest_uris(split.images)) == 3
    ground_truth = open_ground_truth(f"coco:{split.instances}")
    target = ground_truth.target(f"{split.images}/heldout-00001.jpg")
    assert (target.width, target.height) == SMALL and target.annotations
    labels = open_ground_truth(f"masks:{split.labels}").target(f"{split.images}/heldout-00000.jpg")
    assert labels.labels.shape == SMALL[::-1]


# --------------------------------------------------------------------------------------------
# The boundary-band instance adapter, on a hand-made graph.


class ColourRule(torch.nn.Module):
    """Classes (background, box): red means box. Boundary logit: green means band."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        red, green = image[:, 0:1], image[:, 1:2]
        return torch.cat([0.5 - red, red - 0.5, 10 * (green - 0.5)], dim=1)


def export_colour_rule(folder: Path, card: dict) -> Path:
    dims = {"image": {0: torch.export.Dim("n"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}}
    program = torch.export.export(ColourRule(), (torch.rand(2, 3, 24, 32),), dynamic_shapes=dims)
    path = folder / "colour_rule.pt2"
    torch.export.save(program, path)
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def instance_card(**instances) -> dict:
    return {
        "task": "instance",
        "classes": ["background", "box"],
        "input": {
            "color": "RGB",
            "dtype": "float32",
            "range": [0.0, 1.0],
            "layout": "NCHW",
            "fixed_size": None,
            "size_multiple": None,
            "batch": "dynamic",
        },
        "output": {"kind": "logits", "layout": "NCHW"},
        "instances": {
            "method": "boundary-band",
            "things": ["box"],
            "band": 2,
            "min_area": 20,
            **instances,
        },
    }


def test_touching_objects_separate_along_the_predicted_band(tmp_path):
    model = load_model(export_colour_rule(tmp_path, instance_card()), device="cpu")
    assert model.task == "instance"
    image = np.zeros((40, 64, 3), np.uint8)
    boxes = [(10, 10, 20, 20), (30, 10, 20, 20)]  # x, y, w, h: the second touches the first
    for x, y, w, h in boxes:
        image[y : y + h, x : x + w] = (255, 255, 0)  # band colour, then the inside
        image[y + 2 : y + h - 2, x + 2 : x + w - 2] = (255, 0, 0)
    image[30:34, 55:59] = (255, 0, 0)  # 16 pixels: below min_area
    [prediction] = model.predict([image])
    assert prediction.labels.tolist() == [1, 1]
    assert sorted(prediction.boxes.tolist()) == [list(map(float, b)) for b in boxes]
    for mask, box in zip(prediction.masks, prediction.boxes.tolist(), strict=True):
        x, y, w, h = (int(v) for v in box)
        expected = np.zeros((40, 64), bool)
        expected[y : y + h, x : x + w] = True
        np.testing.assert_array_equal(mask.numpy(), expected)
    # Each scored by the mean probability of "box": softmax of (-0.5, 0.5) on red.
    np.testing.assert_allclose(prediction.scores.numpy(), 1 / (1 + math.exp(-1)), rtol=1e-6)


@pytest.mark.parametrize(
    ("instances", "field"),
    [
        ({"method": "watershed"}, "instances.method"),
        ({"things": ["car"]}, "instances.things"),
        ({"band": 0}, "instances.band"),
        (None, "instances"),  # no instances section at all
    ],
)
def test_a_bad_instance_card_names_the_field(tmp_path, instances, field):
    card = instance_card(**instances or {})
    if instances is None:
        del card["instances"]
    path = export_colour_rule(tmp_path, card)
    with pytest.raises(ModelCardError, match=f"colour_rule.json: field '{field}'"):
        load_model(path)


# --------------------------------------------------------------------------------------------
# The committed demo models.


def evaluated_run(model_path: Path, uris: list[str], gt: str, out: Path) -> dict:
    """Segment ``uris`` into a run folder as a worker does, then evaluate it from its tables."""
    from segflow.preflight import evaluation_info

    model = load_model(model_path, device="cpu")
    store = RunStore(str(out), "demo")
    store.prepare({"input": uris, "model": str(model_path), "gt": gt})
    store.write_json("evaluation.json", evaluation_info(model, gt, None))
    result = segment_images(model, uris, run_id="demo", ground_truth=open_ground_truth(gt))
    assert result.num_failed == 0 and result.num_not_evaluated == 0
    store.commit_shard(Shard(0, 0, len(uris)), result.tables, {"images": len(uris)})
    return evaluate_run(str(out))


@pytest.mark.slow
def test_demo_models_reach_their_goals_on_held_out_scenes(tmp_path):
    # Seed 1: not even the held-out scenes the cards were measured on.
    split = write_corpus(str(tmp_path / "corpus"), split="heldout", images=5, seed=1, large=1)
    uris = manifest_uris(split.images)
    semantic = evaluated_run(
        DEMO_MODELS / "aerial_unet.pt2", uris, f"masks:{split.labels}", tmp_path / "semantic"
    )["semantic"]
    assert semantic["classes"] == list(CLASSES)
    assert semantic["miou"] >= 0.80, semantic["per_class_iou"]
    instance = evaluated_run(
        DEMO_MODELS / "aerial_instances.pt2",
        uris,
        f"coco:{split.instances}",
        tmp_path / "instance",
    )["instance"]
    assert instance["segm"]["stats"][0] >= 0.50, instance["segm"]["per_class_ap"]
    assert set(instance["segm"]["per_class_ap"]) == {"building", "car"}
