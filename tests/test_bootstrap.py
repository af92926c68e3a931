"""Bootstrap intervals and paired comparisons (segflow.bootstrap), on real DuckDB and Parquet
runs and against pycocotools' COCOeval on literally resampled datasets.

The semantic data sets are drawn from a known population, so that the true dataset figures
(the limits of the summed counts' ratios) are known in closed form."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from segflow import schema
from segflow.bootstrap import (
    _POISSON_THRESHOLDS,
    Bootstrap,
    BootstrapError,
    compare_runs,
    figure_replicates,
    image_weights,
    intervals,
)
from segflow.evaluation import EvaluationError, evaluate_run, headline_figures
from segflow.manifest import Shard
from segflow.metrics.figures import INTEGER_SUMS, ClassSums
from segflow.store import RunStore
from tests.test_metrics_instance import (
    assert_same_as_coco,
    coco_reference,
    evaluator_for,
    per_image,
    random_dataset,
    update_all,
)

CLASSES = ["road", "car", "person"]
# The population: per class, how often it is in an image, the Beta(a, b) share of its pixels
# found, and the false-positive pixels per image (times a per-image factor of mean 1).
PRESENCE = np.array([1.0, 0.7, 0.3])
FOUND_A, FOUND_B = np.array([9.0, 4.0, 2.0]), np.array([1.0, 2.0, 3.0])
FALSE_POSITIVES = np.array([300, 200, 150])
MEAN_GT = PRESENCE * 999.5  # gt pixels: uniform integers in [0, 2000) where present


def true_figures() -> dict[str, float]:
    intersection = MEAN_GT * FOUND_A / (FOUND_A + FOUND_B)
    union = MEAN_GT + FALSE_POSITIVES
    return {
        "semantic/miou": float(np.mean(intersection / union)),
        "semantic/pixel_accuracy": float(intersection.sum() / MEAN_GT.sum()),
    }


def population_counts(rng: np.random.Generator, n_images: int) -> dict[str, np.ndarray]:
    """Per count column, (images, classes) integers drawn from the population."""
    shape = (n_images, len(CLASSES))
    gt = rng.integers(0, 2000, shape) * (rng.random(shape) < PRESENCE)
    intersection = rng.binomial(gt, rng.beta(FOUND_A, FOUND_B, shape))
    false_positive = rng.binomial(2 * FALSE_POSITIVES, rng.random((n_images, 1)))
    pred = intersection + false_positive
    union = gt + pred - intersection
    return {
        "gt_pixels": gt,
        "pred_pixels": pred,
        "intersection": intersection,
        "union": union,
        "boundary_intersection": intersection // 4,
        "boundary_union": union // 3,
        "trimap_intersection": intersection // 2,
        "trimap_union": union // 2,
    }


def uris(n_images: int) -> list[str]:
    return [f"/data/frames/frame-{i:05d}.png" for i in range(n_images)]


def class_stats(run_id: str, counts: dict[str, np.ndarray]) -> pa.Table:
    """One row per (image, class) with ground truth or prediction, as the workers write."""
    n_images = counts["gt_pixels"].shape[0]
    image_ids = np.array([schema.image_id_for(u) for u in uris(n_images)], np.int64)
    image, klass = np.nonzero((counts["gt_pixels"] > 0) | (counts["pred_pixels"] > 0))
    columns = {
        "run_id": [run_id] * len(image),
        "image_id": image_ids[image],
        "class_id": klass.astype(np.int32),
        "class_name": np.array(CLASSES)[klass],
        **{name: counts[name][image, klass] for name in schema.CLASS_COUNTS},
    }
    return table_of("class_stats", columns, len(image))


def table_of(name: str, columns: dict, rows: int) -> pa.Table:
    """Table ``name`` with ``columns``, the others null."""
    fields = schema.TABLES[name]
    return pa.table(
        {
            field.name: pa.array(columns[field.name], field.type)
            if field.name in columns
            else pa.nulls(rows, field.type)
            for field in fields
        },
        schema=fields,
    )


def write_run(out: Path, run_id: str, counts: dict[str, np.ndarray]) -> str:
    """A finished semantic run (one shard) of the images ``counts`` describes."""
    n_images = counts["gt_pixels"].shape[0]
    store = RunStore(str(out), run_id)
    store.prepare({"input": run_id})
    names = uris(n_images)
    images = table_of(
        "images",
        {
            "run_id": [run_id] * n_images,
            "image_id": [schema.image_id_for(u) for u in names],
            "uri": names,
            "status": ["ok"] * n_images,
            "num_masks": [0] * n_images,
            "model": ["synthetic"] * n_images,
            "processed_at": [datetime.now(UTC)] * n_images,
            "gt_uri": [u.replace("frames", "labels") for u in names],
        },
        n_images,
    )
    tables = {name: fields.empty_table() for name, fields in schema.TABLES.items()}
    tables |= {"images": images, "class_stats": class_stats(run_id, counts)}
    summary = {"shard": 0, "images": n_images, "failed": 0, "not_evaluated": 0, "masks": 0}
    store.commit_shard(Shard(0, 0, n_images), tables, summary)
    store.write_json(
        "evaluation.json",
        {"task": "semantic", "classes": CLASSES, "gt": "masks:/data/labels", "ignore_index": None},
    )
    store.finish({"images": n_images, "failed": 0, "not_evaluated": 0, "masks": 0})
    return store.root


def connection(counts: dict[str, np.ndarray]) -> duckdb.DuckDBPyConnection:
    """DuckDB holding ``class_stats`` and ``evaluated`` (all images), as evaluation's are."""
    db = duckdb.connect()
    table = class_stats("r", counts)
    db.register("class_stats", table)
    n_images = counts["gt_pixels"].shape[0]
    db.register(
        "evaluated",
        pa.table({"image_id": [schema.image_id_for(u) for u in uris(n_images)]}),
    )
    return db


SEMANTIC = {"task": "semantic", "classes": CLASSES}


# --------------------------------------------------------------------------------------------
# Weights.


def test_weights_are_poisson_one_and_depend_on_the_image_alone():
    ids = np.array([schema.image_id_for(u) for u in uris(20_000)], np.int64)
    weights = image_weights(ids, np.arange(50), seed=7)
    counts = np.bincount(weights.ravel(), minlength=8)[:8] / weights.size
    poisson = np.exp(-1) / np.array([1, 1, 2, 6, 24, 120, 720, 5040])
    np.testing.assert_allclose(counts[:5], poisson[:5], rtol=0.02)
    # An image's weight is the same whatever images come with it (slices, paired runs).
    np.testing.assert_array_equal(image_weights(ids[::7], np.arange(50), 7), weights[:, ::7])
    np.testing.assert_array_equal(image_weights(ids, np.arange(50), 7), weights)
    assert not np.array_equal(image_weights(ids, np.arange(50), 8), weights)


def test_weights_at_the_poisson_thresholds_are_exact():
    from segflow import bootstrap

    # Hashes on, just below and just above every threshold, and the extremes.
    hashed = np.concatenate(
        [
            _POISSON_THRESHOLDS,
            _POISSON_THRESHOLDS - np.uint64(1),
            _POISSON_THRESHOLDS + np.uint64(1),
            np.array([0, 2**64 - 1], np.uint64),
        ]
    )
    cell = hashed >> np.uint64(64 - bootstrap._CELL_BITS)
    looked_up = bootstrap._CELL_WEIGHT[cell].astype(np.int64)
    split = bootstrap._CELL_SPLIT[cell]
    exact = np.searchsorted(_POISSON_THRESHOLDS, hashed, side="right")
    np.testing.assert_array_equal(looked_up[~split], exact[~split])
    assert split[: len(_POISSON_THRESHOLDS)].all()


def test_bad_settings_are_named():
    for settings, named in (
        ({"level": 1.5}, "--ci"),
        ({"replicates": 1}, "--bootstrap"),
        ({"seed": -1}, "--seed"),
    ):
        with pytest.raises(BootstrapError, match=named):
            Bootstrap(**settings)


# --------------------------------------------------------------------------------------------
# Semantic intervals.


def test_intervals_cover_the_true_figures_at_the_nominal_rate():
    truth = true_figures()
    covered = dict.fromkeys(truth, 0)
    for repetition in range(100):
        counts = population_counts(np.random.default_rng(repetition), 150)
        replicates = figure_replicates(
            SEMANTIC, connection(counts), Bootstrap(0.95, 100, seed=repetition)
        )
        for name, interval in intervals(replicates, 0.95).items():
            if name in truth:
                covered[name] += interval.low <= truth[name] <= interval.high
    assert all(90 <= hits <= 100 for hits in covered.values()), covered


def test_the_replicates_are_evaluations_of_the_resampled_images():
    """Replicate b equals evaluating the dataset that holds each image w_b times, exactly."""
    counts = population_counts(np.random.default_rng(1), 40)
    ids = np.array([schema.image_id_for(u) for u in uris(40)], np.int64)
    weights = image_weights(ids, np.arange(6), seed=3)
    replicates = figure_replicates(SEMANTIC, connection(counts), Bootstrap(0.9, 6, seed=3))
    for b in range(6):
        repeated = {name: np.repeat(values, weights[b], axis=0) for name, values in counts.items()}
        expected = headline_figures(
            {"semantic": ClassSums(**{n: repeated[n].sum(axis=0) for n in INTEGER_SUMS}).figures()}
        )
        for name, value in expected.items():
            assert replicates[name][b] == value, name


def test_same_seed_same_intervals_and_a_slice_reuses_the_run_s_weights(tmp_path: Path):
    run = write_run(tmp_path / "out", "a", population_counts(np.random.default_rng(2), 200))
    first = evaluate_run(run, bootstrap=Bootstrap(0.95, 200, seed=11))
    assert first == evaluate_run(run, bootstrap=Bootstrap(0.95, 200, seed=11))
    assert (
        first["intervals"]
        != evaluate_run(run, bootstrap=Bootstrap(0.95, 200, seed=12))["intervals"]
    )
    assert first["bootstrap"]["method"].startswith("percentile")
    assert set(first["intervals"]) == set(headline_figures(first))
    for name, (low, high) in first["intervals"].items():
        assert low < headline_figures(first)[name] < high, name
    sliced = evaluate_run(run, where="uri < '/data/frames/frame-00100'", bootstrap=Bootstrap())
    assert sliced["images"]["evaluated"] == 100
    low, high = sliced["intervals"]["semantic/miou"]
    assert (
        high - low > first["intervals"]["semantic/miou"][1] - first["intervals"]["semantic/miou"][0]
    )


# --------------------------------------------------------------------------------------------
# COCO: per-image records resampled, against COCOeval on the resampled dataset.


def resampled_dataset(dataset: dict, detections: list[dict], counts: dict[int, int]):
    """The dataset holding image i counts[i] times, copy c of the k-th image numbered
    100 k + c + 1 (so that the copies stand where the image stood in id order)."""
    place = {
        image["id"]: k for k, image in enumerate(sorted(dataset["images"], key=lambda i: i["id"]))
    }
    images, annotations, results = [], [], []
    next_id = 1
    for image in dataset["images"]:
        for c in range(counts[image["id"]]):
            new = 100 * place[image["id"]] + c + 1
            images.append(image | {"id": new})
            for annotation in dataset["annotations"]:
                if annotation["image_id"] == image["id"]:
                    annotations.append(annotation | {"image_id": new, "id": next_id})
                    next_id += 1
            results += [d | {"image_id": new} for d in detections if d["image_id"] == image["id"]]
    return {**dataset, "images": images, "annotations": annotations}, results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_resampled_coco_records_equal_cocoeval_on_the_resampled_dataset(iou_type, seed):
    dataset, detections = random_dataset(seed, iou_type, 8, 3, crowded=seed == 3)
    for annotation in dataset["annotations"]:
        annotation["id"] += 1  # an id 0 ("no match" to COCOeval) cannot be copied
    evaluator = update_all(evaluator_for(dataset, iou_type), per_image(dataset, detections))
    ids = np.array(sorted(image["id"] for image in dataset["images"]), np.int64)
    weights = image_weights(ids, np.arange(4), seed)
    assert (weights > 1).any() and (weights == 0).any()
    for counts, scores in zip(weights, evaluator.compute_resampled(weights), strict=True):
        resampled, results = resampled_dataset(
            dataset, detections, dict(zip(ids.tolist(), counts.tolist(), strict=True))
        )
        if not results:
            continue
        assert_same_as_coco(scores, coco_reference(resampled, results, iou_type))


def test_instance_run_intervals(instance_run):
    first = evaluate_run(str(instance_run), bootstrap=Bootstrap(0.9, 40, seed=5))
    again = evaluate_run(str(instance_run), bootstrap=Bootstrap(0.9, 40, seed=5))
    assert first["intervals"] == again["intervals"]
    for name in ("segm/AP", "segm/AP50", "segm/AP75", "bbox/AP"):
        low, high = first["intervals"][name]
        assert low <= high
    assert (
        first["intervals"]
        != evaluate_run(str(instance_run), bootstrap=Bootstrap(0.9, 40, seed=6))["intervals"]
    )


# --------------------------------------------------------------------------------------------
# Paired comparisons.


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """A run, the same images with a planted drop (class 'car' found 15% less often), and
    with one image's predictions broken."""
    out = tmp_path_factory.mktemp("paired")
    counts = population_counts(np.random.default_rng(4), 300)
    dropped = {name: values.copy() for name, values in counts.items()}
    lost = np.random.default_rng(5).binomial(dropped["intersection"][:, 1], 0.15)
    dropped["intersection"][:, 1] -= lost
    dropped["pred_pixels"][:, 1] -= lost
    dropped["boundary_intersection"] = dropped["intersection"] // 4
    one_image = {name: values.copy() for name, values in counts.items()}
    one_image["intersection"][7] = 0
    one_image["boundary_intersection"][7] = 0
    return {
        "base": write_run(out, "base", counts),
        "dropped": write_run(out, "dropped", dropped),
        "one_image": write_run(out, "one", one_image),
    }


def test_a_run_compared_with_itself_never_drops(runs):
    for seed in range(5):
        comparison = compare_runs(runs["base"], runs["base"], Bootstrap(0.95, 200, seed))
        assert comparison.shared_images == 300
        for change in comparison.changes.values():
            assert change.difference == 0
            assert (change.interval.low, change.interval.high) == (0, 0)
            assert not change.dropped


def test_a_planted_drop_is_flagged(runs):
    comparison = compare_runs(runs["dropped"], runs["base"], Bootstrap(0.95, 300, seed=1))
    miou = comparison.changes["semantic/miou"]
    assert miou.dropped and miou.interval.low < miou.difference < miou.interval.high < 0
    # The other way round is a rise.
    assert (
        not compare_runs(runs["base"], runs["dropped"], Bootstrap(0.95, 300, seed=1))
        .changes["semantic/miou"]
        .dropped
    )


def test_a_drop_carried_by_one_image_is_within_the_interval(runs):
    comparison = compare_runs(runs["one_image"], runs["base"], Bootstrap(0.95, 300, seed=1))
    miou = comparison.changes["semantic/miou"]
    assert miou.difference < -0.001  # a fixed threshold of 0.001 would flag it
    assert not miou.dropped and miou.interval.high == 0


def test_runs_are_compared_on_the_images_they_share(runs):
    comparison = compare_runs(
        runs["dropped"],
        runs["base"],
        Bootstrap(0.95, 100),
        where="uri < '/data/frames/frame-00200'",
        baseline_where="uri >= '/data/frames/frame-00100'",
    )
    assert comparison.shared_images == 100
    with pytest.raises(EvaluationError, match="no image in common"):
        compare_runs(
            runs["dropped"],
            runs["base"],
            Bootstrap(0.95, 100),
            where="uri < '/data/frames/frame-00100'",
            baseline_where="uri >= '/data/frames/frame-00100'",
        )


# --------------------------------------------------------------------------------------------
# The command line.


def test_evaluate_and_report_show_the_intervals(runs, tmp_path: Path):
    from typer.testing import CliRunner

    from segflow.cli import app

    command = ["evaluate", runs["base"], "--ci", "0.9", "--bootstrap", "50", "--seed", "3"]
    result = CliRunner().invoke(app, [*command, "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    expected = evaluate_run(runs["base"], bootstrap=Bootstrap(0.9, 50, 3))
    assert printed["intervals"] == expected["intervals"]
    assert printed["bootstrap"] == {**Bootstrap(0.9, 50, 3).describe()}
    table = CliRunner().invoke(app, command)
    assert table.exit_code == 0 and "90% bootstrap intervals (50 replicates)" in table.output
    low, high = expected["intervals"]["semantic/miou"]
    assert f"semantic/miou: [{low:.6f}, {high:.6f}]" in table.output

    page = tmp_path / "report.html"
    reported = CliRunner().invoke(
        app,
        [
            "report",
            runs["base"],
            "--out",
            str(page),
            "--worst",
            "0",
            "--ci",
            "0.9",
            "--bootstrap",
            "50",
            "--seed",
            "3",
        ],
    )
    assert reported.exit_code == 0, reported.output
    assert f"[{low:.3f}, {high:.3f}]" in page.read_text()

    refused = CliRunner().invoke(app, ["evaluate", runs["base"], "--ci", "95"])
    assert refused.exit_code == 2 and "--ci must be a level between 0 and 1" in refused.output
