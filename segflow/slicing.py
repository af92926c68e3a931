"""Sliced inference for instance models on images larger than a model should see at once.

An instance model run on a 10k x 10k aerial scene at once would either resize it beyond use or
answer with N full-size H x W mask planes (100 detections: 10 GB). Instead, as SAHI does, the
image is cut into overlapping ``size x size`` slices (``--slice-size``, ``--slice-overlap``;
neighbouring slices share at least ``overlap`` pixels, the last slice of a row or column ends
at the image's edge, :func:`segflow.tiling.tile_starts`), the model runs on each slice as on
an image of its own, and the detections of all slices are merged into the image's.

Slices are read one at a time (``read(window)``: a georeferenced raster's window is read from
its file, :mod:`segflow.raster`) and given to the model ``--batch-size`` at a time; a slice
whose pixels are all invalid is not run. A slice's masks are cropped to their pixels'
bounding box as soon as the model returns them, and masked by the slice's valid pixels (an
invalid pixel is in no mask), so a run holds one batch of slices' predictions and, per
detection, a box-sized crop: memory scales with the boxes, never with the image. The final
RLEs are encoded from the crops on the image's grid (:func:`segflow.rle.encode_crops_measured`),
equal to encoding the full planes.

Merging (``--slice-merge``). A detection is compared only with detections of the same class
from *other* slices whose windows overlap its own (within a slice, the model's own
suppression has already decided), and only inside the two slices' common window, the pixels
both saw: an object cut at a slice edge is, in the common window, what the neighbour saw of it
too, while outside it the two views differ by construction. Two detections match when their
overlap there reaches ``--slice-match`` (default 0.5):

- ``mask-iou`` (the default): the IoU of the two masks within the common window. Matching
  detections are linked transitively (an object larger than a slice is one chain of pieces
  across several slices) and each linked group becomes one detection: its mask the union of
  the pieces' masks, so an object cut by any number of slice edges comes out whole. This is
  SAHI's non-maximum *merging* with a mask criterion.
- ``nms``: the intersection of the two boxes within the common window over the smaller of the
  two (SAHI's IOS: the sliver of an object a neighbouring slice saw still matches the whole
  object's box). Greedy non-maximum suppression: by descending score, a detection is kept
  unless it matches one already kept. Cheaper (boxes only, no mask is compared), and exact for
  objects smaller than the overlap (one slice sees each whole) when the model scores a whole
  object above its cut pieces, as detectors do. An object that no slice holds whole comes out
  as the cut pieces that no kept piece overlapped: smaller than the object, and possibly
  several (SAHI's NMS does the same); merging is what makes such objects whole.

A merged detection's score is the highest of its pieces': they are views of one object, and
the best view's confidence is the object's (a mean would penalise every object that crosses a
slice edge, since cut views score lower). Its box is the union of the pieces' boxes, clipped
to the image: the box of the whole object, where each piece's box ends at its slice's edge.
Detections come out sorted by descending score (ties in slice order), as
:class:`segflow.prediction.InstancePrediction` orders them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segflow import rle
from segflow.errors import SegflowError
from segflow.tiling import Window, tile_starts

MERGES = ("mask-iou", "nms")
DEFAULT_SLICE_SIZE = 1024
DEFAULT_SLICE_OVERLAP = 128
DEFAULT_MATCH = 0.5


class SlicingError(SegflowError, ValueError):
    """Slicing settings that cannot be used; the message names the option."""


@dataclass(frozen=True)
class Slicing:
    """How an image is sliced and its slices' detections merged (see the module docstring)."""

    size: int = DEFAULT_SLICE_SIZE
    overlap: int = DEFAULT_SLICE_OVERLAP
    merge: str = "mask-iou"
    match: float = DEFAULT_MATCH

    def __post_init__(self) -> None:
        if self.size < 1:
            raise SlicingError(f"--slice-size must be at least 1, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise SlicingError(
                f"--slice-overlap must be in [0, --slice-size={self.size}), got {self.overlap}"
            )
        if self.merge not in MERGES:
            raise SlicingError(
                f"--slice-merge must be one of {', '.join(MERGES)}, got {self.merge!r}"
            )
        if not 0 < self.match <= 1:
            raise SlicingError(f"--slice-match must be in (0, 1], got {self.match!r}")

    def windows(self, height: int, width: int) -> list[Window]:
        """The slices of a ``height x width`` image, row by row."""
        return [
            (top, min(top + self.size, height), left, min(left + self.size, width))
            for top in tile_starts(height, self.size, self.overlap)
            for left in tile_starts(width, self.size, self.overlap)
        ]

    def as_config(self) -> dict[str, Any]:
        """What a run records of it (a resume must match)."""
        return {
            "size": self.size,
            "overlap": self.overlap,
            "merge": self.merge,
            "match": self.match,
        }


@dataclass(frozen=True)
class Detection:
    """One detection held cropped: its mask is the image's rows ``top:top + h`` and columns
    ``left:left + w`` (``mask`` (h, w) bool), 0 elsewhere; ``box`` is ``(x0, y0, x1, y1)`` in
    image pixels; ``slice`` the index of the slice that saw it (None once merged)."""

    top: int
    left: int
    mask: np.ndarray
    box: tuple[float, float, float, float]
    score: float
    label: int
    slice: int | None


@dataclass(frozen=True)
class SlicedDetections:
    """An image's merged detections, by descending score, with their RLEs on the image's grid
    (``encoded.areas`` and ``encoded.boxes`` are the masks'; ``boxes`` are the detections')."""

    boxes: np.ndarray  # (N, 4) float64, COCO xywh
    labels: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float64
    encoded: rle.Measured
    height: int
    width: int

    def __len__(self) -> int:
        return len(self.labels)


Read = Callable[[Window], tuple[torch.Tensor, np.ndarray] | None]
"""A slice's pixels, (h, w, 3) uint8, and its valid pixels, (h, w) bool; None when none is
valid."""


def detect_slices(
    model: Any,
    read: Read,
    windows: Sequence[Window],
    on_slice: Callable[[], None] | None = None,
    batch_size: int = 1,
) -> list[Detection]:
    """Every slice's detections, cropped, in image coordinates, the model given up to
    ``batch_size`` slices at a time; ``on_slice`` is called after each batch."""
    detections: list[Detection] = []
    pending: list[tuple[int, torch.Tensor, np.ndarray]] = []

    def run() -> None:
        predictions = model.predict([image for _, image, _ in pending])
        for (index, _, valid), prediction in zip(pending, predictions, strict=True):
            detections.extend(_cropped(prediction, valid, windows[index], index))
        pending.clear()
        if on_slice is not None:
            on_slice()

    for index, window in enumerate(windows):
        pixels = read(window)
        if pixels is not None:
            pending.append((index, *pixels))
        if len(pending) == batch_size:
            run()
    if pending:
        run()
    return detections


def _cropped(prediction: Any, valid: np.ndarray, window: Window, index: int) -> list[Detection]:
    top, bottom, left, right = window
    if tuple(prediction.masks.shape[1:]) != (bottom - top, right - left):
        raise ValueError(
            f"the model answered a {bottom - top}x{right - left} slice with masks of "
            f"{tuple(prediction.masks.shape[1:])}"
        )
    boxes = prediction.boxes.to(torch.float64).cpu().numpy()
    labels, scores = prediction.labels.tolist(), prediction.scores.tolist()
    masks = prediction.masks
    rows, columns = masks.any(dim=2).cpu().numpy(), masks.any(dim=1).cpu().numpy()
    found = []
    for i in range(len(labels)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(columns[i])
        y0, y1 = (int(ys[0]), int(ys[-1]) + 1) if ys.size else (0, 0)
        x0, x1 = (int(xs[0]), int(xs[-1]) + 1) if xs.size else (0, 0)
        crop = masks[i, y0:y1, x0:x1].cpu().numpy().astype(bool) & valid[y0:y1, x0:x1]
        x, y, w, h = boxes[i]
        box = (left + x, top + y, left + x + w, top + y + h)
        found.append(
            Detection(top + y0, left + x0, crop, box, float(scores[i]), int(labels[i]), index)
        )
    return found


def merge_detections(
    detections: Sequence[Detection], windows: Sequence[Window], slicing: Slicing
) -> list[Detection]:
    """The detections of overlapping slices merged (see the module docstring), by descending
    score."""
    order = sorted(range(len(detections)), key=lambda i: -detections[i].score)
    detections = [detections[i] for i in order]
    matches = _matches(detections, windows, slicing)
    if slicing.merge == "nms":
        suppressed = np.zeros(len(detections), bool)
        kept = []
        for i, detection in enumerate(detections):
            if not suppressed[i]:
                kept.append(detection)
                suppressed[matches.get(i, [])] = True
        return kept
    groups = _linked(len(detections), matches)
    return sorted((_union([detections[i] for i in group]) for group in groups), key=_by_score)


def _by_score(detection: Detection) -> float:
    return -detection.score


def _matches(
    detections: Sequence[Detection], windows: Sequence[Window], slicing: Slicing
) -> dict[int, list[int]]:
    """For each detection, the later (lower-scoring) detections it matches."""
    by_slice: dict[int, list[int]] = {}
    for i, detection in enumerate(detections):
        assert detection.slice is not None
        by_slice.setdefault(detection.slice, []).append(i)
    matches: dict[int, list[int]] = {}
    slices = sorted(by_slice)  # row by row, so their windows' tops never decrease
    for a_index, a in enumerate(slices):
        for b in slices[a_index + 1 :]:
            if windows[b][0] >= windows[a][1]:
                break  # this slice and every later one start below slice a
            common = _intersection(windows[a], windows[b])
            if common is None:
                continue
            seen = [[i for i in by_slice[s] if _reaches(detections[i], common)] for s in (a, b)]
            for i in seen[0]:
                for j in seen[1]:
                    first, second = min(i, j), max(i, j)
                    if (
                        detections[i].label == detections[j].label
                        and _overlap(detections[first], detections[second], common, slicing.merge)
                        >= slicing.match
                    ):
                        matches.setdefault(first, []).append(second)
    return matches


def _reaches(detection: Detection, window: Window) -> bool:
    """Whether the detection's box or mask reaches into ``window``."""
    return bool(_box_area(_clipped_box(detection.box, window))) or (
        _intersection(_crop_window(detection), window) is not None
    )


def _intersection(a: Window, b: Window) -> Window | None:
    top, bottom = max(a[0], b[0]), min(a[1], b[1])
    left, right = max(a[2], b[2]), min(a[3], b[3])
    return (top, bottom, left, right) if top < bottom and left < right else None


def _overlap(a: Detection, b: Detection, common: Window, merge: str) -> float:
    if merge == "nms":
        return _box_ios(_clipped_box(a.box, common), _clipped_box(b.box, common))
    return _mask_iou(a, b, common)


def _clipped_box(box: tuple[float, ...], window: Window) -> tuple[float, ...]:
    top, bottom, left, right = window
    x0, y0, x1, y1 = box
    return (max(x0, left), max(y0, top), min(x1, right), min(y1, bottom))


def _box_area(box: tuple[float, ...]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _box_ios(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    smaller = min(_box_area(a), _box_area(b))
    if smaller == 0:
        return 0.0
    between = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return _box_area(between) / smaller


def _crop_window(detection: Detection) -> Window:
    h, w = detection.mask.shape
    return (detection.top, detection.top + h, detection.left, detection.left + w)


def _mask_iou(a: Detection, b: Detection, common: Window) -> float:
    a_window, b_window = _crop_window(a), _crop_window(b)
    if _intersection(a_window, b_window) is None:
        return 0.0
    hull = (
        min(a_window[0], b_window[0]),
        max(a_window[1], b_window[1]),
        min(a_window[2], b_window[2]),
        max(a_window[3], b_window[3]),
    )
    region = _intersection(hull, common)
    if region is None:
        return 0.0
    a_mask, b_mask = _pasted(a, region), _pasted(b, region)
    union = np.count_nonzero(a_mask | b_mask)
    return np.count_nonzero(a_mask & b_mask) / union if union else 0.0


def _pasted(detection: Detection, region: Window) -> np.ndarray:
    """The detection's mask over ``region`` (rows top:bottom, columns left:right)."""
    top, bottom, left, right = region
    out = np.zeros((bottom - top, right - left), bool)
    part = _intersection(_crop_window(detection), region)
    if part is not None:
        p_top, p_bottom, p_left, p_right = part
        out[p_top - top : p_bottom - top, p_left - left : p_right - left] = detection.mask[
            p_top - detection.top : p_bottom - detection.top,
            p_left - detection.left : p_right - detection.left,
        ]
    return out


def _linked(n: int, matches: dict[int, list[int]]) -> list[list[int]]:
    """The groups of detections that matches link, transitively (union-find), each in
    ascending index order, groups by their first index."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, others in matches.items():
        for j in others:
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _union(group: Sequence[Detection]) -> Detection:
    if len(group) == 1:
        return group[0]
    nonempty = [d for d in group if d.mask.size]
    if nonempty:
        windows = [_crop_window(d) for d in nonempty]
        hull = (
            min(w[0] for w in windows),
            max(w[1] for w in windows),
            min(w[2] for w in windows),
            max(w[3] for w in windows),
        )
        mask = np.zeros((hull[1] - hull[0], hull[3] - hull[2]), bool)
        for detection in nonempty:
            mask |= _pasted(detection, hull)
        top, left = hull[0], hull[2]
    else:
        top, left, mask = group[0].top, group[0].left, group[0].mask
    box = (
        min(d.box[0] for d in group),
        min(d.box[1] for d in group),
        max(d.box[2] for d in group),
        max(d.box[3] for d in group),
    )
    best = max(d.score for d in group)
    return Detection(top, left, mask, box, best, group[0].label, None)


def encoded(detections: Sequence[Detection], height: int, width: int) -> SlicedDetections:
    """The detections' RLEs on the ``height x width`` grid, and their boxes (clipped to the
    image, xywh), labels and scores."""
    boxes = np.array([d.box for d in detections], np.float64).reshape(-1, 4)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    boxes[:, 2:] -= boxes[:, :2]
    return SlicedDetections(
        boxes=boxes,
        labels=np.array([d.label for d in detections], np.int64),
        scores=np.array([d.score for d in detections], np.float64),
        encoded=rle.encode_crops_measured(
            [(d.top, d.left, d.mask) for d in detections], height, width
        ),
        height=height,
        width=width,
    )


def segment_sliced(
    model: Any,
    read: Read,
    height: int,
    width: int,
    slicing: Slicing,
    on_slice: Callable[[], None] | None = None,
    batch_size: int = 1,
) -> SlicedDetections:
    """An instance ``model``'s detections in a ``height x width`` image read slice by slice,
    up to ``batch_size`` slices to a forward pass (see the module docstring)."""
    windows = slicing.windows(height, width)
    detections = detect_slices(model, read, windows, on_slice, batch_size)
    return encoded(merge_detections(detections, windows, slicing), height, width)


def raster_reader(source: Any) -> Read:
    """:data:`Read` of a :class:`segflow.raster.RasterSource`: its windows as the model sees
    them, with their valid pixels."""

    def read(window: Window) -> tuple[torch.Tensor, np.ndarray] | None:
        valid = source.valid(window)
        if not valid.any():
            return None
        return torch.from_numpy(source.pixels(window)), valid

    return read
