"""Cityscapes' conventions: the tables against cityscapesScripts, its layout through
``masks:``, and (below) its figures against its own evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from cityscapesscripts.helpers import labels as reference
from PIL import Image

from segflow import cityscapes
from segflow.groundtruth import IGNORE, GroundTruthError, open_ground_truth
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
