"""Cityscapes' conventions: the tables against cityscapesScripts, its layout through
``masks:``, and (below) its figures against its own evaluation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers import labels as reference
from PIL import Image

from segflow import cityscapes
from segflow.evaluation import evaluate_run
from segflow.groundtruth import (
    IGNORE,
    GroundTruthError,
    Instances,
    SemanticTarget,
    open_ground_truth,
)
from segflow.manifest import Shard
from segflow.prediction import SemanticPrediction
from segflow.report import render_report
from segflow.scoring import SemanticScorer
from segflow.shard import segment_images
from segflow.store import RunStore
from tests.cityscapes_layout import write_dataset

SPEC = "?image_suffix=_leftImg8bit.png&suffix=_gtFine_labelIds.png&id_map=cityscapes"
INSTANCES = "&instances=_gtFine_instanceIds.png"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    return root, write_dataset(root)


def test_tables_are_cityscapes_scripts():
    assert [
        (label.name, label.label_id, label.train_id, label.category, label.has_instances)
        for label in cityscapes.LABELS
    ] == [
        (
            label.name,
            label.id,
            None if label.ignoreInEval else label.trainId,
            label.category,
            label.hasInstances,
        )
        for label in reference.labels
    ]
    assert sorted(cityscapes.TRAIN_IDS.values()) == list(range(19))
    assert list(cityscapes.CATEGORIES) == [c for c in reference.category2labels if c != "void"]
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as evaluation

    assert {
        reference.trainId2label[train_id].name: size
        for train_id, size in cityscapes.AVERAGE_INSTANCE_SIZE.items()
    } == {
        name: size
        for name, size in evaluation.args.avgClassSize.items()
        if not reference.name2label[name].ignoreInEval
    }
    assert cityscapes.INSTANCE_CATEGORIES == ("human", "vehicle")


def test_parallel_trees_match_by_suffix_and_map_to_train_ids(dataset):
    root, frames = dataset
    ground_truth = open_ground_truth(f"masks:{root / 'gtFine'}{SPEC}{INSTANCES}")
    assert set(ground_truth.label_values()) == set(range(19))
    for frame in frames:
        target = ground_truth.target(str(frame.image))
        assert target.source == f"file://{frame.label_ids}"
        label_ids = np.array(Image.open(frame.label_ids))
        expected = np.vectorize(lambda v: cityscapes.TRAIN_IDS.get(int(v), IGNORE))(label_ids)
        np.testing.assert_array_equal(target.labels, expected)
        raw = np.array(Image.open(frame.instance_ids))
        # Car and person instances are kept; the caravan (not evaluated) and crowds are not.
        kept = (raw > 1000) & np.isin(raw // 1000, [24, 26])
        np.testing.assert_array_equal(target.instances.ids, np.where(kept, raw, 0))
        assert target.instances.classes == {
            int(v): cityscapes.TRAIN_IDS[int(v) // 1000] for v in np.unique(raw[kept])
        }
    # Without instances= a target has none.
    plain = open_ground_truth(f"masks:{root / 'gtFine'}{SPEC}")
    assert plain.target(str(frames[0].image)).instances is None


def test_cityscapes_matching_errors_name_the_image(dataset, tmp_path):
    root, frames = dataset
    ground_truth = open_ground_truth(f"masks:{root / 'gtFine'}{SPEC}")
    with pytest.raises(GroundTruthError, match=r"does not end with image_suffix '_leftImg8bit"):
        ground_truth.target(str(frames[0].prediction))
    stray = tmp_path / "leftImg8bit" / "val" / "bonn" / "x_leftImg8bit.png"
    with pytest.raises(GroundTruthError, match=r"no label file x_gtFine_labelIds.png under"):
        ground_truth.target(str(stray))


class RedTrainIds:
    """A model predicting each pixel's red value as its train id: the generated images carry
    their prediction."""

    task = "semantic"
    name = "red-train-ids"
    classes = tuple(
        label.name
        for label in sorted(
            (label for label in cityscapes.LABELS if label.train_id is not None),
            key=lambda label: label.train_id,
        )
    )

    def predict(self, images):
        return [
            SemanticPrediction(labels=torch.as_tensor(np.asarray(image))[..., 0].to(torch.int64))
            for image in images
        ]


def cityscapes_scripts_result(frames, monkeypatch) -> dict:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as evaluation

    # cityscapesScripts 2.3 calls np.in1d, which NumPy 2.4 removed; np.isin of the flattened
    # array is what it was.
    monkeypatch.setattr(
        np,
        "in1d",
        lambda values, test, invert=False: np.isin(np.ravel(values), test, invert=invert),
        raising=False,
    )

    args = evaluation.args
    args.evalInstLevelScore = True
    args.quiet = True
    args.JSONOutput = False
    args.colorized = False
    args.evalPixelAccuracy = False
    return evaluation.evaluateImgLists(
        [str(frame.prediction) for frame in frames],
        [str(frame.label_ids) for frame in frames],
        args,
    )


def test_figures_equal_cityscapes_scripts(dataset, tmp_path, monkeypatch):
    root, frames = dataset
    gt = f"masks:{root / 'gtFine'}{SPEC}{INSTANCES}"
    model = RedTrainIds()
    result = segment_images(
        model,
        [str(frame.image) for frame in frames],
        run_id="cs",
        ground_truth=open_ground_truth(gt),
    )
    assert not result.tables["errors"].num_rows
    store = RunStore(str(tmp_path), "cs")
    store.prepare({"input": "cs"})
    summary = {"shard": 0, "images": len(frames), "failed": 0, "not_evaluated": 0}
    summary["masks"] = result.tables["masks"].num_rows
    store.commit_shard(Shard(0, 0, len(frames)), result.tables, summary)
    store.write_json(
        "evaluation.json", {"task": "semantic", "classes": list(model.classes), "gt": gt}
    )
    semantic = evaluate_run(str(tmp_path))["semantic"]
    reference = cityscapes_scripts_result(frames, monkeypatch)

    def close(ours, theirs):
        if theirs != theirs:  # NaN: undefined
            return ours is None
        return ours is not None and abs(ours - theirs) < 1e-6

    names = model.classes
    for figure, ours, theirs in (
        ("IoU", semantic["per_class_iou"], reference["classScores"]),
        ("iIoU", semantic["per_class_iiou"], reference["classInstScores"]),
    ):
        for name, value in zip(names, ours, strict=True):
            assert close(value, theirs[name]), (figure, name, value, theirs[name])
    for figure, ours, theirs in (
        ("category IoU", semantic["category_iou"], reference["categoryScores"]),
        ("category iIoU", semantic["category_iiou"], reference["categoryInstScores"]),
    ):
        assert {k: v for k, v in theirs.items() if v == v} == pytest.approx(
            {k: v for k, v in ours.items() if v is not None}, abs=1e-6
        ), figure
    for ours, theirs in (
        ("miou", "averageScoreClasses"),
        ("iiou", "averageScoreInstClasses"),
        ("category_miou", "averageScoreCategories"),
        ("category_miiou", "averageScoreInstCategories"),
    ):
        assert close(semantic[ours], reference[theirs]), (ours, semantic[ours], reference[theirs])
    # The report's table per category shows cityscapesScripts' figures, as 3 decimals.
    page = render_report(str(tmp_path), worst=0)
    rows = re.findall(r'<tr data-category="([^"]+)">(.*?)</tr>', page)
    assert [category for category, _ in rows] == list(cityscapes.CATEGORIES)  # no "void"
    for category, cells in rows:
        for column, key in (("iou", "categoryScores"), ("iiou", "categoryInstScores")):
            text = re.search(rf'data-category-figure="{column}">([^<]+)<', cells).group(1)
            theirs = reference[key][category]
            assert text == ("undefined" if theirs != theirs else f"{theirs:.3f}"), (
                category,
                column,
            )
    # The data exercise what is being compared: instances of both kinds, misses, categories.
    assert 0 < semantic["iiou"] < 1 and semantic["iiou"] != semantic["miou"]
    print({name: semantic[name] for name in ("miou", "iiou", "category_miou", "category_miiou")})


def test_an_image_without_instances_scores_zero_for_the_classes_with_instances():
    labels = np.zeros((4, 6), np.int64)
    labels[:, 3:] = 13  # car pixels, but a crowd: no instance
    target = SemanticTarget(labels, "frame", Instances(np.zeros_like(labels), {}))
    prediction = SemanticPrediction(labels=torch.from_numpy(labels.copy()))
    state = SemanticScorer(RedTrainIds.classes).update(0, prediction, target).state()
    rows = state["class_stats"]
    with_instances = sorted(cityscapes.AVERAGE_INSTANCE_SIZE)
    assert sorted(rows["class_id"].tolist()) == sorted({0, 13, *with_instances})
    for name in ("instance_tp_weighted", "category_fn_weighted"):
        by_class = dict(zip(rows["class_id"].tolist(), rows[name].tolist(), strict=True))
        assert all(by_class[c] == 0.0 for c in with_instances)
        assert np.isnan(by_class[0])
    assert dict(
        zip(rows["class_id"].tolist(), rows["category_intersection"].tolist(), strict=True)
    ) == {c: {0: 12.0, 13: 12.0}.get(c, 0.0) for c in rows["class_id"].tolist()}
    with pytest.raises(GroundTruthError, match="Cityscapes instances are scored for a model of"):
        SemanticScorer([f"c{i}" for i in range(20)]).update(0, prediction, target)
