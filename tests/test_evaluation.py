"""Evaluation of a run from its Parquet: the card's figures through the real command, slices
equal to evaluating the subset from scratch, COCO mAP equal to pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segflow import schema
from segflow.evaluation import EvaluationError, coco_results_of_run, evaluate_run
from segflow.groundtruth import open_ground_truth
from segflow.manifest import Shard
from segflow.metrics.semantic import ConfusionMatrix
from segflow.prediction import InstancePrediction
from segflow.scoring import ImageScorer
from segflow.shard import mask_rows
from segflow.store import RunStore

SEGFLOW = str(Path(sys.executable).with_name("segflow"))
CARD_MIOU, CARD_PIXEL_ACCURACY = 0.694086, 0.932969  # espnet_camvid.json's reference


def segflow(*args: str, log: Path) -> subprocess.CompletedProcess:
    with log.open("a") as out:  # a file, not a pipe nobody reads while Ray and Prefect talk
        return subprocess.run(
            [SEGFLOW, *args], stdout=out, stderr=subprocess.STDOUT, timeout=600, check=False
        )


@pytest.fixture(scope="module")
def camvid_run(shared: Path, tmp_path_factory) -> Path:
    """The issue's command: segment CamVid val with ground truth, on local Ray and Prefect."""
    out = tmp_path_factory.mktemp("camvid") / "out"
    log = out.parent / "segment.log"
    done = segflow(
        "segment",
        str(shared / "data" / "camvid_val" / "images"),
        "--model",
        str(shared / "models" / "espnet_camvid.pt2"),
        "--gt",
        f"masks:{shared / 'data' / 'camvid_val' / 'labels'}",
        "--ignore-index",
        "11",
        "--shard-size",
        "32",
        "--out",
        str(out),
        log=log,
    )
    assert done.returncode == 0, log.read_text()[-3000:]
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_segment_then_evaluate_reproduces_the_model_card(camvid_run: Path):
    printed = subprocess.run(
        [SEGFLOW, "evaluate", str(camvid_run), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(printed.stdout)
    assert result["images"] == {"selected": 101, "evaluated": 101}
    semantic = result["semantic"]
    assert semantic["miou"] == pytest.approx(CARD_MIOU, abs=1e-4)
    assert semantic["pixel_accuracy"] == pytest.approx(CARD_PIXEL_ACCURACY, abs=1e-4)
    assert len(semantic["per_class_iou"]) == 11
    assert 0 < semantic["boundary_iou"] < semantic["miou"]  # boundaries are the hard part


def predictions_from_masks(run: Path, uris: list[str]) -> dict[str, np.ndarray]:
    """Each image's label map rebuilt from its RLE masks with pycocotools."""
    rows = duckdb.sql(
        f"SELECT uri, class_id, counts, height, width FROM '{run}/masks/*.parquet'"
    ).fetchall()
    labels = {}
    for uri, class_id, counts, height, width in rows:
        if uri in uris:
            label = labels.setdefault(uri, np.full((height, width), -1, np.int64))
            label[coco_mask.decode({"size": [height, width], "counts": counts}) == 1] = class_id
    return labels


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    "where",
    ["uri LIKE '%0016E5_079%'", "image_id % 3 = 0", "height = 360 AND uri LIKE '%0016E5_08%'"],
)
def test_a_slice_equals_evaluating_its_images_from_scratch(camvid_run: Path, shared, where):
    [run] = camvid_run.glob("run=*")
    result = evaluate_run(str(camvid_run), where=where)["semantic"]

    uris = [
        uri
        for (uri,) in duckdb.sql(
            f"SELECT uri FROM '{run}/images/*.parquet' WHERE {where}"
        ).fetchall()
    ]
    labels_dir = shared / "data" / "camvid_val" / "labels"
    scratch = ConfusionMatrix(11, ignore_index=11)
    for uri, prediction in predictions_from_masks(run, uris).items():
        truth = np.array(Image.open(labels_dir / Path(uri).name), dtype=np.int64)
        scratch.update(truth, prediction)
    expected = scratch.compute()
    assert result["miou"] == expected.miou  # exact: both are sums of the same integers
    assert result["pixel_accuracy"] == expected.pixel_accuracy
    assert result["mean_accuracy"] == expected.mean_accuracy
    assert result["fwiou"] == expected.fwiou
    assert result["mdice"] == expected.mdice
    np.testing.assert_array_equal(
        np.array(result["per_class_iou"], dtype=float), expected.per_class_iou
    )


def test_a_bad_slice_or_a_run_without_ground_truth_is_a_clear_error(camvid_run: Path, tmp_path):
    with pytest.raises(EvaluationError, match="no_such_column"):
        evaluate_run(str(camvid_run), where="no_such_column = 1")
    with pytest.raises(EvaluationError, match="expected one run folder"):
        evaluate_run(str(tmp_path))
    store = RunStore(str(tmp_path), "plain")
    store.prepare({"input": "x"})
    with pytest.raises(EvaluationError, match="without ground truth"):
        evaluate_run(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Instance runs: the workers' COCOeval records, pooled for the run or a slice, against
# pycocotools on the COCO results the run exports.


@pytest.fixture(scope="module")
def coco_subset(shared: Path) -> tuple[Path, COCO]:
    path = shared / "data" / "coco_val2017_10" / "annotations" / "instances_val2017_subset.json"
    with contextlib.redirect_stdout(io.StringIO()):
        return path, COCO(str(path))


def jittered_detections(coco: COCO, image_id: int, rng) -> InstancePrediction:
    """Detections near the image's objects (some with the wrong category), and false
    positives, scores with one decimal so that ties occur."""
    image = coco.imgs[image_id]
    height, width = image["height"], image["width"]
    masks, labels = [], []
    for annotation in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
        mask = coco.annToMask(annotation)
        for _ in range(int(rng.integers(0, 3))):
            masks.append(np.roll(mask, rng.integers(-6, 7, 2), axis=(0, 1)))
            wrong = rng.random() < 0.15
            labels.append(
                int(rng.choice(sorted(coco.cats))) if wrong else annotation["category_id"]
            )
    for _ in range(int(rng.integers(1, 4))):
        mask = np.zeros((height, width), np.uint8)
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        mask[y : y + int(rng.integers(4, 40)), x : x + int(rng.integers(4, 40))] = 1
        masks.append(mask)
        labels.append(int(rng.choice(sorted(coco.cats))))
    stacked = torch.from_numpy(np.stack(masks).astype(bool))
    boxes = np.array([coco_mask.toBbox(coco_mask.encode(np.asfortranarray(m))) for m in masks])
    boxes = torch.from_numpy(boxes + rng.normal(0, 2, boxes.shape))
    scores = torch.from_numpy(np.round(rng.random(len(masks)), 1))
    order = torch.argsort(scores, descending=True, stable=True)
    return InstancePrediction(
        boxes=boxes[order].float(),
        labels=torch.tensor(labels)[order],
        scores=scores[order].float(),
        masks=stacked[order],
    )


@pytest.fixture(scope="module")
def instance_run(coco_subset, shared: Path, tmp_path_factory) -> Path:
    """A run of an instance "model" whose detections are jittered ground truth, written by
    the workers' code path (mask rows, ImageScorer, commit) over two shards."""
    gt_path, coco = coco_subset
    out = tmp_path_factory.mktemp("instance") / "out"
    store = RunStore(str(out), "inst")
    store.prepare({"input": "coco"})
    names = ["N/A"] * (max(coco.cats) + 1)
    for category_id, category in coco.cats.items():
        names[category_id] = category["name"]
    model = SimpleNamespace(name="jitter", classes=tuple(names), task="instance")
    ground_truth = open_ground_truth(f"coco:{gt_path}")
    images_dir = shared / "data" / "coco_val2017_10" / "images"
    uris = [str(images_dir / coco.imgs[i]["file_name"]) for i in sorted(coco.imgs)]
    rng = np.random.default_rng(3)
    for index, shard_uris in enumerate((uris[:6], uris[6:])):
        scorer = ImageScorer(ground_truth, model.classes, "instance")
        masks, images = [], []
        for uri in shard_uris:
            image_id = schema.image_id_for(uri)
            target = ground_truth.target(uri)
            prediction = jittered_detections(coco, int(target.source.rsplit("=", 1)[1]), rng)
            rows = mask_rows(prediction, model, run_id="inst", uri=uri)
            figures = scorer.score(image_id, uri, prediction, rows, target)
            masks += rows
            images.append(image_row(uri, prediction, len(rows), figures))
        tables = {"masks": masks, "images": images, "errors": []}
        store.commit_shard(
            Shard(index, index * 6, index * 6 + len(shard_uris)),
            {name: schema.table_from_rows(name, rows) for name, rows in tables.items()}
            | scorer.tables("inst"),
            {"shard": index},
        )
    store.write_json(
        "evaluation.json",
        {
            "task": "instance",
            "classes": list(names),
            "gt": f"coco:{gt_path}",
            "ignore_index": None,
            "categories": {str(k): v["name"] for k, v in coco.cats.items()},
        },
    )
    return out


def image_row(uri: str, prediction, num_masks: int, figures: dict) -> dict:
    from datetime import UTC, datetime

    return {
        "run_id": "inst",
        "image_id": schema.image_id_for(uri),
        "uri": uri,
        "status": "ok",
        "height": prediction.height,
        "width": prediction.width,
        "num_masks": num_masks,
        "read_ms": None,
        "decode_ms": None,
        "infer_ms": None,
        "encode_ms": None,
        "model": "jitter",
        "processed_at": datetime.now(UTC),
        **figures,
    }


def cocoeval_stats(coco: COCO, results: list[dict], iou_type: str, image_ids=None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(results), iou_type)
        if image_ids is not None:
            evaluation.params.imgIds = sorted(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


@pytest.mark.parametrize("where", [None, "uri LIKE '%000000%1%'", "image_id % 2 = 1"])
def test_instance_run_equals_cocoeval_on_its_exported_results(instance_run, coco_subset, where):
    _, coco = coco_subset
    result = evaluate_run(str(instance_run), where=where)
    results = coco_results_of_run(str(instance_run))
    [run] = instance_run.glob("run=*")
    selected = [
        int(gt_uri.rsplit("=", 1)[1])
        for (gt_uri,) in duckdb.sql(
            f"SELECT gt_uri FROM '{run}/images/*.parquet' WHERE {where or 'TRUE'}"
        ).fetchall()
    ]
    assert result["images"]["evaluated"] == len(selected) > 0
    # segflow scores a mask by its own area; pycocotools takes the box's when results have one.
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    expected = {
        "segm": cocoeval_stats(coco, masks_only, "segm", selected),
        "bbox": cocoeval_stats(coco, results, "bbox", selected),
    }
    for iou_type, stats in expected.items():
        np.testing.assert_array_equal(result["instance"][iou_type]["stats"], stats)
        assert 0.05 < stats[0] < 0.95  # a meaningful figure, not an empty evaluation
    if where is None:
        per_class = result["instance"]["segm"]["per_class_ap"]
        assert set(per_class) == {c["name"] for c in coco.cats.values()}


def test_export_coco_writes_what_load_res_reads(instance_run, coco_subset, tmp_path):
    _, coco = coco_subset
    out = tmp_path / "results.json"
    subprocess.run(
        [SEGFLOW, "export-coco", str(instance_run), str(out)], check=True, capture_output=True
    )
    results = json.loads(out.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = coco.loadRes(results)
    assert len(loaded.anns) == len(results) > 10
    assert {r["image_id"] for r in results} <= set(coco.imgs)


def test_evaluate_cli_scores_a_results_file_as_cocoeval(instance_run, coco_subset, tmp_path):
    gt_path, coco = coco_subset
    results = coco_results_of_run(str(instance_run))
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    printed = subprocess.run(
        [
            SEGFLOW,
            "evaluate",
            "--gt",
            f"coco:{gt_path}",
            "--predictions",
            str(path),
            "--iou-type",
            "bbox",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(printed.stdout)["instance"]["bbox"]["stats"]
    np.testing.assert_array_equal(stats, cocoeval_stats(coco, results, "bbox"))


@pytest.mark.integration
@pytest.mark.slow
def test_the_confusion_matrix_sums_to_the_class_counts(camvid_run: Path):
    semantic = evaluate_run(str(camvid_run))["semantic"]
    confusion = np.array(semantic["confusion"])
    np.testing.assert_array_equal(confusion.sum(axis=1), semantic["gt_pixels"])
    np.testing.assert_array_equal(confusion.sum(axis=0), semantic["pred_pixels"])
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    np.testing.assert_array_equal(iou, semantic["per_class_iou"])
