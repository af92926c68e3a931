"""Ground-truth adapters on the real shared data, checked against PIL and pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from segflow.groundtruth import (
    IGNORE,
    GroundTruthError,
    InstanceTarget,
    SemanticTarget,
    open_ground_truth,
)
from tests.conftest import manifest_uris

# torchvision references/segmentation/coco_utils.py, get_coco: the COCO category of each VOC
# class, by class id.
TORCHVISION_CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
VOC_PERSON = 15
CAMVID_VOID = 11


@pytest.fixture(scope="module")
def data(shared: Path) -> Path:
    return shared / "data"


@pytest.fixture(scope="module")
def coco_file(data: Path) -> Path:
    return data / "coco_val2017_10" / "annotations" / "instances_val2017_subset.json"


@pytest.fixture(scope="module")
def coco(coco_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_file))


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------------------------
# Index masks.


def test_camvid_labels_are_the_stored_values_with_void_ignored(data):
    ground_truth = open_ground_truth(f"masks:{data / 'camvid_val' / 'labels'}", ignore_index=11)
    assert (ground_truth.kind, ground_truth.categories) == ("semantic", None)
    images = manifest_uris(str(data / "camvid_val" / "images"))
    assert len(images) == 101
    for uri in images:
        target = ground_truth.target(uri)
        label_file = data / "camvid_val" / "labels" / Path(uri).name
        assert isinstance(target, SemanticTarget)
        assert target.source == f"file://{label_file}"
        stored = np.array(Image.open(label_file)).astype(np.int64)
        expected = np.where(stored == CAMVID_VOID, IGNORE, stored)
        assert target.labels.dtype == np.int64
        np.testing.assert_array_equal(target.labels, expected)


def test_an_image_under_the_label_folder_is_not_its_own_label_map(data):
    # camvid_val/images/X.png and camvid_val/labels/X.png share the stem.
    ground_truth = open_ground_truth(f"masks:{data / 'camvid_val'}")
    image = data / "camvid_val" / "images" / "0016E5_07959.png"
    target = ground_truth.target(str(image))
    assert target.source == f"file://{data / 'camvid_val' / 'labels' / image.name}"


def test_id_map_maps_stored_ids_and_ignores_the_rest(data, tmp_path):
    # Unmapped (3..10, void) and null (1) become IGNORE; ignore_index applies to mapped ids.
    mapping = {"0": 4, "1": None, "2": 0, "11": 7}
    id_map = write_json(tmp_path / "id map.json", mapping)
    ground_truth = open_ground_truth(
        f"masks:{data / 'camvid_val' / 'labels'}?id_map={id_map}", ignore_index=7
    )
    label_file = data / "camvid_val" / "labels" / "0016E5_07959.png"
    stored = np.array(Image.open(label_file))
    lookup = np.full(256, IGNORE)
    lookup[[0, 2]] = [4, 0]
    expected = lookup[stored]
    assert set(np.unique(expected)) == {IGNORE, 0, 4}
    target = ground_truth.target(f"s3://images/camvid/{label_file.stem}.jpg")
    np.testing.assert_array_equal(target.labels, expected)


# --------------------------------------------------------------------------------------------
# Colour-coded masks.


def aerial_palette(data: Path) -> dict:
    return json.loads((data / "aerial_dubai" / "palette.json").read_text())


def expected_from_colours(mask_file: Path, palette: dict) -> np.ndarray:
    rgb = np.array(Image.open(mask_file).convert("RGB"))
    expected = np.full(rgb.shape[:2], -2, np.int64)
    for entry in palette["classes"]:
        expected[np.all(rgb == entry["rgb"], axis=-1)] = entry["id"]
    for colour in palette["ignore_rgb"]:
        expected[np.all(rgb == colour, axis=-1)] = IGNORE
    assert (expected != -2).all(), f"{mask_file} has colours outside the palette"
    return expected


def test_aerial_palette_masks_match_their_tile(data):
    root = data / "aerial_dubai"
    palette = aerial_palette(data)
    ground_truth = open_ground_truth(f"masks:{root}?palette={root / 'palette.json'}")
    images = [uri for uri in manifest_uris(str(root)) if uri.endswith(".jpg")]
    assert len(images) == 72
    palette_modes = set()
    for uri in images:
        target = ground_truth.target(uri)
        # Every tile has masks of the same names: the one beside the image is meant.
        assert target.source == uri.replace("/images/", "/masks/").replace(".jpg", ".png")
        mask_file = Path(target.source.removeprefix("file://"))
        with Image.open(uri.removeprefix("file://")) as image:
            assert target.labels.shape == (image.height, image.width)
        assert set(np.unique(target.labels)) <= {IGNORE, 0, 1, 2, 3, 4, 5}
        with Image.open(mask_file) as mask:
            if mask.mode not in palette_modes:
                palette_modes.add(mask.mode)
                expected = expected_from_colours(mask_file, palette)
                np.testing.assert_array_equal(target.labels, expected)
    assert palette_modes == {"RGB", "P"}


def test_a_colour_outside_the_palette_is_named(data, tmp_path):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[:2] = [60, 16, 152]  # building
    pixels[2:, :3] = [1, 2, 3]
    write_png(tmp_path / "gt" / "tile.png", pixels)
    palette = data / "aerial_dubai" / "palette.json"
    ground_truth = open_ground_truth(f"masks:{tmp_path / 'gt'}?palette={palette}")
    with pytest.raises(GroundTruthError) as raised:
        ground_truth.target("/images/tile.jpg")
    message = str(raised.value)
    assert "[1, 2, 3] (6 pixels)" in message
    assert "tile.png" in message and "/images/tile.jpg" in message


def test_colour_masks_without_a_palette_ask_for_one(data):
    ground_truth = open_ground_truth(f"masks:{data / 'aerial_dubai' / 'Tile 1' / 'masks'}")
    with pytest.raises(GroundTruthError, match="palette=URI"):
        ground_truth.target("image_part_001.jpg")


# --------------------------------------------------------------------------------------------
# Matching label files to images.


def test_label_files_sharing_a_stem_are_told_apart_by_folder_or_refused(tmp_path):
    for folder, value in (("a", 1), ("b", 2)):
        write_png(tmp_path / "gt" / folder / "x.png", np.full((3, 3), value, np.uint8))
    ground_truth = open_ground_truth(f"masks:{tmp_path / 'gt'}")
    assert ground_truth.target("s3://bucket/b/x.jpg").labels[0, 0] == 2
    assert ground_truth.target("/elsewhere/a/images/x.webp").labels[0, 0] == 1
    with pytest.raises(GroundTruthError) as raised:
        ground_truth.target("s3://bucket/c/x.jpg")
    message = str(raised.value)
    assert "s3://bucket/c/x.jpg" in message
    assert f"{tmp_path}/gt/a/x.png" in message and f"{tmp_path}/gt/b/x.png" in message
    with pytest.raises(GroundTruthError, match=r"'s3://bucket/y\.jpg': no label file y\.png"):
        ground_truth.target("s3://bucket/y.jpg")


def test_unreadable_label_files_are_named(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    ground_truth = open_ground_truth(f"masks:{tmp_path / 'gt'}")
    with pytest.raises(GroundTruthError, match=r"'x\.jpg'.*x\.png"):
        ground_truth.target("x.jpg")


# --------------------------------------------------------------------------------------------
# COCO instances.


def image_uri(data: Path, file_name: str) -> str:
    return f"file://{data / 'coco_val2017_10' / 'images' / file_name}"


def test_coco_instances_are_the_images_annotations(data, coco_file, coco):
    ground_truth = open_ground_truth(f"coco:{coco_file}")
    assert ground_truth.kind == "instance"
    assert ground_truth.categories == {c["id"]: c["name"] for c in coco.dataset["categories"]}
    assert len(ground_truth.categories) == 80
    for image_id, image in coco.imgs.items():
        target = ground_truth.target(image_uri(data, image["file_name"]))
        assert isinstance(target, InstanceTarget)
        assert (target.height, target.width) == (image["height"], image["width"])
        assert target.annotations == coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert target.source == f"{coco_file}#image_id={image_id}"
    # A re-encoded copy matches by stem.
    copy = ground_truth.target("s3://bucket/copies/000000166563.png")
    assert copy.source.endswith("#image_id=166563")


def test_coco_images_without_annotations_missing_or_ambiguous(coco_file, tmp_path):
    dataset = json.loads(coco_file.read_text())
    extra = {"height": 20, "width": 30}
    dataset["images"] += [
        {"id": 1, "file_name": "empty.jpg", **extra},
        {"id": 2, "file_name": "a/twin.jpg", **extra},
        {"id": 3, "file_name": "b/twin.jpg", **extra},
    ]
    spec = f"coco:{write_json(tmp_path / 'gt.json', dataset)}"
    ground_truth = open_ground_truth(spec)
    empty = ground_truth.target("/data/empty.jpg")
    assert (empty.height, empty.width, empty.annotations) == (20, 30, [])
    with pytest.raises(GroundTruthError, match=r"'/data/twin\.jpg'.*2 images \(ids \[2, 3\]\)"):
        ground_truth.target("/data/twin.jpg")
    with pytest.raises(GroundTruthError, match=r"'/data/nothing\.jpg'.*no image"):
        ground_truth.target("/data/nothing.jpg")


# --------------------------------------------------------------------------------------------
# Semantic targets from COCO instances.


def torchvision_target(coco: COCO, image_id: int, categories: list[int]) -> np.ndarray:
    """ConvertCocoPolysToMask after FilterAndRemapCocoCategories, on pycocotools' masks."""
    image = coco.imgs[image_id]
    kept = [a for a in coco.imgToAnns[image_id] if a["category_id"] in categories]
    if not kept:
        return np.zeros((image["height"], image["width"]), np.int64)
    masks = torch.as_tensor(np.stack([coco.annToMask(a) for a in kept]), dtype=torch.uint8)
    classes = torch.as_tensor([categories.index(a["category_id"]) for a in kept], dtype=torch.uint8)
    target, _ = (masks * classes[:, None, None]).max(dim=0)
    target[masks.sum(0) > 1] = 255
    labels = target.numpy().astype(np.int64)
    return np.where(labels == 255, IGNORE, labels)


def test_coco_semantic_voc_is_torchvisions_target(data, coco_file, coco):
    ground_truth = open_ground_truth(f"coco-semantic:{coco_file}?categories=voc")
    assert (ground_truth.kind, ground_truth.categories) == ("semantic", None)
    classes_seen, ignored_pixels = set(), 0
    for image_id, image in coco.imgs.items():
        target = ground_truth.target(image_uri(data, image["file_name"]))
        expected = torchvision_target(coco, image_id, TORCHVISION_CAT_LIST)
        np.testing.assert_array_equal(target.labels, expected)
        classes_seen |= set(np.unique(expected).tolist())
        ignored_pixels += int((expected == IGNORE).sum())
    assert len(classes_seen) > 4 and ignored_pixels > 0


def test_coco_semantic_keeps_crowd_regions_as_torchvision_does(data, coco_file, coco):
    (crowd,) = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
    assert crowd["category_id"] == 1  # a crowd of people
    image = coco.imgs[crowd["image_id"]]
    ground_truth = open_ground_truth(f"coco-semantic:{coco_file}?categories=voc")
    labels = ground_truth.target(image_uri(data, image["file_name"])).labels
    others = [a for a in coco.imgToAnns[image["id"]] if a is not crowd]
    alone = coco.annToMask(crowd).astype(bool)
    for other in others:
        alone &= ~coco.annToMask(other).astype(bool)
    assert alone.sum() > 500
    assert (labels[alone] == VOC_PERSON).all()


def test_coco_semantic_with_a_category_file(data, coco_file, coco, tmp_path):
    categories = write_json(tmp_path / "classes.json", {"1": 2, "3": 1})  # person, car
    ground_truth = open_ground_truth(
        f"coco-semantic:{coco_file}?categories={categories}", ignore_index=1
    )
    for image_id, image in coco.imgs.items():
        target = ground_truth.target(image_uri(data, image["file_name"]))
        expected = torchvision_target(coco, image_id, [0, 3, 1])
        np.testing.assert_array_equal(target.labels, np.where(expected == 1, IGNORE, expected))


# --------------------------------------------------------------------------------------------
# Bad specs and files: job-level errors when opened.


def test_bad_specs_and_files_are_named(data, coco_file, tmp_path):
    labels = data / "camvid_val" / "labels"
    palette = data / "aerial_dubai" / "palette.json"
    not_json = tmp_path / "not.json"
    not_json.write_text("{oops")
    (tmp_path / "no_png").mkdir()
    (tmp_path / "no_png" / "readme.txt").write_text("x")
    bad_palette = write_json(tmp_path / "bad palette.json", {"classes": [{"id": 0, "rgb": [1]}]})
    twice = write_json(
        tmp_path / "twice.json",
        {"classes": [{"id": 0, "rgb": [1, 2, 3]}], "ignore_rgb": [[1, 2, 3]]},
    )
    bad_map = write_json(tmp_path / "bad map.json", {"7": -3})
    cases = [
        ("voc:/x", {}, "with KIND one of coco, masks, coco-semantic"),
        ("masks", {}, "must be KIND:URI"),
        ("masks:", {}, "names no file or folder"),
        ("masks:?palette=p.json", {}, "names no file or folder"),
        (
            f"masks:{labels}?colours=x",
            {},
            r"unknown option\(s\) \['colours'\].*id_map, image_suffix",
        ),
        (f"masks:{labels}?instances=_i.png", {}, "give id_map=cityscapes too"),
        (f"masks:{labels}?suffix=_gtFine_labelIds.png", {}, "no label files ending with _gtFine"),
        (f"masks:{labels}?palette", {}, "'palette' is not key=value"),
        (f"masks:{labels}?id_map=a&id_map=b", {}, "'id_map' is given twice"),
        (f"coco:{coco_file}?categories=voc", {}, r"allowed: none"),
        (f"masks:{tmp_path / 'nope'}", {}, "does not exist"),
        (f"masks:{coco_file}", {}, "is a file, not a folder"),
        (f"masks:{tmp_path / 'no_png'}", {}, "holds no label files ending with .png"),
        (f"masks:{labels}?palette={tmp_path / 'nope.json'}", {}, "palette .*does not exist"),
        (f"masks:{labels}?palette={not_json}", {}, "palette .*not.json.* is not valid JSON"),
        (f"masks:{labels}?palette={bad_palette}", {}, r"classes\[0\]\['rgb'\] must be \[r, g, b\]"),
        (f"masks:{labels}?palette={twice}", {}, r"colour \[1, 2, 3\] is listed twice"),
        (f"masks:{labels}?id_map={bad_map}", {}, r"bad map.json.*\['7'\] must be a class id >= 0"),
        (f"masks:{labels}?palette={palette}", {"ignore_index": "11"}, "must be an integer"),
        (f"coco:{coco_file}", {"ignore_index": 0}, "semantic ground truth only"),
        (f"coco:{tmp_path / 'nope.json'}", {}, "COCO annotations .*nope.json' does not exist"),
        (f"coco:{not_json}", {}, "is not valid JSON"),
        (f"coco:{palette}", {}, "has no 'images' list"),
        (f"coco-semantic:{coco_file}", {}, r"needs \?categories=voc"),
        (f"coco-semantic:{coco_file}?categories={bad_map}", {}, "must be a class id >= 0"),
    ]
    for spec, options, message in cases:
        with pytest.raises(GroundTruthError, match=message):
            open_ground_truth(spec, **options)


def test_coco_files_with_bad_fields_are_named(coco_file, tmp_path):
    good = json.loads(coco_file.read_text())
    damaged = {
        "images[0]['id'] must be an integer": lambda d: d["images"][0].update(id="7"),
        "images[1] has no 'file_name'": lambda d: d["images"][1].pop("file_name"),
        "images[2]['height'] must be positive": lambda d: d["images"][2].update(height=0),
        "image id 166563 is listed twice": lambda d: d["images"].append(d["images"][0]),
        "annotations[3]['category_id'] must be": lambda d: d["annotations"][3].pop("category_id"),
        "category id 1 is listed twice": lambda d: d["categories"].append(d["categories"][0]),
    }
    for message, damage in damaged.items():
        dataset = json.loads(json.dumps(good))
        damage(dataset)
        path = write_json(tmp_path / "damaged.json", dataset)
        with pytest.raises(GroundTruthError, match=re.escape(message)):
            open_ground_truth(f"coco:{path}")


# --------------------------------------------------------------------------------------------
# Object storage.


@pytest.mark.integration
def test_reads_ground_truth_from_s3(s3_env, data, coco_file, monkeypatch):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("truth")
    tile = data / "aerial_dubai" / "Tile 3" / "masks"
    fs.put(str(tile), "truth/aerial/Tile 3/masks", recursive=True)
    fs.put(str(data / "aerial_dubai" / "palette.json"), "truth/aerial/palette.json")
    fs.put(str(coco_file), "truth/coco/instances.json")
    labels = sorted((data / "camvid_val" / "labels").iterdir())[:3]
    for label in labels:
        fs.put(str(label), f"truth/camvid/{label.name}")

    camvid = open_ground_truth("masks:s3://truth/camvid", ignore_index=CAMVID_VOID)
    local_camvid = open_ground_truth(f"masks:{labels[0].parent}", ignore_index=CAMVID_VOID)
    for label in labels:
        uri = f"s3://images/camvid/{label.name}"
        target = camvid.target(uri)
        assert target.source == f"s3://truth/camvid/{label.name}"
        np.testing.assert_array_equal(target.labels, local_camvid.target(uri).labels)

    aerial = open_ground_truth("masks:s3://truth/aerial?palette=s3://truth/aerial/palette.json")
    uri = "s3://images/aerial/Tile 3/images/image_part_002.jpg"
    target = aerial.target(uri)
    assert target.source == "s3://truth/aerial/Tile 3/masks/image_part_002.png"
    expected = expected_from_colours(tile / "image_part_002.png", aerial_palette(data))
    np.testing.assert_array_equal(target.labels, expected)

    coco = open_ground_truth("coco:s3://truth/coco/instances.json")
    local = open_ground_truth(f"coco:{coco_file}").target("000000193245.jpg")
    remote = coco.target("s3://images/coco/000000193245.jpg")
    assert remote.source == "s3://truth/coco/instances.json#image_id=193245"
    assert remote.annotations == local.annotations

    with pytest.raises(
        GroundTruthError, match=re.escape("s3://truth/nothing.json' does not exist")
    ):
        open_ground_truth("coco:s3://truth/nothing.json")
