"""COCO detection and instance-segmentation mAP, exactly COCOeval's, as mergeable metric state.

pycocotools' ``COCOeval`` wants the whole dataset in one process, yet its ``evaluate`` step
works one image at a time, and all that ``accumulate`` later needs from an image is small: for
each detection, its score and whether it is matched or ignored at each IoU threshold and area
range; for each category, how many ground-truth objects count in each area range.
:class:`CocoEvaluator` computes those records from the images given to
:meth:`~CocoEvaluator.update` (in the worker that holds them; IoUs at once, the matching for
batches of images together), :meth:`~CocoEvaluator.merge` concatenates them and
:meth:`~CocoEvaluator.compute` pools them as ``accumulate`` and ``summarize`` do, with the same
floating-point operations on the same values: the figures are COCOeval's bit for bit, for
``iouType`` "bbox" and "segm" with COCO's default parameters.

COCOeval semantics reproduced here, quirks included:

- Ground truth: polygons are rasterised and merged into one mask, uncompressed RLEs compressed
  (``COCO.annToRLE``). The annotation's ``area`` field, not the mask's, decides its area range.
  ``iscrowd`` objects are ignored, may match any number of detections and count the
  detection's area as the union. An ``ignore`` field has no effect (``COCOeval._prepare``
  overwrites it with ``iscrowd``). A match to an annotation whose ``id`` is 0 counts as no
  match (COCOeval records matched ids with 0 meaning "none").
- Detections: per image and category, sorted by descending score with ties kept in input
  order, and only the first 100 are evaluated. A box's area is ``w * h`` (``COCO.loadRes``),
  and ``loadRes`` gives that area to a detection with a ``bbox`` even for "segm": so does
  this class. A "segm" detection without a ``bbox`` has its mask's area (detectron2 drops
  the boxes for that reason, and segflow's own workers do too); for "bbox", a detection given
  only as a mask gets the mask's bounding box and area, as ``loadRes`` does.
- Matching, per area range and IoU threshold: detections in score order take the
  still-unmatched ground truth of highest IoU >= the threshold (the later one on equal IoUs),
  preferring objects that are not ignored. A detection matched to an ignored object, or
  unmatched and outside the area range (bounds inclusive), is ignored.
- Pooling, per category, area range and detection limit (1, 10, 100 per image and
  category): detections of all images ordered by descending score, ties by image id then
  rank; precision made monotone and read at 101 recall thresholds; -1 where a category has no
  counted ground truth. A summary figure is the mean of the values > -1, or -1 when none.
- Annotations and detections whose category is not in ``categories`` are not evaluated.

The state is three flat tables (Arrow/Parquet/JSON friendly, see :meth:`CocoEvaluator.state`);
one row per evaluated detection, one per (image, category) with ground truth, one per image.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from pycocotools import mask as coco_mask

from segflow.errors import SegflowError

__all__ = [
    "AREA_RANGES",
    "IOU_THRESHOLDS",
    "MAX_DETECTIONS",
    "RECALL_THRESHOLDS",
    "STAT_NAMES",
    "CocoEvalError",
    "CocoEvaluator",
    "CocoScores",
]

IouType = Literal["bbox", "segm"]

# COCOeval's Params.setDetParams, built with the same calls so that the floats are the same.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = (1, 10, 100)
AREA_RANGES = {
    "all": (0**2, 1e5**2),
    "small": (0**2, 32**2),
    "medium": (32**2, 96**2),
    "large": (96**2, 1e5**2),
}
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)

_AREA_BOUNDS = np.array(list(AREA_RANGES.values()), dtype=np.float64)  # (A, 2)
# Images matched together (see _match_images); more saves little and holds more IoUs.
_MATCH_BATCH = 256
_THRESHOLD_BITS = np.uint16(1) << np.arange(len(IOU_THRESHOLDS), dtype=np.uint16)
_DETECTION_COLUMNS = {
    "image_id": np.int64,
    "category_id": np.int64,
    "rank": np.uint8,  # position among the image's detections of its category, by score
    "score": np.float64,
    # Bit t set: matched (or ignored) at IOU_THRESHOLDS[t], in that area range.
    **{f"matched_{name}": np.uint16 for name in AREA_RANGES},
    **{f"ignored_{name}": np.uint16 for name in AREA_RANGES},
}
_GROUND_TRUTH_COLUMNS = {
    "image_id": np.int64,
    "category_id": np.int64,
    # Objects that count (not crowd, area inside the range).
    **{f"num_gt_{name}": np.int32 for name in AREA_RANGES},
}
_TABLES = {
    "images": {"image_id": np.int64},
    "detections": _DETECTION_COLUMNS,
    "ground_truth": _GROUND_TRUTH_COLUMNS,
}


class CocoEvalError(SegflowError, ValueError):
    """Input that COCO evaluation cannot use; the message names the image and the object."""


@dataclass(frozen=True)
class CocoScores:
    """COCOeval's results. ``precision`` and ``recall`` are ``COCOeval.eval``'s arrays, indexed
    [threshold, (recall threshold,) category, area range, detection limit], -1 where a category
    has no counted ground truth."""

    stats: np.ndarray  # (12,) in COCOeval.summarize order, named by STAT_NAMES
    categories: tuple[int, ...]
    per_class_ap: np.ndarray  # (K,) AP@[.5:.95], all areas, 100 detections; -1 without GT
    precision: np.ndarray  # (T, R, K, A, M)
    recall: np.ndarray  # (T, K, A, M)

    def summary(self) -> dict[str, float]:
        return {name: float(value) for name, value in zip(STAT_NAMES, self.stats, strict=True)}


class CocoEvaluator:
    """COCO mAP over images evaluated one at a time, possibly in different processes.

    ``update`` each image once, ``merge`` the evaluators of other shards (or rebuild them with
    :meth:`from_state`), then ``compute``. Merging in any order gives the same figures.
    """

    def __init__(self, iou_type: IouType, categories: Sequence[int]) -> None:
        if iou_type not in ("bbox", "segm"):
            raise CocoEvalError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        ids = [_integer(c, f"categories[{i}]") for i, c in enumerate(categories)]
        if not ids:
            raise CocoEvalError("categories must not be empty")
        if len(set(ids)) != len(ids):
            raise CocoEvalError(f"categories has duplicates: {sorted(ids)}")
        self.iou_type: IouType = iou_type
        self.categories = tuple(sorted(ids))
        self._category_set = frozenset(ids)
        self.reset()

    def reset(self) -> None:
        self._images: set[int] = set()
        # Images whose detections are still to be matched: matching many at once is cheaper.
        self._pending: list[tuple[int, _Image]] = []
        # Per table, the row batches of updates and merges, concatenated when read.
        self._parts: dict[str, list[dict[str, np.ndarray]]] = {
            "detections": [],
            "ground_truth": [],
        }

    # ----------------------------------------------------------------------------------------
    # Per image.

    def update(
        self,
        image_id: int,
        annotations: Sequence[Mapping[str, Any]],
        detections: Sequence[Mapping[str, Any]],
        *,
        height: int | None = None,
        width: int | None = None,
    ) -> CocoEvaluator:
        """Evaluate one image: its ground-truth ``annotations`` (COCO annotation dicts:
        ``category_id``, ``area``, ``iscrowd``, ``id`` optional, and ``bbox`` [x, y, w, h] or
        ``segmentation`` (polygons, RLE) as the IoU type needs) and its ``detections`` (COCO
        result dicts: ``category_id``, ``score``, and ``bbox`` or ``segmentation``, usually a
        compressed RLE). ``height`` and ``width`` are needed for polygons only."""
        image_id = _integer(image_id, "image_id")
        if image_id in self._images:
            raise CocoEvalError(f"image {image_id} was already evaluated")
        size = tuple(
            None if value is None else _integer(value, name)
            for value, name in ((height, "height"), (width, "width"))
        )
        where = f"image {image_id}: "
        ground_truth = self._ground_truth(annotations, size, where)
        image = _prepare_image(ground_truth, self._detections(detections, size, where))
        self._images.add(image_id)
        self._append("ground_truth", image_id, _ground_truth_rows(image))
        self._pending.append((image_id, image))
        if len(self._pending) >= _MATCH_BATCH:
            self._match_pending()
        return self

    def _match_pending(self) -> None:
        matches = _match_images([image for _, image in self._pending])
        for (image_id, image), image_matches in zip(self._pending, matches, strict=True):
            self._append("detections", image_id, _detection_rows(image, image_matches))
        self._pending.clear()

    def _append(self, name: str, image_id: int, rows: dict[str, np.ndarray]) -> None:
        if len(rows["category_id"]):
            rows["image_id"] = np.full(len(rows["category_id"]), image_id, np.int64)
            self._parts[name].append(rows)

    def _ground_truth(
        self, annotations: Sequence[Mapping[str, Any]], size: tuple, where: str
    ) -> _GroundTruth:
        category, area, crowd, has_id, geometry = [], [], [], [], []
        for i, annotation in enumerate(_sequence(annotations, f"{where}annotations")):
            what = f"{where}annotations[{i}]"
            annotation = _mapping(annotation, what)
            category_id = _integer(_field(annotation, "category_id", what), what)
            if category_id not in self._category_set:
                continue
            category.append(category_id)
            area.append(_real(_field(annotation, "area", what), f"{what}['area']"))
            crowd.append(_integer(annotation.get("iscrowd", 0), f"{what}['iscrowd']") != 0)
            has_id.append(annotation.get("id") != 0)
            if self.iou_type == "bbox":
                geometry.append(_box(_field(annotation, "bbox", what), f"{what}['bbox']"))
            else:
                segmentation = _field(annotation, "segmentation", what)
                geometry.append(_rle(segmentation, size, f"{what}['segmentation']"))
        return _GroundTruth(
            np.array(category, np.int64),
            np.array(area, np.float64),
            np.array(crowd, bool),
            np.array(has_id, bool),
            np.array(geometry).reshape(-1, 4) if self.iou_type == "bbox" else geometry,
        )

    def _detections(
        self, detections: Sequence[Mapping[str, Any]], size: tuple, where: str
    ) -> _Detections:
        category, score, area, geometry = [], [], [], []
        for i, detection in enumerate(_sequence(detections, f"{where}detections")):
            what = f"{where}detections[{i}]"
            detection = _mapping(detection, what)
            category_id = _integer(_field(detection, "category_id", what), what)
            if category_id not in self._category_set:
                continue
            category.append(category_id)
            value = _real(_field(detection, "score", what), f"{what}['score']")
            if math.isnan(value):
                raise CocoEvalError(f"{what}['score'] is NaN")
            score.append(value)
            if self.iou_type == "segm":
                segmentation = _field(detection, "segmentation", what)
                rle = _rle(segmentation, size, f"{what}['segmentation']")
                geometry.append(rle)
                if detection.get("bbox", []) != []:  # loadRes: a box's area beats the mask's
                    box = _box(detection["bbox"], f"{what}['bbox']")
                    area.append(box[2] * box[3])
                else:
                    area.append(float(coco_mask.area(rle)))
            elif "bbox" in detection:
                box = _box(detection["bbox"], f"{what}['bbox']")
                geometry.append(box)
                area.append(box[2] * box[3])
            else:  # a mask only: loadRes gives it the mask's box and area
                segmentation = _field(detection, "segmentation", what)
                rle = _rle(segmentation, size, f"{what}['segmentation']")
                geometry.append(coco_mask.toBbox(rle).tolist())
                area.append(float(coco_mask.area(rle)))
        if self.iou_type == "bbox":
            geometry = np.array(geometry, np.float64).reshape(-1, 4)
        return _Detections(
            np.array(category, np.int64),
            np.array(score, np.float64),
            np.array(area, np.float64),
            geometry,
        )

    # ----------------------------------------------------------------------------------------
    # State.

    def merge(self, other: CocoEvaluator) -> CocoEvaluator:
        if not isinstance(other, CocoEvaluator):
            raise TypeError(f"can only merge a CocoEvaluator, got {type(other).__name__}")
        if (other.iou_type, other.categories) != (self.iou_type, self.categories):
            raise CocoEvalError(
                f"cannot merge a {other.iou_type!r} evaluator over {len(other.categories)} "
                f"categories into a {self.iou_type!r} one over {len(self.categories)}, or over "
                "different category ids"
            )
        _check_disjoint(self._images, other._images)
        self._images |= other._images
        for name, parts in self._parts.items():
            parts.extend(other._parts[name])
        self._pending.extend(other._pending)
        return self

    def state(self) -> dict[str, Any]:
        """Everything :meth:`compute` needs, as plain values and three tables (dicts of
        equal-length 1-D numpy arrays, ready for ``pyarrow.table``; ``.tolist()`` them for
        JSON): ``images`` (one row per evaluated image), ``detections`` (one row per evaluated
        detection: image, category, rank by score, score, and per area range a bit mask of the
        IoU thresholds at which it is matched, and one of those at which it is ignored) and
        ``ground_truth`` (per image and category with ground truth, the objects that count in
        each area range)."""
        return {
            "iou_type": self.iou_type,
            "categories": list(self.categories),
            "images": {"image_id": np.array(sorted(self._images), np.int64)},
            **{name: dict(self._table(name)) for name in self._parts},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CocoEvaluator:
        """An evaluator holding ``state`` (as :meth:`state` returns it, with columns as numpy
        arrays, lists or anything ``np.asarray`` reads, e.g. Arrow columns)."""
        for key in ("iou_type", "categories", *_TABLES):
            if key not in state:
                raise CocoEvalError(f"state has no {key!r}")
        evaluator = cls(state["iou_type"], state["categories"])
        tables = {
            name: _read_table(state[name], columns, name) for name, columns in _TABLES.items()
        }
        image_ids = tables["images"]["image_id"].tolist()
        if len(set(image_ids)) != len(image_ids):
            raise CocoEvalError("state lists an image more than once")
        for name in ("detections", "ground_truth"):
            table = tables[name]
            if not np.isin(table["image_id"], tables["images"]["image_id"]).all():
                raise CocoEvalError(f"state {name} has rows of images not in its image list")
            if not np.isin(table["category_id"], evaluator.categories).all():
                raise CocoEvalError(f"state {name} has rows of categories not evaluated")
        if np.any(tables["detections"]["rank"] >= MAX_DETECTIONS[-1]):
            raise CocoEvalError(f"state detections have ranks >= {MAX_DETECTIONS[-1]}")
        if np.isnan(tables["detections"]["score"]).any():
            raise CocoEvalError("state detections have NaN scores")
        evaluator._images = set(image_ids)
        evaluator._parts = {name: [tables[name]] for name in evaluator._parts}
        return evaluator

    def _table(self, name: str) -> dict[str, np.ndarray]:
        if self._pending:
            self._match_pending()
        parts = self._parts[name]
        if len(parts) != 1:
            columns = _TABLES[name]
            parts[:] = [
                {
                    column: np.concatenate([part[column] for part in parts]).astype(dtype)
                    if parts
                    else np.zeros(0, dtype)
                    for column, dtype in columns.items()
                }
            ]
        return parts[0]

    # ----------------------------------------------------------------------------------------
    # Dataset figures.

    def compute(self) -> CocoScores:
        """COCOeval.accumulate and summarize over every image evaluated so far."""
        [scores] = self.compute_resampled([None])
        return scores

    def compute_resampled(self, weights: Iterable[np.ndarray | None]) -> Iterator[CocoScores]:
        """For each entry of ``weights``, COCOeval's figures over the images evaluated so far,
        each image counted as many times as the entry says: a count per image, in the order
        of ``state()["images"]`` (ascending id), or ``None`` for once each.

        An image counted k times is k images with its annotations and detections, numbered
        consecutively where it stands in id order, so that they pool where it pools (what a
        bootstrap resample of the images is, and what COCOeval gives on such a dataset, bit
        for bit). The records are pooled once; each entry then costs one pass over them."""
        detections, ground_truth = self._table("detections"), self._table("ground_truth")
        categories = np.array(self.categories, np.int64)
        images = np.array(sorted(self._images), np.int64)
        gt_category = np.searchsorted(categories, ground_truth["category_id"])
        gt_image = np.searchsorted(images, ground_truth["image_id"])
        gt_counts = np.stack([ground_truth[f"num_gt_{name}"] for name in AREA_RANGES], axis=1)
        category_index = np.searchsorted(categories, detections["category_id"])
        # accumulate concatenates images in id order, each sorted by score, then sorts by
        # score with a stable sort.
        order = np.lexsort(
            (detections["rank"], detections["image_id"], -detections["score"], category_index)
        )
        pooled = {
            "category": category_index[order],
            "rank": detections["rank"][order],
            **{
                f"{flag}_{name}": detections[f"{flag}_{name}"][order]
                for flag in ("matched", "ignored")
                for name in AREA_RANGES
            },
        }
        image = np.searchsorted(images, detections["image_id"][order])
        score = detections["score"][order]
        # Runs of one image's detections of a category with equal scores: an image's copies
        # pool such a run whole, one copy after the other.
        runs = np.flatnonzero(
            np.concatenate(
                (
                    [len(order) > 0],
                    (np.diff(pooled["category"]) != 0)
                    | (np.diff(image) != 0)
                    | (np.diff(score) != 0),
                )
            )
        )
        run_length = np.diff(np.append(runs, len(order)))
        for counts in weights:
            if counts is None:
                counts = np.ones(len(images), np.int64)
            counts = np.asarray(counts, np.int64)
            if counts.shape != images.shape or (counts < 0).any():
                raise CocoEvalError(
                    f"weights must be {len(images)} counts >= 0 (one per image), "
                    f"got shape {counts.shape}"
                )
            copies = np.repeat(np.arange(len(runs)), counts[image[runs]])
            length = run_length[copies]
            taken = np.repeat(runs[copies] - (np.cumsum(length) - length), length)
            taken += np.arange(len(taken))
            num_gt = np.zeros((len(categories), len(AREA_RANGES)), np.int64)
            np.add.at(num_gt, gt_category, gt_counts * counts[gt_image][:, None])
            yield self._pooled_scores(
                {column: values[taken] for column, values in pooled.items()}, num_gt
            )

    def _pooled_scores(self, pooled: dict[str, np.ndarray], num_gt: np.ndarray) -> CocoScores:
        """accumulate and summarize over the detections in pooled order and the counted
        ground truth per category and area range."""
        n_thresholds, n_recalls = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
        n_categories, n_areas, n_limits = (
            len(self.categories),
            len(AREA_RANGES),
            len(MAX_DETECTIONS),
        )
        bounds = np.searchsorted(pooled["category"], np.arange(n_categories + 1))
        within_limit = pooled["rank"] < np.array(MAX_DETECTIONS)[:, None]  # (M, N)

        precision = -np.ones((n_thresholds, n_recalls, n_categories, n_areas, n_limits))
        recall = -np.ones((n_thresholds, n_categories, n_areas, n_limits))
        for a, name in enumerate(AREA_RANGES):
            matched = _unpack(pooled[f"matched_{name}"])  # (T, N)
            ignored = _unpack(pooled[f"ignored_{name}"])
            true_positive, false_positive = matched & ~ignored, ~matched & ~ignored
            for k in np.flatnonzero(num_gt[:, a]):
                rows = slice(bounds[k], bounds[k + 1])
                area_precision, area_recall = _precision_recall(
                    true_positive[:, rows],
                    false_positive[:, rows],
                    within_limit[:, rows],
                    num_gt[k, a],
                )
                precision[:, :, k, a, :] = area_precision
                recall[:, k, a, :] = area_recall

        return CocoScores(
            stats=_summarize(precision, recall),
            categories=self.categories,
            per_class_ap=np.array(
                [_mean_defined(precision[:, :, k, 0, -1]) for k in range(n_categories)]
            ),
            precision=precision,
            recall=recall,
        )


# --------------------------------------------------------------------------------------------
# COCOeval.evaluateImg


class _GroundTruth(NamedTuple):
    category: np.ndarray  # (G,) int64
    area: np.ndarray  # (G,) float64, the annotation's area field
    crowd: np.ndarray  # (G,) bool
    has_id: np.ndarray  # (G,) bool, False for id 0
    geometry: Any  # (G, 4) float64 boxes or G compressed RLEs


class _Detections(NamedTuple):
    category: np.ndarray  # (D,) int64
    score: np.ndarray  # (D,) float64
    area: np.ndarray  # (D,) float64
    geometry: Any  # (D, 4) float64 boxes or D compressed RLEs


class _Image(NamedTuple):
    """One image's evaluated detections (per category by descending score, at most 100 each)
    and what matching them needs."""

    category: np.ndarray  # (D,) int64
    rank: np.ndarray  # (D,) position in its category
    score: np.ndarray  # (D,) float64
    outside: np.ndarray  # (A, D) bool, area outside each range
    ious: np.ndarray  # (D, G), -1 between different categories
    gt_category: np.ndarray  # (G,) int64
    gt_ignored: np.ndarray  # (A, G) bool, crowd or area outside each range
    gt_crowd: np.ndarray  # (G,) bool
    gt_has_id: np.ndarray  # (G,) bool, False for id 0


def _prepare_image(gt: _GroundTruth, dt: _Detections) -> _Image:
    """COCOeval.computeIoU for every category of one image."""
    # Per category, by descending score, ties in input order (lexsort is stable).
    order = np.lexsort((-dt.score, dt.category))
    category = dt.category[order]
    rank = np.arange(len(order)) - np.searchsorted(category, category)
    order, rank = order[rank < MAX_DETECTIONS[-1]], rank[rank < MAX_DETECTIONS[-1]]
    category = dt.category[order]
    ious = _iou(_take(dt.geometry, order), gt.geometry, gt.crowd)
    ious[category[:, None] != gt.category[None, :]] = -1.0
    return _Image(
        category=category,
        rank=rank,
        score=dt.score[order],
        outside=_outside_area_ranges(dt.area[order]),
        ious=ious,
        gt_category=gt.category,
        gt_ignored=gt.crowd | _outside_area_ranges(gt.area),
        gt_crowd=gt.crowd,
        gt_has_id=gt.has_id,
    )


def _ground_truth_rows(image: _Image) -> dict[str, np.ndarray]:
    present, which = np.unique(image.gt_category, return_inverse=True)
    counts = np.zeros((len(present), len(AREA_RANGES)), np.int32)
    np.add.at(counts, which, ~image.gt_ignored.T)
    return {
        "category_id": present,
        **{f"num_gt_{name}": counts[:, a] for a, name in enumerate(AREA_RANGES)},
    }


def _detection_rows(image: _Image, matches: np.ndarray) -> dict[str, np.ndarray]:
    """The image's detection rows, from the ground truth each matches, (D, A, T), -1 for none:
    COCOeval.evaluateImg's dtMatches (as "matched") and dtIgnore."""
    n_areas = len(AREA_RANGES)
    # Index -1 (no match) reads the appended "no object" column.
    counted = np.append(image.gt_has_id, False)[matches]
    ignored = np.concatenate((image.gt_ignored, np.zeros((n_areas, 1), bool)), axis=1)
    ignored = ignored[np.arange(n_areas)[:, None], matches]
    ignored |= ~counted & image.outside.T[:, :, None]
    matched_bits, ignored_bits = _pack(counted), _pack(ignored)
    return {
        "category_id": image.category,
        "rank": image.rank.astype(np.uint8),
        "score": image.score,
        **{f"matched_{name}": matched_bits[:, a] for a, name in enumerate(AREA_RANGES)},
        **{f"ignored_{name}": ignored_bits[:, a] for a, name in enumerate(AREA_RANGES)},
    }


def _match_images(images: Sequence[_Image]) -> list[np.ndarray]:
    """COCOeval.evaluateImg's greedy matching, for every image, category, area range and IoU
    threshold: per image, the index of the ground truth each detection matches, (D, A, T),
    -1 for none.

    In each (image, category) group, the detections in score order take the still unmatched
    ground truth of highest IoU >= the threshold, objects not ignored first. Groups are
    independent, so step k matches the k-th detection of every group at once, over "slots":
    one per (group, area range, threshold, ground truth), in that order, so that each (group,
    area range, threshold) row is a contiguous segment. The groups are sorted by their number
    of detections, most first: those still matching at step k own a prefix of the slots.
    """
    n_areas, n_thresholds = len(AREA_RANGES), len(IOU_THRESHOLDS)
    rows_per_group = n_areas * n_thresholds
    matches = [np.full((len(image.category), n_areas, n_thresholds), -1) for image in images]
    groups = []  # (image index, its detections, its ground truth) of each group
    for i, image in enumerate(images):
        # A detection with no object at the lowest threshold matches nothing and takes
        # nothing from the detections after it.
        contender = (image.ious >= IOU_THRESHOLDS[0]).any(axis=1)
        for category in np.unique(image.category[contender]):
            dts = np.flatnonzero(contender & (image.category == category))
            groups.append((i, dts, np.flatnonzero(image.gt_category == category)))
    if not groups:
        return matches
    groups.sort(key=lambda group: -len(group[1]))

    n_dt = np.array([len(dts) for _, dts, _ in groups])
    n_gt = np.array([len(gts) for _, _, gts in groups])
    row_width = np.repeat(n_gt, rows_per_group)
    row_start = np.concatenate(([0], np.cumsum(row_width)[:-1]))
    slot_row = np.repeat(np.arange(len(row_width)), row_width)
    slot_gt = np.arange(len(slot_row)) - row_start[slot_row]
    slot_width = row_width[slot_row]
    slot_threshold = np.tile(IOU_THRESHOLDS, n_areas * len(groups))[slot_row]
    group_slots_end = np.cumsum(n_gt * rows_per_group)
    # Each group's IoUs (its detections x its ground truth), end to end.
    blocks = [images[i].ious[np.ix_(dts, gts)].ravel() for i, dts, gts in groups]
    block_start = np.concatenate(([0], np.cumsum([len(block) for block in blocks])[:-1]))
    slot_iou = np.repeat(block_start, n_gt * rows_per_group) + slot_gt
    iou_values = np.concatenate(blocks)
    slot_regular = np.concatenate(
        [
            np.repeat(~images[i].gt_ignored[:, None, gts], n_thresholds, axis=1).ravel()
            for i, _, gts in groups
        ]
    )
    slot_crowd = np.concatenate(
        [np.tile(images[i].gt_crowd[gts], rows_per_group) for i, _, gts in groups]
    )
    slot_index = np.arange(len(slot_row))

    available = np.ones(len(slot_row), bool)
    matched_gt = np.full((n_dt[0], len(row_width)), -1, np.int32)  # (step, row)
    for k in range(n_dt[0]):
        n_groups = np.count_nonzero(n_dt > k)
        n_slots, n_rows = group_slots_end[n_groups - 1], n_groups * rows_per_group
        starts, row = row_start[:n_rows], slot_row[:n_slots]
        iou = iou_values[slot_iou[:n_slots] + k * slot_width[:n_slots]]
        pool = available[:n_slots] & (iou >= slot_threshold[:n_slots])
        regular = slot_regular[:n_slots]
        pool &= regular | ~np.logical_or.reduceat(pool & regular, starts)[row]
        values = np.where(pool, iou, -np.inf)
        is_best = pool & (values == np.maximum.reduceat(values, starts)[row])
        # evaluateImg's `ious < iou: continue` lets equal IoUs through: the last one wins.
        best = np.maximum.reduceat(np.where(is_best, slot_index[:n_slots], -1), starts)
        found = best >= 0
        matched_gt[k, :n_rows][found] = slot_gt[best[found]]
        taken = best[found]
        available[taken[~slot_crowd[taken]]] = False

    for j, (i, dts, gts) in enumerate(groups):
        rows = slice(j * rows_per_group, (j + 1) * rows_per_group)
        local = matched_gt[: n_dt[j], rows].reshape(n_dt[j], n_areas, n_thresholds)
        matches[i][dts] = np.where(local >= 0, gts[local], -1)
    return matches


def _iou(dt_geometry: Any, gt_geometry: Any, gt_crowd: np.ndarray) -> np.ndarray:
    if len(dt_geometry) == 0 or len(gt_geometry) == 0:
        return np.zeros((len(dt_geometry), len(gt_geometry)))
    return np.array(coco_mask.iou(dt_geometry, gt_geometry, gt_crowd.astype(np.uint8)))


def _outside_area_ranges(area: np.ndarray) -> np.ndarray:
    """(A, N): ``area < low or area > high``, as evaluateImg tests it."""
    return (area < _AREA_BOUNDS[:, :1]) | (area > _AREA_BOUNDS[:, 1:])


def _pack(flags: np.ndarray) -> np.ndarray:
    """(..., T) bools -> (...) uint16 with bit t set where flags[..., t]."""
    return np.bitwise_or.reduce(np.where(flags, _THRESHOLD_BITS, np.uint16(0)), axis=-1)


def _unpack(bits: np.ndarray) -> np.ndarray:
    """(N,) uint16 -> (T, N) bools."""
    return (bits[None, :] & _THRESHOLD_BITS[:, None]) != 0


# --------------------------------------------------------------------------------------------
# COCOeval.accumulate and summarize


def _precision_recall(
    true_positive: np.ndarray, false_positive: np.ndarray, within_limit: np.ndarray, num_gt: int
) -> tuple[np.ndarray, np.ndarray]:
    """Precision (T, R, M) and recall (T, M) of one category and area range, from its
    detections in pooled order: (T, N) flags and (M, N) "within the detection limit".

    accumulate drops the detections beyond each limit; here they stay as neither true nor
    false positives, like ignored detections, which repeat the previous precision and recall
    and so change no value read at a recall threshold.
    """
    n_rows, n = true_positive.shape[0] * within_limit.shape[0], true_positive.shape[1]
    tp_count = np.cumsum(true_positive[:, None, :] & within_limit, axis=-1)  # (T, M, N)
    tp_sum = tp_count.astype(float)
    fp_sum = np.cumsum(false_positive[:, None, :] & within_limit, axis=-1).astype(float)
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[..., ::-1], axis=-1)[..., ::-1]
    recall = tp_sum[..., -1] / num_gt if n else np.zeros(tp_sum.shape[:2])

    # accumulate reads precision where recall tp_sum / num_gt first reaches each threshold:
    # where tp_count first reaches the least count whose recall does (same divisions).
    needed = np.searchsorted(np.arange(num_gt + 1) / num_gt, RECALL_THRESHOLDS, side="left")
    first = _first_reaching(tp_count.reshape(n_rows, n), np.minimum(needed, n + 1))
    # Thresholds never reached read the appended 0, as accumulate leaves them.
    padded = np.concatenate((precision.reshape(n_rows, n), np.zeros((n_rows, 1))), axis=1)
    at_thresholds = np.take_along_axis(padded, first, axis=1).reshape(*tp_count.shape[:2], -1)
    return at_thresholds.transpose(0, 2, 1), recall


def _first_reaching(counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For rows of non-decreasing integers in [0, n], the first index in each row where the
    row reaches each target in [0, n + 1] (n where it never does): one search over all rows,
    each shifted above the previous."""
    n_rows, n = counts.shape
    shift = np.arange(n_rows)[:, None] * (n + 1)
    found = np.searchsorted((counts + shift).ravel(), (targets + shift).ravel(), side="left")
    return found.reshape(n_rows, -1) - np.arange(n_rows)[:, None] * n


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else -1.0


def _summarize(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """COCOeval.summarize's twelve figures, sliced as it slices them."""

    def at(threshold: float) -> np.ndarray:
        return np.where(threshold == IOU_THRESHOLDS)[0]

    everywhere, small, medium, large = range(len(AREA_RANGES))
    top1, top10, top100 = range(len(MAX_DETECTIONS))
    return np.array(
        [
            _mean_defined(precision[:, :, :, everywhere, top100]),
            _mean_defined(precision[at(0.5)][:, :, :, everywhere, top100]),
            _mean_defined(precision[at(0.75)][:, :, :, everywhere, top100]),
            _mean_defined(precision[:, :, :, small, top100]),
            _mean_defined(precision[:, :, :, medium, top100]),
            _mean_defined(precision[:, :, :, large, top100]),
            _mean_defined(recall[:, :, everywhere, top1]),
            _mean_defined(recall[:, :, everywhere, top10]),
            _mean_defined(recall[:, :, everywhere, top100]),
            _mean_defined(recall[:, :, small, top100]),
            _mean_defined(recall[:, :, medium, top100]),
            _mean_defined(recall[:, :, large, top100]),
        ]
    )


# --------------------------------------------------------------------------------------------
# Input checks and conversions.


def _integer(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise CocoEvalError(f"{what} must be an integer id, got {value!r:.80}") from None


def _real(value: Any, what: str) -> float:
    if type(value) is float:  # the common case, answered first: this runs per detection
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise CocoEvalError(f"{what} must be a number, got {value!r:.80}")
    return float(value)


def _sequence(items: Any, what: str) -> Sequence[Any]:
    if isinstance(items, Mapping | str | bytes) or not isinstance(items, Sequence):
        raise CocoEvalError(f"{what} must be a list of dicts, got {type(items).__name__}")
    return items


def _mapping(obj: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise CocoEvalError(f"{where} must be a dict, got {type(obj).__name__}")
    return obj


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise CocoEvalError(f"{where} has no {key!r}")
    return obj[key]


def _box(value: Any, what: str) -> list[float]:
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        box = []
    if len(box) != 4 or not all(map(math.isfinite, box)):
        raise CocoEvalError(f"{what} must be 4 finite numbers [x, y, w, h], got {value!r:.80}")
    return box


def _rle(segmentation: Any, size: tuple[int | None, int | None], what: str) -> dict:
    """A compressed RLE, converted as COCO.annToRLE converts ground truth."""
    if isinstance(segmentation, list):
        height, width = size
        if height is None or width is None:
            raise CocoEvalError(f"{what}: polygons need the image height and width")
        try:
            return coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        except Exception as error:  # pycocotools raises bare Exceptions on unsupported input
            raise CocoEvalError(f"{what}: not a list of polygons ({error})") from None
    if isinstance(segmentation, Mapping) and "size" in segmentation and "counts" in segmentation:
        try:
            size = [operator.index(v) for v in segmentation["size"]]
        except TypeError:
            size = []
        if len(size) != 2:
            raise CocoEvalError(
                f"{what}: RLE size must be [height, width], got {segmentation['size']!r:.80}"
            )
        counts = segmentation["counts"]
        if isinstance(counts, str | bytes):
            return {"size": size, "counts": counts}
        if isinstance(counts, list):  # uncompressed, as crowd annotations are stored
            return coco_mask.frPyObjects({"size": size, "counts": counts}, *size)
    raise CocoEvalError(
        f"{what} must be polygons or an RLE dict with 'size' and 'counts', got {segmentation!r:.80}"
    )


def _take(geometry: Any, order: np.ndarray) -> Any:
    if isinstance(geometry, np.ndarray):
        return geometry[order]
    return [geometry[i] for i in order]


def _check_disjoint(ours: set[int], theirs: set[int]) -> None:
    both = ours & theirs
    if both:
        raise CocoEvalError(f"images evaluated twice (in both evaluators): {sorted(both)[:10]}")


def _read_table(columns: Any, schema: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
    if not isinstance(columns, Mapping):
        raise CocoEvalError(f"state {name} must be a dict of columns, got {type(columns).__name__}")
    table, length = {}, None
    for column, dtype in schema.items():
        if column not in columns:
            raise CocoEvalError(f"state {name} has no column {column!r}")
        values = np.asarray(columns[column])
        if values.ndim != 1 or (length is not None and len(values) != length):
            raise CocoEvalError(f"state {name} columns must be 1-D and of equal length")
        length = len(values)
        if values.size and values.dtype.kind not in ("f" if dtype is np.float64 else "iu"):
            raise CocoEvalError(f"state {name}[{column!r}] holds {values.dtype}, not {dtype}")
        converted = values.astype(dtype)
        if values.size and not np.array_equal(converted, values):
            raise CocoEvalError(f"state {name}[{column!r}] has values out of range for {dtype}")
        table[column] = converted
    return table
