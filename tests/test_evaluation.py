"""Evaluation of a run from its Parquet: the card's figures through the real command, slices
equal to evaluating the subset from scratch, COCO mAP equal to pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
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

from segflow.evaluation import (
    EvaluationError,
    coco_results_of_run,
    evaluate_run,
    write_coco_results,
)
from segflow.groundtruth import open_ground_truth
from segflow.manifest import Shard
from segflow.metrics.semantic import ConfusionMatrix
from segflow.scoring import scorer_for
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
        "--soft-metrics",
        "--trimap-width",
        "5",
        "--out",
        str(out),
        log=log,
    )
    assert done.returncode == 0, log.read_text()[-3000:]
    return out


def trimap_from_scratch(run: Path, labels_dir: Path, uris: list[str]) -> np.ndarray:
    """(2, 11): Trimap IoU's summed intersections and unions at r = 5 over ``uris``, from
    the masks decoded by pycocotools and the label files, by tests/test_metrics_trimap.py's
    reference."""
    from tests.test_metrics_trimap import reference_counts

    counts = np.zeros((2, 11), np.int64)
    for uri, prediction in predictions_from_masks(run, uris).items():
        truth = np.array(Image.open(labels_dir / Path(uri).name), dtype=np.int64)
        counts += reference_counts(np.where(truth == 11, -1, truth), prediction, 5, 11)
    return counts


@pytest.mark.integration
@pytest.mark.slow
def test_segment_then_evaluate_reproduces_the_model_card(camvid_run: Path, shared: Path):
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

    # Trimap IoU, as the command printed it, equals the reference's over the 101 frames.
    [run] = camvid_run.glob("run=*")
    assert json.loads((run / "run.json").read_text())["trimap_width"] == 5
    uris = [uri for (uri,) in duckdb.sql(f"SELECT uri FROM '{run}/images/*.parquet'").fetchall()]
    labels_dir = shared / "data" / "camvid_val" / "labels"
    intersection, union = trimap_from_scratch(run, labels_dir, uris)
    assert union.all()  # every class has a band
    assert semantic["per_class_trimap_iou"] == (intersection / union).tolist()
    assert semantic["trimap_miou"] == pytest.approx(np.mean(intersection / union), abs=1e-15)
    assert 0 < semantic["trimap_miou"] < semantic["miou"]
    for name in ("soft_miou", "soft_mdice", "soft_miou_squared", "soft_mdice_squared"):
        assert 0 < semantic[name] < 1, name


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
    intersection, union = trimap_from_scratch(run, labels_dir, uris)
    assert result["per_class_trimap_iou"] == [
        i / u if u else None for i, u in zip(intersection.tolist(), union.tolist(), strict=True)
    ]


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


def per_row_results(run: Path, evaluated: bool) -> list[dict]:
    """The run's COCO results made a row at a time from its whole masks table (the export
    before it streamed), read with pyarrow from the committed files."""
    import pyarrow.parquet as pq

    from segflow.coco_results import coco_results_from_masks
    from segflow.groundtruth import coco_image_id

    store = RunStore(str(run.parent), run.name.removeprefix("run="))
    masks, images = (pq.read_table(store.files(name)) for name in ("masks", "images"))
    if not evaluated:
        return coco_results_from_masks(masks)
    evaluation = json.loads((run / "evaluation.json").read_text())
    category_ids = {name: int(i) for i, name in evaluation["categories"].items()}
    image_ids = {
        row["image_id"]: coco_image_id(row["gt_uri"])
        for row in images.to_pylist()
        if row["gt_uri"] is not None
    }
    kept = [
        i
        for i, row in enumerate(masks.select(["image_id", "class_name"]).to_pylist())
        if row["image_id"] in image_ids and row["class_name"] in category_ids
    ]
    return coco_results_from_masks(masks.take(kept), image_ids=image_ids, category_ids=category_ids)


@pytest.mark.parametrize("evaluated", [True, False], ids=["coco-ids", "run-ids"])
def test_export_coco_streams_the_results_made_row_by_row(instance_run, tmp_path, evaluated):
    """export-coco's JSON, written by DuckDB a batch at a time, parses to the results made a
    row at a time in Python, in the same order (COCOeval breaks score ties by it); without
    evaluation.json, with segflow's own ids."""
    shutil.copytree(instance_run, tmp_path / "out")
    run = tmp_path / "out" / "run=inst"
    if not evaluated:
        (run / "evaluation.json").unlink()
    expected = per_row_results(run, evaluated)
    assert len(expected) > 20
    out = tmp_path / "results.json"
    done = subprocess.run(
        [SEGFLOW, "export-coco", str(run), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"{len(expected)} detections written" in done.stderr
    assert json.loads(out.read_text()) == expected
    # Batches of 7 results: the joins between them, and a last batch shorter than the rest.
    assert write_coco_results(str(run), str(tmp_path / "batched.json"), batch=7) == len(expected)
    assert json.loads((tmp_path / "batched.json").read_text()) == expected
    assert coco_results_of_run(str(run)) == expected


def test_export_coco_of_a_semantic_run_refuses_and_writes_nothing(instance_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segflow import schema

    shutil.copytree(instance_run, tmp_path / "out")
    run = tmp_path / "out" / "run=inst"
    store = RunStore(str(run.parent), "inst")
    tables = {name: pq.read_table(store.files(name)[0]) for name in schema.TABLES}
    masks = tables["masks"]
    at = masks.schema.get_field_index("instance")
    tables["masks"] = masks.set_column(at, masks.field(at), pa.nulls(len(masks), pa.int32()))
    summary = {"shard": 2, "images": 6, "failed": 0, "not_evaluated": 0, "masks": len(masks)}
    store.commit_shard(Shard(2, 12, 18), tables, summary)
    out = tmp_path / "results.json"
    done = subprocess.run(
        [SEGFLOW, "export-coco", str(run), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "is a semantic run: COCO results are detections" in done.stderr
    assert not out.exists()


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


def test_soft_metrics_equal_the_softmax_of_the_graph(shared: Path, tmp_path: Path):
    from segflow.models import load_model
    from segflow.shard import segment_images

    model_path = shared / "models" / "espnet_camvid.pt2"
    labels_dir = shared / "data" / "camvid_val" / "labels"
    uris = sorted(str(p) for p in (shared / "data" / "camvid_val" / "images").glob("*.png"))[:3]
    gt = f"masks:{labels_dir}"
    model = load_model(model_path, device="cpu", return_probabilities=True)
    result = segment_images(
        model, uris, run_id="soft", ground_truth=open_ground_truth(gt, ignore_index=11)
    )
    store = RunStore(str(tmp_path), "soft")
    store.prepare({"input": "soft"})
    store.commit_shard(Shard(0, 0, len(uris)), result.tables, {"shard": 0})
    store.write_json(
        "evaluation.json",
        {"task": "semantic", "classes": list(model.classes), "gt": gt, "ignore_index": 11},
    )
    semantic = evaluate_run(str(tmp_path))["semantic"]

    # From scratch: the exported graph's logits (480x360 needs no padding), softmax, sums.
    graph = torch.export.load(model_path).module()
    intersection, union, squared_union = np.zeros(11), np.zeros(11), np.zeros(11)
    for uri in uris:
        pixels = torch.from_numpy(np.array(Image.open(uri).convert("RGB"))).permute(2, 0, 1)
        with torch.inference_mode():
            probabilities = torch.softmax(graph(pixels[None].float() / 255)[0], 0).double()
        truth = np.array(Image.open(labels_dir / Path(uri).name), dtype=np.int64)
        valid = truth != 11
        p = probabilities.numpy()[:, valid]
        onehot = np.eye(11)[truth[valid]].T
        intersection += (p * onehot).sum(1)
        union += p.sum(1) + onehot.sum(1) - (p * onehot).sum(1)
        squared_union += (p**2).sum(1) + (onehot**2).sum(1) - (p * onehot).sum(1)
    for suffix, denominator in (("", union), ("_squared", squared_union)):
        expected = intersection / denominator
        dice = 2 * intersection / (denominator + intersection)
        np.testing.assert_allclose(semantic[f"per_class_soft_iou{suffix}"], expected, rtol=1e-6)
        assert semantic[f"soft_miou{suffix}"] == pytest.approx(expected.mean(), rel=1e-6)
        assert semantic[f"soft_mdice{suffix}"] == pytest.approx(dice.mean(), rel=1e-6)
    assert semantic["soft_miou"] < semantic["miou"]  # probabilities below 1 cost soft IoU
    assert semantic["soft_miou"] < semantic["soft_miou_squared"]  # ... squared, less


def test_an_annotation_one_iou_type_cannot_use_leaves_the_shard_state_whole(coco_subset):
    from dataclasses import replace

    from segflow.metrics.instance import CocoEvalError
    from tests.conftest import jittered_detections

    gt_path, coco = coco_subset
    ground_truth = open_ground_truth(f"coco:{gt_path}")
    names = ["N/A"] * (max(coco.cats) + 1)
    for category_id, category in coco.cats.items():
        names[category_id] = category["name"]
    model = SimpleNamespace(name="jitter", classes=tuple(names), task="instance")
    scorer = scorer_for(ground_truth, model.classes, "instance")
    rng = np.random.default_rng(0)
    uris = [f"/x/{coco.imgs[i]['file_name']}" for i in sorted(coco.imgs)[:2]]
    targets = [ground_truth.target(uri) for uri in uris]
    predictions = [jittered_detections(coco, int(t.source.rsplit("=", 1)[1]), rng) for t in targets]
    rows = [mask_rows(p, model, run_id="r", uri=u) for p, u in zip(predictions, uris, strict=True)]
    scorer.score(1, uris[0], predictions[0], rows[0], targets[0])
    # Masks still evaluate (segm) but boxes cannot (bbox): the image must land in neither.
    boxless = replace(
        targets[1],
        annotations=[{k: v for k, v in a.items() if k != "bbox"} for a in targets[1].annotations],
    )
    with pytest.raises(CocoEvalError, match="bbox"):
        scorer.score(2, uris[1], predictions[1], rows[1], boxless)
    tables = scorer.tables("r")
    for name in ("coco_detections", "coco_ground_truth"):
        assert set(tables[name].column("image_id").to_pylist()) == {1}
        assert set(tables[name].column("iou_type").to_pylist()) == {"segm", "bbox"}
