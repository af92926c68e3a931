"""segflow.rle against pycocotools.mask, the reference implementation of COCO RLE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco

from segflow import rle
from segflow.rle import RLEError

# pycocotools' decode predates numpy 2's __array__ copy keyword.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Strategies and references


def _fill(draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    """A 0/1 uint8 array: pixel noise, or a few rectangles (long runs, whole columns)."""
    if draw(st.booleans()):
        return draw(arrays(np.uint8, shape, elements=st.integers(0, 1)))
    out = np.zeros(shape, np.uint8)
    for _ in range(draw(st.integers(0, 3))):
        y0, y1 = sorted(draw(st.integers(0, shape[-2])) for _ in range(2))
        x0, x1 = sorted(draw(st.integers(0, shape[-1])) for _ in range(2))
        out[..., y0:y1, x0:x1] ^= 1
    return out


@st.composite
def masks(draw: st.DrawFn, min_side: int = 0, max_side: int = 24) -> np.ndarray:
    h, w = (draw(st.integers(min_side, max_side)) for _ in range(2))
    return _fill(draw, (h, w))


@st.composite
def mask_batches(draw: st.DrawFn, min_n: int = 0, max_n: int = 5, min_side: int = 0):
    n = draw(st.integers(min_n, max_n))
    h, w = (draw(st.integers(min_side, 20)) for _ in range(2))
    return np.array([_fill(draw, (h, w)) for _ in range(n)], np.uint8).reshape(n, h, w)


@st.composite
def label_maps(draw: st.DrawFn) -> np.ndarray:
    h, w = (draw(st.integers(0, 24)) for _ in range(2))
    ids = draw(st.sampled_from([[0, 1], [0, 1, 2, 3], [3, 7, 200], [0, 5, 1000, 70000]]))
    dtype = draw(st.sampled_from([np.uint8, np.int32, np.int64, np.uint16, np.uint32]))
    if max(ids) > np.iinfo(dtype).max:
        dtype = np.int64
    if draw(st.booleans()):
        return draw(arrays(dtype, (h, w), elements=st.sampled_from(ids)))
    # Blobs: a coarse grid of ids, upsampled, so runs are long as in real label maps.
    coarse = draw(arrays(dtype, (3, 3), elements=st.sampled_from(ids)))
    rows, cols = np.arange(h) * 3 // max(h, 1), np.arange(w) * 3 // max(w, 1)
    return coarse[rows][:, cols]


def coco_encode(mask: np.ndarray) -> dict:
    return coco.encode(np.asfortranarray(mask, dtype=np.uint8))


def coco_encode_batch(batch: np.ndarray) -> list[dict]:
    return coco.encode(np.asfortranarray(batch.transpose(1, 2, 0), dtype=np.uint8))


# --------------------------------------------------------------------------------------------
# Encoding


@PROPERTY
@given(masks(), st.sampled_from([np.uint8, np.bool_, np.int64, np.int8]))
def test_encode_equals_pycocotools(mask, dtype):
    assert rle.encode(mask.astype(dtype)) == coco_encode(mask)


@PROPERTY
@given(mask_batches())
def test_encode_masks_equals_pycocotools_batch(batch):
    assert rle.encode_masks(batch) == coco_encode_batch(batch)


@PROPERTY
@given(label_maps(), st.sampled_from([None, 0, 3, 1000]))
def test_encode_label_map_equals_per_class_pycocotools(labels, ignore_index):
    expected = {int(c): coco_encode(labels == c) for c in np.unique(labels) if c != ignore_index}
    got = rle.encode_label_map(labels, ignore_index=ignore_index)
    assert got == expected
    assert list(got) == sorted(got)


def assert_measured_like_pycocotools(measured: rle.Measured, expected_rles: list[dict]) -> None:
    assert measured.rles == expected_rles
    if expected_rles:
        np.testing.assert_array_equal(measured.areas, coco.area(expected_rles))
        np.testing.assert_array_equal(measured.boxes, coco.toBbox(expected_rles))
    else:
        assert measured.areas.shape == (0,) and measured.boxes.shape == (0, 4)


@PROPERTY
@given(mask_batches())
def test_measured_masks_equal_pycocotools_area_and_bbox(batch):
    assert_measured_like_pycocotools(rle.encode_masks_measured(batch), coco_encode_batch(batch))


@PROPERTY
@given(label_maps(), st.sampled_from([None, 0, 3]))
def test_measured_label_map_equals_pycocotools_area_and_bbox(labels, ignore_index):
    classes, measured = rle.encode_label_map_measured(labels, ignore_index=ignore_index)
    present = [int(c) for c in np.unique(labels) if c != ignore_index]
    assert classes.tolist() == present
    assert_measured_like_pycocotools(measured, [coco_encode(labels == c) for c in present])


@PROPERTY
@given(label_maps(), st.sampled_from([None, 0, 3]), st.data())
def test_label_map_fed_in_pieces_encodes_as_the_whole_map(labels, ignore_index, data):
    """Pixels fed in column-major order, in pieces of any size (a run may span many), give
    the whole map's classes, RLEs, areas and boxes: pycocotools'."""
    height, width = labels.shape
    flat = labels.T.reshape(-1)
    cuts = sorted(data.draw(st.lists(st.integers(0, flat.size), max_size=6)))
    encoder = rle.LabelMapEncoder(height, width, ignore_index)
    for a, b in zip([0, *cuts], [*cuts, flat.size], strict=True):
        encoder.add(flat[a:b])
    classes, measured = encoder.finish()
    present = [int(c) for c in np.unique(labels) if c != ignore_index]
    assert classes.tolist() == present
    assert_measured_like_pycocotools(measured, [coco_encode(labels == c) for c in present])


def test_label_map_encoder_counts_its_pixels():
    encoder = rle.LabelMapEncoder(2, 3)
    encoder.add(np.zeros(4, np.uint8))
    with pytest.raises(RLEError, match="4 pixels fed of 2 x 3"):
        encoder.finish()
    with pytest.raises(RLEError, match="7 pixels fed, the map has 2 x 3"):
        encoder.add(np.zeros(3, np.uint8))
    with pytest.raises(RLEError, match="non-negative"):
        encoder.add(np.array([-1, 0], np.int8))
        encoder.finish()


def wide_mask() -> np.ndarray:
    """Sparse runs in far-right columns: a batch of two has column numbers past 2**16."""
    mask = np.zeros((3, 40_000), np.uint8)
    mask[:, 35_000:35_010] = 1
    mask[1, -1] = 1
    return mask


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(np.zeros((7, 5), np.uint8), id="empty"),
        pytest.param(np.ones((7, 5), np.uint8), id="full"),
        pytest.param(np.array([[1, 0, 1, 1, 0, 0, 1]], np.uint8), id="1xN"),
        pytest.param(np.array([[1], [1], [0], [1]], np.uint8), id="Nx1"),
        pytest.param(np.eye(9, 13, dtype=np.uint8), id="odd-diagonal"),
        pytest.param(np.pad(np.ones((3, 3), np.uint8), ((0, 2), (0, 2))), id="starts-with-1"),
        pytest.param(np.ones((300, 300), np.uint8), id="full-long-run"),
        pytest.param(np.pad(np.ones((300, 299), np.uint8), ((0, 0), (0, 1))), id="long-runs"),
        pytest.param(np.zeros((0, 5), np.uint8), id="0xN"),
        pytest.param(np.zeros((5, 0), np.uint8), id="Nx0"),
        pytest.param(np.zeros((0, 0), np.uint8), id="0x0"),
        pytest.param(wide_mask(), id="wider-than-2**16-columns-per-batch"),
    ],
)
def test_encode_edge_cases_equal_pycocotools(mask):
    expected = coco_encode(mask)
    assert rle.encode(mask) == expected
    assert rle.encode_masks(mask[None]) == [expected]
    assert rle.encode_masks(np.stack([mask, 1 - mask])) == coco_encode_batch(
        np.stack([mask, 1 - mask])
    )
    if mask.size:
        np.testing.assert_array_equal(rle.decode(expected), mask)


def test_long_runs_and_large_deltas_round_trip():
    mask = np.zeros((512, 300), np.uint8)
    mask[:, 100:250] = 1  # a run of 76,800 ones, then 25,600 zeros
    mask[7, 3] = 1
    expected = coco_encode(mask)
    assert rle.encode(mask) == expected
    np.testing.assert_array_equal(rle.decode(expected), mask)
    assert rle.area(expected) == coco.area(expected)


def test_zero_sized_inputs():
    """0xN masks encode to b"0" (as pycocotools); a 0xN label map has no classes."""
    assert rle.encode_masks(np.zeros((0, 4, 4), bool)) == []
    assert rle.encode_label_map(np.zeros((0, 6), np.int64)) == {}
    empty = {"size": [0, 5], "counts": b"0"}
    assert rle.decode(empty).shape == coco.decode(empty).shape == (0, 5)


def test_docstring_examples_are_what_pycocotools_writes():
    square = np.pad(np.ones((2, 2), np.uint8), 1)
    assert coco_encode(square)["counts"] == b"52203" == rle.encode(square)["counts"]
    assert rle.string_to_counts(b"52203", [4, 4]).tolist() == [5, 2, 2, 2, 5]
    counts = [5, 40, 3, 37]
    expected = coco.frPyObjects({"size": [5, 17], "counts": counts}, 5, 17)["counts"]
    assert expected == b"5X13M" == rle.counts_to_string(counts)


# --------------------------------------------------------------------------------------------
# The counts string codec


@PROPERTY
@given(
    st.lists(
        # rleToString writes past its buffer (6 characters per count) for values of 2**29 and
        # more, which need 7; values below 2**24 need at most 5.
        st.one_of(st.integers(0, 40), st.integers(0, 2**24 - 1), st.integers(2**16, 2**20)),
        min_size=1,
        max_size=30,
    )
)
def test_counts_string_codec_equals_pycocotools(counts):
    total = sum(counts)
    # pycocotools writes uncompressed counts with rleToString and needs no pixel buffer.
    expected = coco.frPyObjects({"size": [1, total], "counts": counts}, 1, total)["counts"]
    assert rle.counts_to_string(counts) == expected
    decoded = rle.string_to_counts(expected.decode(), [1, total])
    assert decoded.dtype == np.uint32
    assert decoded.tolist() == counts


@PROPERTY
@given(
    st.lists(st.integers(0, 2**30), min_size=1, max_size=3).flatmap(
        lambda c: st.permutations([*c, 2**32 - 1 - sum(c)])  # the largest uint32 mask
    )
)
def test_counts_string_codec_round_trips_uint32_extremes(counts):
    string = rle.counts_to_string(counts)
    assert rle.string_to_counts(string, [1, 2**32 - 1]).tolist() == counts


# --------------------------------------------------------------------------------------------
# Decoding and measuring


@PROPERTY
@given(mask_batches(min_n=1, min_side=1))
def test_decode_area_bbox_equal_pycocotools(batch):
    encoded = coco_encode_batch(batch)
    as_str = [{"size": r["size"], "counts": r["counts"].decode()} for r in encoded]
    np.testing.assert_array_equal(rle.decode_masks(as_str), coco.decode(encoded).transpose(2, 0, 1))
    np.testing.assert_array_equal(rle.decode(encoded[0]), coco.decode(encoded[0]))
    assert rle.area(encoded).dtype == np.uint32
    np.testing.assert_array_equal(rle.area(encoded), coco.area(encoded))
    np.testing.assert_array_equal(rle.to_bbox(encoded), coco.toBbox(encoded))
    np.testing.assert_array_equal(rle.to_bbox(encoded[0]), coco.toBbox(encoded[0]))
    assert rle.area(encoded[0]) == coco.area(encoded[0])


def test_bbox_quirks_equal_pycocotools():
    # One run of ones from the bottom of column 0 into the top of column 1.
    wraps = coco.frPyObjects({"size": [4, 4], "counts": [3, 2, 11]}, 4, 4)
    empty_run = coco.frPyObjects({"size": [2, 2], "counts": [1, 0, 3]}, 2, 2)
    for obj in (wraps, empty_run):
        np.testing.assert_array_equal(rle.to_bbox(obj), coco.toBbox(obj))
    np.testing.assert_array_equal(rle.to_bbox([]), coco.toBbox([]))
    np.testing.assert_array_equal(rle.area([]), coco.area([]))


# --------------------------------------------------------------------------------------------
# IoU and merge


@PROPERTY
@given(mask_batches(max_n=4), st.data())
def test_iou_of_rles_equals_pycocotools(batch, data):
    n_dt = data.draw(st.integers(0, len(batch)))
    dt, gt = coco_encode_batch(batch[:n_dt]), coco_encode_batch(batch[n_dt:])
    crowd = data.draw(st.lists(st.integers(0, 1), min_size=len(gt), max_size=len(gt)))
    expected = coco.iou(dt, gt, crowd)
    got = rle.iou(dt, gt, crowd)
    if isinstance(expected, list):
        assert got == expected
    else:
        assert got.shape == (len(dt), len(gt))
        np.testing.assert_array_equal(got, expected)


@PROPERTY
@given(mask_batches(max_n=8), st.data())
def test_iou_pairs_is_pycocotools_iou_of_each_pair(batch, data):
    half = len(batch) // 2
    a, b = coco_encode_batch(batch[:half]), coco_encode_batch(batch[half : 2 * half])
    if data.draw(st.booleans()):  # bytes or str counts, as a run's Parquet holds them
        b = [{"size": r["size"], "counts": r["counts"].decode()} for r in b]
    expected = [coco.iou([x], [y], [0])[0][0] for x, y in zip(a, b, strict=True)]
    got = rle.iou_pairs(a, b)
    assert got.dtype == np.float64 and got.shape == (half,)
    np.testing.assert_array_equal(got, np.array(expected, np.float64).reshape(half))


def test_iou_pairs_refuses_pairs_of_two_sizes_or_lists_of_two_lengths():
    small, large = coco_encode(np.eye(3, dtype=np.uint8)), coco_encode(np.eye(4, dtype=np.uint8))
    with pytest.raises(RLEError, match=r"pair 1 has masks of sizes \[3, 3\] and \[4, 4\]"):
        rle.iou_pairs([small, small], [small, large])
    with pytest.raises(RLEError, match="lists of one length, got 2 and 1"):
        rle.iou_pairs([small, small], [small])


def test_iou_of_different_sizes_equals_pycocotools():
    """-1 where the boxes overlap (only then does pycocotools compare sizes), else 0."""
    a = np.zeros((6, 6), np.uint8)
    a[1:4, 1:4] = 1
    b = np.zeros((6, 7), np.uint8)
    b[2:5, 2:5] = 1
    c = np.zeros((6, 7), np.uint8)
    c[5, 6] = 1
    dt, gt = [coco_encode(a)], [coco_encode(b), coco_encode(c)]
    expected = coco.iou(dt, gt, [0, 1])
    np.testing.assert_array_equal(rle.iou(dt, gt, [0, 1]), expected)
    assert expected.tolist() == [[-1.0, 0.0]]


boxes = arrays(
    np.float64,
    st.tuples(st.integers(1, 5), st.just(4)),
    elements=st.floats(-10, 40, allow_nan=False).map(lambda v: round(v, 2)),
)


@PROPERTY
@given(boxes, boxes, st.data())
def test_iou_of_boxes_equals_pycocotools(dt, gt, data):
    crowd = data.draw(st.lists(st.integers(0, 1), min_size=len(gt), max_size=len(gt)))
    np.testing.assert_array_equal(rle.iou(dt, gt, crowd), coco.iou(dt, gt, crowd))
    np.testing.assert_array_equal(
        rle.iou(dt.tolist(), gt.tolist(), crowd), coco.iou(dt.tolist(), gt.tolist(), crowd)
    )


def test_iou_of_empty_inputs_equals_pycocotools():
    one = [coco_encode(np.eye(3, dtype=np.uint8))]
    for dt, gt, crowd in [([], [], []), (one, [], []), ([], one, [0]), (np.zeros((0, 4)), [], [])]:
        assert rle.iou(dt, gt, crowd) == coco.iou(dt, gt, crowd) == []


@PROPERTY
@given(mask_batches(min_n=1, max_n=4), st.booleans())
def test_merge_equals_pycocotools(batch, intersect):
    encoded = coco_encode_batch(batch)
    assert rle.merge(encoded, intersect=intersect) == coco.merge(encoded, intersect=intersect)


def test_merge_of_nothing_equals_pycocotools():
    assert rle.merge([]) == coco.merge([])


# --------------------------------------------------------------------------------------------
# Polygons, boxes and uncompressed RLEs


@st.composite
def polygons(draw: st.DrawFn, h: int, w: int) -> list[list[float]]:
    """Polygons with points inside and outside the image, on and off the pixel grid."""
    coordinate = st.one_of(
        st.floats(-6, max(h, w) + 6, allow_nan=False),
        st.integers(-6, max(h, w) + 6).map(float),
        st.integers(-12, 2 * max(h, w) + 12).map(lambda v: v / 2),
    )
    # pycocotools reads the first polygon's length to tell polygons from boxes: > 4 numbers.
    first = draw(st.lists(coordinate, min_size=5, max_size=16))
    rest = draw(st.lists(st.lists(coordinate, min_size=0, max_size=16), max_size=2))
    return [first, *rest]


@PROPERTY
@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_polygons_equal_pycocotools(h, w, data):
    polys = data.draw(polygons(h, w))
    expected = coco.frPyObjects(polys, h, w)
    assert rle.fr_py_objects(polys, h, w) == expected
    assert rle.from_polygons(polys, h, w) == expected
    assert rle.fr_py_objects(polys[0], h, w) == expected[0]  # single-polygon form


@PROPERTY
@given(st.integers(1, 30), st.integers(1, 30), boxes)
def test_bboxes_equal_pycocotools(h, w, bbs):
    expected = coco.frPyObjects(bbs, h, w)
    assert rle.fr_py_objects(bbs, h, w) == expected
    assert rle.fr_py_objects(bbs.tolist(), h, w) == expected
    assert rle.fr_py_objects(bbs[0].tolist(), h, w) == expected[0]


def test_polygons_of_zero_height_image_equal_pycocotools():
    poly = [[0, 0, 2, 0, 2, 2]]
    assert rle.fr_py_objects(poly, 0, 4) == coco.frPyObjects(poly, 0, 4)


@PROPERTY
@given(mask_batches(min_n=1, max_n=3, min_side=1), st.data())
def test_uncompressed_rles_equal_pycocotools(batch, data):
    _, h, w = batch.shape
    uncompressed = []
    for mask in batch:
        flat = mask.T.reshape(-1)
        starts = np.flatnonzero(np.diff(flat, prepend=0, append=1 - flat[-1]))
        counts = np.diff(np.concatenate(([0], starts))).tolist()
        if data.draw(st.booleans()):  # empty runs are legal in uncompressed counts
            counts[1:1] = [0, 0]
        uncompressed.append({"size": [h, w], "counts": counts})
    assert rle.fr_py_objects(uncompressed, h, w) == coco.frPyObjects(uncompressed, h, w)
    assert rle.fr_py_objects(uncompressed[0], h, w) == coco.frPyObjects(uncompressed[0], h, w)


# --------------------------------------------------------------------------------------------
# Torch tensors


@PROPERTY
@given(mask_batches(), label_maps())
def test_cpu_tensors_equal_numpy(batch, labels):
    assert rle.encode_masks(torch.from_numpy(batch.astype(bool))) == rle.encode_masks(batch)
    tensor_labels = torch.from_numpy(labels.astype(np.int64))
    assert rle.encode_label_map(tensor_labels) == rle.encode_label_map(labels)


@PROPERTY
@given(mask_batches(), label_maps(), st.sampled_from([torch.bool, torch.uint8, torch.int64]))
def test_device_run_finder_on_cpu_equals_pycocotools(batch, labels, mask_dtype):
    """CUDA tensors take the torch run finder; force it on CPU tensors to check it here."""
    expected = {int(c): coco_encode(labels == c) for c in np.unique(labels)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rle, "_fortran_runs", rle._fortran_runs_torch)
        tensor_batch = torch.from_numpy(batch).to(mask_dtype)
        assert rle.encode_masks(tensor_batch) == coco_encode_batch(batch)
        assert rle.encode_label_map(torch.from_numpy(labels.astype(np.int64))) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_equal_numpy():
    gen = np.random.default_rng(0)
    labels = np.repeat(np.repeat(gen.integers(0, 19, (40, 60)), 8, 0), 8, 1)
    batch = gen.random((6, 97, 131)) < 0.3
    assert rle.encode_label_map(torch.from_numpy(labels).cuda()) == rle.encode_label_map(labels)
    assert rle.encode_masks(torch.from_numpy(batch).cuda()) == coco_encode_batch(batch)


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rle.encode(np.zeros((3, 3), np.float32)), "bool or integer"),
        (lambda: rle.encode(torch.zeros(3, 3)), "bool or integer"),
        (lambda: rle.encode(np.zeros((2, 3, 3), np.uint8)), r"\(H, W\)"),
        (lambda: rle.encode_masks(np.zeros((3, 3), np.uint8)), r"\(N, H, W\)"),
        (lambda: rle.encode(np.array([[0, 2]], np.uint8)), "binary"),
        (lambda: rle.encode_masks(np.full((1, 2, 2), -1)), "binary"),
        (lambda: rle.encode_label_map(np.array([[0, -3]])), "non-negative"),
        (lambda: rle.encode_label_map(np.zeros((2, 2), np.float64)), "bool or integer"),
        (lambda: rle.decode({"size": [2, 2], "counts": b"1!"}), "invalid character '!'"),
        (lambda: rle.decode({"size": [2, 2], "counts": "1é"}), "non-ASCII"),
        (lambda: rle.decode({"size": [2, 2], "counts": b"1X"}), "truncated"),
        (lambda: rle.decode({"size": [2, 2], "counts": b"XXXXXXX1"}), "longer than"),
        (lambda: rle.decode({"size": [2, 2], "counts": b"1"}), "sum to 1, expected"),
        (lambda: rle.decode({"size": [2, 2], "counts": b"5"}), "sum to 5, expected"),
        (lambda: rle.decode({"size": [2, 2], "counts": b"111M"}), "negative run"),
        (lambda: rle.decode({"size": [2, 2], "counts": [1, 3]}), "fr_py_objects"),
        (lambda: rle.decode({"size": [-2, 2], "counts": b"0"}), "size"),
        (lambda: rle.decode({"counts": b"4"}), "'size' and 'counts'"),
        (lambda: rle.decode_masks([]), "at least one"),
        (
            lambda: rle.decode_masks(
                [{"size": [2, 2], "counts": b"4"}, {"size": [1, 4], "counts": b"4"}]
            ),
            "different sizes",
        ),
        (
            lambda: rle.area([{"size": [2, 2], "counts": b"4"}, {"size": [2, 2], "counts": b"3"}]),
            r"rles\[1\]: counts sum to 3",
        ),
        (
            lambda: rle.merge([{"size": [2, 2], "counts": b"4"}, {"size": [1, 4], "counts": b"4"}]),
            "different sizes",
        ),
        (lambda: rle.iou([{"size": [2, 2], "counts": b"4"}], [[0, 0, 1, 1]], [0]), "both"),
        (lambda: rle.iou([[0, 0, 1, 1]], [[0, 0, 1, 1]], [0, 1]), "iscrowd has 2 flags"),
        (lambda: rle.iou(np.zeros((2, 3)), np.zeros((2, 4)), [0, 0]), r"\(N, 4\)"),
        (lambda: rle.counts_to_string([3, -1]), r"\[0, 2\*\*32\)"),
        (lambda: rle.counts_to_string([1.5]), "integers"),
        (lambda: rle.string_to_counts(b"12", [1, 4]), "sum to 3"),
        (lambda: rle.fr_py_objects([[0, 0, float("nan"), 1, 2, 2]], 4, 4), "finite"),
        (lambda: rle.fr_py_objects({"size": [2, 2], "counts": [1, 2]}, 2, 2), "sum to 3"),
        (lambda: rle.fr_py_objects({"size": [2, 3], "counts": [6]}, 2, 2), "differs"),
        (lambda: rle.fr_py_objects("polygon", 2, 2), "boxes, polygons or RLE dicts"),
        (lambda: rle.fr_py_objects([[1, 2]], 2, 2), "boxes, polygons or RLE dicts"),
        (lambda: rle.fr_py_objects([[0, 0, 1, 1], [0, 1]], 2, 2), r"\(N, 4\)"),
        (lambda: rle.fr_py_objects([[0, 0, 1, 1]], 2.5, 2), "size"),
    ],
)
def test_bad_input_raises_rle_error(call, message):
    with pytest.raises(RLEError, match=message):
        call()


def test_rle_error_is_a_value_error():
    assert issubclass(RLEError, ValueError)
