"""COCO run-length encoding (RLE) of binary masks, byte-for-byte compatible with pycocotools.

Format
------
An RLE is ``{"size": [h, w], "counts": bytes}``. The mask is flattened in column-major
(Fortran) order, i.e. down the first column, then down the second, and cut into runs of equal
value. Runs alternate and always start with zeros, so ``counts[0]`` is the number of leading
zeros (``0`` when the mask starts with a one), ``counts[1]`` the number of ones that follow,
and so on; the last run is whatever the last pixel is. The counts sum to ``h * w``.

The counts are stored as an ASCII string. Each count ``x`` is first replaced by the delta
``x - counts[i - 2]`` when its index ``i > 2`` (a run tends to resemble the run of the same
value before it), then written as a little-endian sequence of 5-bit groups, one character
per group: a group's bit ``0x20`` says "more groups follow", the last group's bit ``0x10`` is
the sign bit of the value (two's complement), and the character is the group plus 48, so
every character lies in ``'0'`` (48) to ``'o'`` (111). A value uses as few groups as its
sign-extended bits need.

Example: the 4x4 mask::

    0 0 0 0
    0 1 1 0
    0 1 1 0
    0 0 0 0

flattens column by column to ``0000 0110 0110 0000``, so its counts are ``[5, 2, 2, 2, 5]``.
The first three are written as they are (``'5' '2' '2'``); the last two as deltas against
the count two places back: ``2 - 2 = 0`` (``'0'``) and ``5 - 2 = 3`` (``'3'``), giving
``b"52203"``. Larger and negative values need more characters: counts ``[5, 40, 3, 37]``
(a 5x17 mask) give ``b"5X13M"``: 40 is ``0b1_01000``, written as the group ``01000`` with
the continuation bit (``8 + 32 + 48 = 'X'``) then ``00001`` (``'1'``); the delta
``37 - 40 = -3`` is the single group ``11101`` whose sign bit is set (``29 + 48 = 'M'``).

API
---
Encoding takes numpy arrays or torch tensors (bool or integer). The hot paths find all run
boundaries of a whole batch (:func:`encode_masks`) or of every class of a label map
(:func:`encode_label_map`) in one vectorised pass, and write all the strings in one batched
call; :class:`LabelMapEncoder` encodes a label map too large to hold from its pixels fed in
column-major order, piece by piece. CPU tensors are read through a zero-copy numpy view;
tensors on an accelerator are searched on their device, and only run positions and values
cross to the host. Everything else (:func:`decode`, :func:`area`, :func:`to_bbox`,
:func:`iou`, :func:`merge`, :func:`fr_py_objects`) mirrors ``pycocotools.mask`` on lists of
RLE dicts, whose ``counts`` may be bytes or str. :func:`iou_pairs` is ``iou`` row by row:
mask ``i`` of one list against mask ``i`` of the other (``pycocotools.mask.iou([a[i]],
[b[i]], [0])``, without the matrix), for a column of pairs such as SQL's ``rle_iou``.

Where pycocotools reads past a buffer or returns garbage, this module raises :class:`RLEError`
instead: corrupt counts strings, counts that do not add up to ``h * w``, masks with values
other than 0 and 1, merging masks of different sizes. Masks with a zero-sized side are
valid: their RLE is ``counts == b"0"``, as pycocotools encodes them (for polygons on a
zero-width image pycocotools writes counts that do not add up; this module writes ``b"0"``
there too), and a label map with no pixels has no classes.
"""

from __future__ import annotations

import itertools
import operator
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import numpy as np

from segflow.errors import SegflowError

if TYPE_CHECKING:
    import torch

__all__ = [
    "RLE",
    "LabelMapEncoder",
    "RLEError",
    "area",
    "counts_to_string",
    "decode",
    "decode_masks",
    "encode",
    "encode_crops_measured",
    "encode_label_map",
    "encode_masks",
    "fr_py_objects",
    "from_bboxes",
    "from_polygons",
    "iou",
    "merge",
    "string_to_counts",
    "to_bbox",
]


class RLEError(SegflowError, ValueError):
    """A mask, label map, RLE or polygon that cannot be encoded or decoded."""


class RLE(TypedDict):
    size: list[int]
    counts: bytes


# pycocotools stores counts as C uint32.
_UINT32_LIMIT = 1 << 32
# A count or delta of uint32 counts fits in 35 bits, i.e. at most 7 characters.
_MAX_CHARS_PER_VALUE = 7
_CHAR_OFFSET = 48
_LAST_CHAR = _CHAR_OFFSET + 63
# While at most 1/8 of the 8-pixel words hold a run start, sorting the starts into Fortran order
# beats transposing the whole boundary mask.
_SPARSE_WORDS_RATIO = 8
# rleFrPoly rasterises polygons on a grid this many times finer than the image.
_POLY_SCALE = 5.0
# Far beyond any polygon inside a uint32-sized image (whose perimeter is < 2**20 grid points);
# guards memory against absurd coordinates.
_MAX_POLYGON_POINTS = 1 << 25


# --------------------------------------------------------------------------------------------
# Batches of counts: every RLE's counts end to end, with offsets.


class _Counts(NamedTuple):
    values: np.ndarray  # int64, all counts end to end
    offsets: np.ndarray  # int64, len n + 1; RLE i owns values[offsets[i]:offsets[i + 1]]
    sizes: np.ndarray  # int64 (n, 2): [h, w] per RLE

    def __len__(self) -> int:
        return len(self.sizes)

    def owner(self) -> np.ndarray:
        return _owner(self.offsets)

    def local_index(self) -> np.ndarray:
        return _local_index(self.offsets)

    def run_starts(self) -> np.ndarray:
        """Where each run starts inside its own mask (flat Fortran index)."""
        ends = np.concatenate(([0], np.cumsum(self.values)))
        return ends[:-1] - np.repeat(ends[self.offsets[:-1]], np.diff(self.offsets))

    def areas(self) -> np.ndarray:
        ones = np.where(self.local_index() % 2 == 1, self.values, 0)
        totals = np.concatenate(([0], np.cumsum(ones)))
        return totals[self.offsets[1:]] - totals[self.offsets[:-1]]


def _segment_offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)


def _owner(offsets: np.ndarray) -> np.ndarray:
    """Which segment each element belongs to."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _local_index(offsets: np.ndarray) -> np.ndarray:
    """Each element's index inside its own segment."""
    return np.arange(offsets[-1]) - np.repeat(offsets[:-1], np.diff(offsets))


def _differs_from_previous(values: np.ndarray) -> np.ndarray:
    """True where a sorted array starts a new value (always at index 0)."""
    new = np.ones(len(values), dtype=bool)
    new[1:] = values[1:] != values[:-1]
    return new


# --------------------------------------------------------------------------------------------
# The counts string codec, vectorised over many RLEs at once.


def _counts_to_strings(counts: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """Write the counts of many RLEs (``counts[offsets[i]:offsets[i + 1]]``) as strings."""
    values = counts.astype(np.int64)
    values[2:] -= counts[:-2]
    # The first three counts of each RLE are written as they are.
    head = (offsets[:-1, None] + np.arange(3)).reshape(-1)
    head = head[head < np.repeat(offsets[1:], 3)]
    values[head] = counts[head]
    return _values_to_strings(values, offsets)


def _values_to_strings(values: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """Write values already delta-coded (int64) as the strings of many RLEs."""
    # A value takes one character per 5 bits of its two's complement, sign bit included:
    # (bit length of x, or of ~x when negative, + 1) / 5, rounded up. frexp gives bit lengths.
    magnitude = values ^ (values >> 63)
    n_chars = (np.frexp(magnitude)[1] + 5) // 5
    char_ends = np.cumsum(n_chars)
    value_of_char = np.repeat(np.arange(len(values)), n_chars)
    shift = 5 * (np.arange(len(value_of_char)) - (char_ends - n_chars)[value_of_char])
    chars = ((values[value_of_char] >> shift) & 0x1F) | 0x20
    chars[char_ends - 1] &= 0x1F  # no continuation bit on a value's last character
    text = (chars + _CHAR_OFFSET).astype(np.uint8).tobytes()

    string_ends = np.concatenate(([0], char_ends))[offsets].tolist()
    return [text[a:b] for a, b in itertools.pairwise(string_ends)]


def _strings_to_counts(strings: Sequence[bytes], sizes: np.ndarray, what: str) -> _Counts:
    """Parse many counts strings at once and check each against its mask size."""
    string_offsets = _segment_offsets([len(s) for s in strings])
    chars = np.frombuffer(b"".join(strings), dtype=np.uint8)

    def locate(char_index: int) -> tuple[str, int]:
        i = int(np.searchsorted(string_offsets, char_index, side="right")) - 1
        return (f"{what}[{i}]" if len(strings) > 1 else what), char_index - int(string_offsets[i])

    bad = np.flatnonzero((chars < _CHAR_OFFSET) | (chars > _LAST_CHAR))
    if bad.size:
        name, position = locate(int(bad[0]))
        raise RLEError(
            f"{name}: counts string has invalid character {chr(chars[bad[0]])!r} at position "
            f"{position} (allowed: '0' to 'o')"
        )
    groups = chars - _CHAR_OFFSET
    is_last = (groups & 0x20) == 0
    nonempty = np.flatnonzero(np.diff(string_offsets) > 0)
    truncated = nonempty[~is_last[string_offsets[nonempty + 1] - 1]]
    if truncated.size:
        name, _ = locate(int(string_offsets[truncated[0]]))
        raise RLEError(f"{name}: counts string is truncated mid-value")

    value_ends = np.flatnonzero(is_last)
    n_chars = np.diff(value_ends, prepend=-1)
    value_starts = value_ends - n_chars + 1
    too_long = np.flatnonzero(n_chars > _MAX_CHARS_PER_VALUE)
    if too_long.size:
        name, position = locate(int(value_starts[too_long[0]]))
        raise RLEError(
            f"{name}: counts string has a value at position {position} that is longer than "
            "any uint32 count"
        )
    position = np.arange(len(groups)) - np.repeat(value_starts, n_chars)
    bits = (groups & 0x1F).astype(np.int64) << (5 * position)
    deltas = np.add.reduceat(bits, value_starts) if len(value_starts) else bits
    negative = (groups[value_ends] & 0x10) != 0
    deltas[negative] -= np.int64(1) << (5 * n_chars[negative])

    values_before = np.concatenate(([0], np.cumsum(is_last)))
    offsets = values_before[string_offsets].astype(np.int64)
    counts = _undo_deltas(deltas, offsets)
    _check_counts(_Counts(counts, offsets, sizes), what)
    return _Counts(counts, offsets, sizes)


def _undo_deltas(deltas: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """counts[i] = deltas[i] + counts[i - 2] for i > 2 within each RLE: two running sums."""
    local, owner = _local_index(offsets), _owner(offsets)
    chained = np.where(local == 0, 0, deltas)
    counts = np.empty_like(deltas)
    for parity in (0, 1):
        chain = np.flatnonzero(local % 2 == parity)
        sums = np.cumsum(chained[chain])
        starts_rle = _differs_from_previous(owner[chain])
        sum_before_rle = (sums - chained[chain])[starts_rle]
        counts[chain] = sums - sum_before_rle[np.cumsum(starts_rle) - 1]
    counts[local == 0] = deltas[local == 0]
    return counts


def _check_counts(batch: _Counts, what: str) -> None:
    def name(i: int) -> str:
        return f"{what}[{i}]" if len(batch) > 1 else what

    bad = np.flatnonzero((batch.values < 0) | (batch.values >= _UINT32_LIMIT))
    if bad.size:
        i = int(batch.owner()[bad[0]])
        value = int(batch.values[bad[0]])
        problem = "a negative run" if value < 0 else "a run longer than uint32"
        raise RLEError(f"{name(i)}: counts hold {problem} ({value})")
    totals = np.concatenate(([0], np.cumsum(batch.values)))
    sums = totals[batch.offsets[1:]] - totals[batch.offsets[:-1]]
    pixels = batch.sizes[:, 0] * batch.sizes[:, 1]
    wrong = np.flatnonzero(sums != pixels)
    if wrong.size:
        i = int(wrong[0])
        h, w = batch.sizes[i]
        raise RLEError(f"{name(i)}: counts sum to {sums[i]}, expected h*w = {h}*{w} = {h * w}")


def counts_to_string(counts: Any) -> bytes:
    """The compressed counts string of one RLE's run lengths (as ``rleToString``)."""
    values = _as_counts_array(counts, "counts")
    return _counts_to_strings(values, np.array([0, len(values)]))[0]


def string_to_counts(s: bytes | str, size: Sequence[int]) -> np.ndarray:
    """The uint32 run lengths of a counts string (as ``rleFrString``), checked against size."""
    h, w = _parse_size(size, "size")
    parsed = _strings_to_counts([_as_bytes(s, "counts")], np.array([[h, w]]), "counts")
    return parsed.values.astype(np.uint32)


def _as_counts_array(counts: Any, what: str) -> np.ndarray:
    values = np.asarray(counts)
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise RLEError(f"{what} must be a 1-D sequence of integers, got a {values.dtype} array")
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= _UINT32_LIMIT):
        raise RLEError(
            f"{what} must be run lengths in [0, 2**32), got {values.min()}..{values.max()}"
        )
    return values


def _as_bytes(counts: Any, what: str) -> bytes:
    if isinstance(counts, bytes):
        return counts
    if isinstance(counts, str):
        try:
            return counts.encode("ascii")
        except UnicodeEncodeError:
            raise RLEError(f"{what}: counts string has non-ASCII characters") from None
    raise RLEError(
        f"{what}: counts must be a compressed bytes or str string, got {type(counts).__name__} "
        "(convert uncompressed list counts with fr_py_objects)"
    )


def _parse_size(size: Any, what: str) -> tuple[int, int]:
    try:
        h, w = (operator.index(v) for v in size)
    except (TypeError, ValueError):
        raise RLEError(f"{what}: size must be [h, w], got {size!r}") from None
    if h < 0 or w < 0 or h * w >= _UINT32_LIMIT:
        raise RLEError(f"{what}: size {[h, w]} is negative or has 2**32 pixels or more")
    return h, w


def _parse_rles(rles: Sequence[Any], what: str) -> _Counts:
    if isinstance(rles, dict):
        raise RLEError(f"{what} must be a list of RLE dicts, got a single dict")
    strings, sizes = [], []
    for i, rle in enumerate(rles):
        name = f"{what}[{i}]"
        if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
            raise RLEError(f"{name} must be a dict with 'size' and 'counts', got {rle!r:.80}")
        sizes.append(_parse_size(rle["size"], name))
        strings.append(_as_bytes(rle["counts"], name))
    return _strings_to_counts(strings, np.array(sizes, dtype=np.int64).reshape(-1, 2), what)


def _to_rles(batch: _Counts) -> list[RLE]:
    strings = _counts_to_strings(batch.values, batch.offsets)
    sizes = batch.sizes.tolist()
    return [{"size": size, "counts": s} for size, s in zip(sizes, strings, strict=True)]


# --------------------------------------------------------------------------------------------
# Encoding: find runs in Fortran order, then turn each class's (or mask's) runs into counts.


def _is_tensor(array: Any) -> bool:
    # Looked up, not imported: numpy users need not pay for importing torch.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(array, torch.Tensor)


def _as_image_array(array: Any, ndim: int, what: str, layout: str) -> Any:
    """A bool/integer numpy array or tensor of the given rank."""
    if not _is_tensor(array):
        array = np.asarray(array)
        if array.dtype.kind not in "biu":
            raise RLEError(f"{what} must be bool or integer, got dtype {array.dtype}")
    elif array.is_floating_point() or array.is_complex():
        raise RLEError(f"{what} must be bool or integer, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise RLEError(f"{what} must be {layout}, got shape {tuple(array.shape)}")
    if array.shape[-2] * array.shape[-1] >= _UINT32_LIMIT:
        raise RLEError(f"{what} has {tuple(array.shape)} pixels per mask; COCO counts are uint32")
    return array


def _fortran_runs(planes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Run starts and values of each (H, W) plane of a (K, H, W) array or tensor, flattened in
    Fortran order plane after plane; every plane starts a run. Starts are flat int64 indices."""
    if _is_tensor(planes):
        if planes.device.type != "cpu":
            return _fortran_runs_torch(planes)
        planes = planes.numpy()
    return _fortran_runs_numpy(planes)


def _fortran_runs_numpy(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k, h, w = planes.shape
    if planes.size == 0:
        return np.empty(0, np.int64), planes.reshape(-1)
    # Compare in the array's own (row-major) layout: that reads memory once, in order, whatever
    # the dtype, where a Fortran-order copy of an int64 label map costs 8 bytes per pixel. The
    # result is padded to whole 8-byte words: runs are sparse, and scanning words for run starts
    # is several times faster than scanning pixels.
    words = np.zeros(-(-planes.size // 8), dtype=np.uint64)
    is_start = words.view(bool)[: planes.size].reshape(k, h, w)
    np.not_equal(planes[:, 1:], planes[:, :-1], out=is_start[:, 1:])
    np.not_equal(planes[:, 0, 1:], planes[:, -1, :-1], out=is_start[:, 0, 1:])
    is_start[:, 0, 0] = True
    busy_words = np.flatnonzero(words != 0)
    if len(busy_words) * _SPARSE_WORDS_RATIO > len(words):
        starts = np.flatnonzero(is_start.transpose(0, 2, 1))
        plane, rest = np.divmod(starts, h * w)
        x, y = np.divmod(rest, h)
        return starts, planes[plane, y, x]
    word, byte = np.nonzero(words[busy_words].view(bool).reshape(-1, 8))
    # Found in row-major order; a stable sort by column gives Fortran order, and sorting
    # column numbers below 2**16 is a linear-time radix sort.
    row, x = np.divmod(busy_words[word] * 8 + byte, w)
    plane, y = np.divmod(row, h)
    column = plane * w + x
    order = np.argsort(column.astype(np.uint16) if k * w <= 1 << 16 else column, kind="stable")
    return (column * h + y)[order], planes[plane, y, x][order]


def _fortran_runs_torch(planes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """As _fortran_runs_numpy, on the tensor's device; only the runs are copied to the host."""
    import torch

    _, h, w = planes.shape
    flat = planes.transpose(1, 2).reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, np.int64), flat.cpu().numpy()
    is_start = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    torch.ne(flat[1:], flat[:-1], out=is_start[1:])
    is_start[:: h * w] = True
    starts = torch.nonzero(is_start).squeeze(1)
    return starts.cpu().numpy(), flat[starts].cpu().numpy()


def _counts_from_runs(
    starts: np.ndarray, ends: np.ndarray, group: np.ndarray, n_groups: int, pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the binary masks whose ones are the given runs.

    Runs are sorted by group, then position; runs of one group never touch. A group without
    runs is an empty mask. Returns all counts end to end and their offsets.
    """
    per_group = np.bincount(group, minlength=n_groups)
    first = np.cumsum(per_group) - per_group
    present = per_group > 0
    last_end = np.zeros(n_groups, np.int64)
    last_end[present] = ends[(first + per_group - 1)[present]]
    tail = pixels - last_end
    has_tail = (tail > 0) | ~present
    offsets = _segment_offsets(2 * per_group + has_tail)

    previous_end = np.empty_like(ends)
    previous_end[1:] = ends[:-1]
    previous_end[first[present]] = 0
    # Run i of the batch is preceded by 2 * i counts of runs plus one tail per earlier group.
    slot = 2 * np.arange(len(starts)) + (offsets[:-1] - 2 * first)[group]
    counts = np.empty(offsets[-1], np.int64)
    counts[slot] = starts - previous_end
    counts[slot + 1] = ends - starts
    counts[offsets[1:][has_tail] - 1] = tail[has_tail]
    return counts, offsets


class Measured(NamedTuple):
    """RLEs with their areas and boxes, taken from the runs while encoding (no re-parsing of
    the strings): ``areas[i] == area(rles[i])`` and ``boxes[i] == to_bbox(rles[i])``."""

    rles: list[RLE]
    areas: np.ndarray  # (N,) int64, pixels
    boxes: np.ndarray  # (N, 4) float64, [x, y, w, h]


def _measured(batch: _Counts) -> Measured:
    return Measured(_to_rles(batch), batch.areas(), _bboxes(batch))


def _masks_counts(masks: np.ndarray | torch.Tensor) -> _Counts:
    masks = _as_image_array(masks, 3, "masks", "(N, H, W)")
    n, h, w = (int(v) for v in masks.shape)
    starts, values = _fortran_runs(masks)
    if values.dtype != bool and np.any((values != 0) & (values != 1)):
        bad = values[(values != 0) & (values != 1)][0]
        raise RLEError(f"masks must be binary (0 or 1), found value {bad}")
    pixels = h * w
    ends = np.append(starts[1:], n * pixels)
    ones = np.flatnonzero(values != 0)
    plane = starts[ones] // max(pixels, 1)  # masks without pixels have no runs
    counts, offsets = _counts_from_runs(
        starts[ones] - plane * pixels, ends[ones] - plane * pixels, plane, n, pixels
    )
    return _Counts(counts, offsets, np.tile([h, w], (n, 1)))


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[RLE]:
    """RLEs of a batch of binary masks (N, H, W): bool, or integers 0 and 1.

    Equal to ``pycocotools.mask.encode`` of the same masks as a Fortran (H, W, N) array.
    """
    return _to_rles(_masks_counts(masks))


def encode_masks_measured(masks: np.ndarray | torch.Tensor) -> Measured:
    """:func:`encode_masks`, with each mask's area and box."""
    return _measured(_masks_counts(masks))


def encode_crops_measured(
    crops: Sequence[tuple[int, int, np.ndarray]], height: int, width: int
) -> Measured:
    """:func:`encode_masks_measured` of masks held cropped: ``(top, left, mask)`` is the
    ``height x width`` mask that is ``mask`` (a bool (h, w) array) at rows ``top:top + h``,
    columns ``left:left + w`` and 0 elsewhere. Equal to encoding the full planes, which are
    never built: the runs are found in the crops and moved onto the full grid."""
    if height * width >= _UINT32_LIMIT:
        raise RLEError(f"a {height}x{width} mask has too many pixels; COCO counts are uint32")
    starts, ends, groups = [], [], []
    for index, (top, left, mask) in enumerate(crops):
        h, w = mask.shape
        if top < 0 or left < 0 or top + h > height or left + w > width:
            raise RLEError(
                f"crop {index}: a {h}x{w} mask at row {top}, column {left} is outside the "
                f"{height}x{width} grid"
            )
        # A zero row under each column keeps every run of ones inside its column.
        padded = np.zeros((h + 1, w), bool)
        padded[:h] = mask
        edges = np.diff(padded.ravel(order="F").view(np.int8), prepend=np.int8(0))
        first, after = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        column = first // (h + 1)
        origin = (left + column) * height + top - column * (h + 1)
        starts.append(origin + first)
        ends.append(origin + after)
        groups.append(np.full(len(first), index, np.int64))
    n = len(crops)
    start, end, group = (
        np.concatenate(parts) if parts else np.empty(0, np.int64)
        for parts in (starts, ends, groups)
    )
    # Runs touch across columns only when a crop spans the whole height: join them.
    joined = np.flatnonzero((start[1:] == end[:-1]) & (group[1:] == group[:-1])) + 1
    keep = np.ones(len(start), bool)
    keep[joined] = False
    last_of_run = np.append(keep[1:], True)[: len(keep)]
    counts, offsets = _counts_from_runs(
        start[keep], end[last_of_run], group[keep], n, height * width
    )
    return _measured(_Counts(counts, offsets, np.tile([height, width], (n, 1))))


def encode(mask: np.ndarray | torch.Tensor) -> RLE:
    """RLE of one binary mask (H, W), as ``pycocotools.mask.encode``."""
    return encode_masks(_as_image_array(mask, 2, "mask", "(H, W)")[None])[0]


def _label_map_counts(
    labels: np.ndarray | torch.Tensor, ignore_index: int | None
) -> tuple[np.ndarray, _Counts]:
    labels = _as_image_array(labels, 2, "labels", "(H, W)")
    h, w = (int(v) for v in labels.shape)
    starts, values = _fortran_runs(labels[None])
    if values.dtype == bool:
        values = values.astype(np.uint8)
    return _runs_counts(starts, values, h, w, ignore_index)


def _runs_counts(
    starts: np.ndarray, values: np.ndarray, h: int, w: int, ignore_index: int | None
) -> tuple[np.ndarray, _Counts]:
    ends = np.append(starts[1:], h * w)
    if ignore_index is not None:
        kept = values != ignore_index
        starts, ends, values = starts[kept], ends[kept], values[kept]
    if values.size and values.min() < 0:
        raise RLEError(f"labels must be non-negative class ids, found {values.min()}")

    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    new_class = _differs_from_previous(sorted_values)
    classes = sorted_values[new_class]
    counts, offsets = _counts_from_runs(
        starts[order], ends[order], np.cumsum(new_class) - 1, len(classes), h * w
    )
    return classes, _Counts(counts, offsets, np.tile([h, w], (len(classes), 1)))


def encode_label_map(
    labels: np.ndarray | torch.Tensor, ignore_index: int | None = None
) -> dict[int, RLE]:
    """RLE of every class present in a label map (H, W) of non-negative integer class ids.

    ``result[c]`` equals ``pycocotools.mask.encode`` of ``labels == c``. The map is scanned
    once: runs are found in Fortran order and grouped by class, no per-class mask is built.
    Pixels equal to ``ignore_index`` belong to no class.
    """
    classes, batch = _label_map_counts(labels, ignore_index)
    return {int(c): rle for c, rle in zip(classes, _to_rles(batch), strict=True)}


def encode_label_map_measured(
    labels: np.ndarray | torch.Tensor, ignore_index: int | None = None
) -> tuple[np.ndarray, Measured]:
    """:func:`encode_label_map` as the ascending class ids present and their RLEs, areas
    and boxes."""
    classes, batch = _label_map_counts(labels, ignore_index)
    return classes, _measured(batch)


class _ClassStream:
    """One class's RLE while a label map streams in: its counts string so far, the state its
    next counts are written against, and its area and box (rleToBbox's terms)."""

    def __init__(self, height: int, width: int) -> None:
        self.height = height
        self.end = 0  # where the class's last run of ones ended
        self.written = 0  # counts written so far
        self.last_two = np.zeros(2, np.int64)  # the last two counts, for the deltas
        self.text: list[bytes] = []
        self.area = 0
        self.xs, self.xe, self.ys, self.ye = width, 0, height, 0
        self.spans_columns = False

    def add_runs(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Runs of ones at flat Fortran positions, in order, after every earlier one."""
        counts = np.empty(2 * len(starts), np.int64)
        counts[0::2] = starts - np.concatenate(([self.end], ends[:-1]))
        counts[1::2] = ends - starts
        self._write(counts)
        self.end = int(ends[-1])
        self.area += int((ends - starts).sum())
        first, last = starts, ends - 1
        x_start, x_end = first // self.height, last // self.height
        self.xs = min(self.xs, int(x_start.min()))
        self.xe = max(self.xe, int(x_end.max()))
        self.ys = min(self.ys, int((first % self.height).min()))
        self.ye = max(self.ye, int((last % self.height).max()))
        self.spans_columns |= bool((x_start < x_end).any())

    def finish(self, pixels: int) -> tuple[bytes, list[int]]:
        """The counts string, with the trailing zeros, and the box [x, y, w, h]."""
        if pixels > self.end:
            self._write(np.array([pixels - self.end], np.int64))
        ys, ye = (0, self.height - 1) if self.spans_columns else (self.ys, self.ye)
        box = [self.xs, ys, (self.xe - self.xs + 1) % _UINT32_LIMIT, (ye - ys + 1) % _UINT32_LIMIT]
        text = b"".join(self.text)
        self.text.clear()  # the pieces, once joined, are a second copy of the RLE
        return text, box

    def _write(self, counts: np.ndarray) -> None:
        # Count i is written as the delta to count i - 2 from the fourth on.
        before = np.concatenate((self.last_two, counts))
        index = self.written + np.arange(len(counts))
        values = np.where(index >= 3, counts - before[: len(counts)], counts)
        self.text.append(_values_to_strings(values, np.array([0, len(values)]))[0])
        self.last_two = before[-2:]
        self.written += len(counts)


class LabelMapEncoder:
    """:func:`encode_label_map_measured` of a label map too large to hold, fed in pieces.

    ``add(pixels)`` takes the map's next pixels in Fortran (column-major) order, any number
    at a time (e.g. a band of whole columns, as a C-ordered (columns, height) array
    flattened); after all ``height * width`` of them, :meth:`finish` gives the ascending
    class ids present and their RLEs, areas and boxes, equal to those of the whole map.
    Pixels equal to ``ignore_index`` belong to no class. What is held between pieces is each
    class's counts string so far (about one or two bytes per run) and a few numbers per
    class; a piece of ``n`` pixels costs about ``n`` bytes plus 100 bytes per run in it
    while it is encoded.
    """

    def __init__(self, height: int, width: int, ignore_index: int | None = None) -> None:
        if height < 0 or width < 0 or height * width >= _UINT32_LIMIT:
            raise RLEError(f"labels of {height} x {width} pixels: COCO counts are uint32")
        self.height, self.width = height, width
        self.ignore_index = ignore_index
        self._fed = 0
        self._open: tuple[Any, int] | None = None  # (value, start) of a run the next may extend
        self._classes: dict[int, _ClassStream] = {}

    def add(self, pixels: np.ndarray) -> None:
        flat = np.asarray(pixels).reshape(-1)
        if flat.dtype.kind not in "biu":
            raise RLEError(f"labels must be bool or integer, got dtype {flat.dtype}")
        if self._fed + flat.size > self.height * self.width:
            raise RLEError(
                f"labels: {self._fed + flat.size} pixels fed, the map has "
                f"{self.height} x {self.width}"
            )
        if flat.size == 0:
            return
        starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        values = flat[np.concatenate(([0], starts))]
        starts = np.concatenate(([0], starts)) + self._fed
        if self._open is not None:
            value, start = self._open
            if values[0] == value:
                starts[0] = start
            else:
                starts = np.concatenate(([start], starts))
                values = np.concatenate((np.array([value], values.dtype), values))
        self._fed += flat.size
        self._open = (values[-1], int(starts[-1]))
        self._close(starts[:-1], starts[1:], values[:-1])

    def finish(self) -> tuple[np.ndarray, Measured]:
        pixels = self.height * self.width
        if self._fed != pixels:
            raise RLEError(f"labels: {self._fed} pixels fed of {self.height} x {self.width}")
        if self._open is not None:
            value, start = self._open
            self._close(np.array([start]), np.array([pixels]), np.array([value]))
            self._open = None
        classes = sorted(self._classes)
        finished = [self._classes[c].finish(pixels) for c in classes]
        rles: list[RLE] = [{"size": [self.height, self.width], "counts": t} for t, _ in finished]
        areas = np.array([self._classes[c].area for c in classes], np.int64)
        boxes = np.array([box for _, box in finished], np.float64).reshape(-1, 4)
        return np.array(classes, np.int64), Measured(rles, areas, boxes)

    def _close(self, starts: np.ndarray, ends: np.ndarray, values: np.ndarray) -> None:
        """Runs that end here, in order of position."""
        if self.ignore_index is not None:
            kept = values != self.ignore_index
            starts, ends, values = starts[kept], ends[kept], values[kept]
        if values.size == 0:
            return
        if values.min() < 0:
            raise RLEError(f"labels must be non-negative class ids, found {values.min()}")
        order = np.argsort(values, kind="stable")
        values = values[order]
        bounds = [*np.flatnonzero(_differs_from_previous(values)).tolist(), len(values)]
        for a, b in itertools.pairwise(bounds):
            runs = order[a:b]
            stream = self._classes.setdefault(int(values[a]), _ClassStream(self.height, self.width))
            stream.add_runs(starts[runs], ends[runs])


# --------------------------------------------------------------------------------------------
# Decoding and measuring.


def decode_masks(rles: Sequence[RLE]) -> np.ndarray:
    """Masks (N, H, W) uint8 of RLEs that all have the same size."""
    batch = _parse_rles(rles, "rles")
    if len(batch) == 0:
        raise RLEError("decode_masks needs at least one RLE (the size comes from the RLEs)")
    if np.any(batch.sizes != batch.sizes[0]):
        raise RLEError(f"rles have different sizes: {np.unique(batch.sizes, axis=0).tolist()}")
    h, w = (int(v) for v in batch.sizes[0])
    flat = np.repeat((batch.local_index() % 2).astype(np.uint8), batch.values)
    return flat.reshape(len(batch), w, h).transpose(0, 2, 1)


def decode(rle: RLE) -> np.ndarray:
    """Mask (H, W) uint8 of one RLE, as ``pycocotools.mask.decode`` (a Fortran-ordered array)."""
    return decode_masks([rle])[0]


def _one_or_many(rles: RLE | Sequence[RLE]) -> tuple[list[RLE], bool]:
    return ([rles], True) if isinstance(rles, dict) else (list(rles), False)


def area(rles: RLE | Sequence[RLE]) -> np.ndarray | np.uint32:
    """Pixel count of each RLE (uint32), as ``pycocotools.mask.area``."""
    items, single = _one_or_many(rles)
    areas = _parse_rles(items, "rles").areas().astype(np.uint32)
    return areas[0] if single else areas


def _bboxes(batch: _Counts) -> np.ndarray:
    """rleToBbox: [x, y, w, h] per RLE in float64, with its uint32 arithmetic."""
    n = len(batch)
    heights, widths = batch.sizes[:, 0], batch.sizes[:, 1]
    lengths = np.diff(batch.offsets)
    owner, local = batch.owner(), batch.local_index()
    # rleToBbox ignores a trailing odd count and reads only non-empty runs of ones.
    used = local < (lengths // 2 * 2)[owner]
    fg = np.flatnonzero(used & (local % 2 == 1) & (batch.values > 0))
    fg_owner = owner[fg]
    fg_h = heights[fg_owner]
    first = batch.run_starts()[fg]
    last = first + batch.values[fg] - 1

    x_start, x_end = first // fg_h, last // fg_h
    xs, ys = widths.copy(), heights.copy()
    xe, ye = np.zeros(n, np.int64), np.zeros(n, np.int64)
    spans_columns = np.zeros(n, bool)
    np.minimum.at(xs, fg_owner, x_start)
    np.maximum.at(xe, fg_owner, x_end)
    np.minimum.at(ys, fg_owner, first % fg_h)
    np.maximum.at(ye, fg_owner, last % fg_h)
    np.logical_or.at(spans_columns, fg_owner, x_start < x_end)
    ys[spans_columns] = 0
    ye[spans_columns] = heights[spans_columns] - 1

    boxes = np.stack([xs, ys, (xe - xs + 1) % _UINT32_LIMIT, (ye - ys + 1) % _UINT32_LIMIT], 1)
    boxes[lengths < 2] = 0
    return boxes.astype(np.float64)


def to_bbox(rles: RLE | Sequence[RLE]) -> np.ndarray:
    """Bounding box [x, y, w, h] of each RLE, as ``pycocotools.mask.toBbox``.

    Like toBbox, a run of ones that wraps from one column into the next makes the box span the
    full image height, even when the pixels themselves do not.
    """
    items, single = _one_or_many(rles)
    boxes = _bboxes(_parse_rles(items, "rles"))
    return boxes[0] if single else boxes


# --------------------------------------------------------------------------------------------
# IoU and merging.


def _iou_operand(objs: Any, what: str) -> np.ndarray | _Counts:
    """Boxes (N, 4) float64 or parsed RLEs, following pycocotools' iou input rules."""
    if isinstance(objs, np.ndarray):
        boxes = objs.reshape(1, -1) if objs.ndim == 1 and objs.size == 4 else objs
        if len(objs) == 0:
            return np.zeros((0, 4))
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise RLEError(f"{what}: a numpy array must hold boxes (N, 4), got {objs.shape}")
        return boxes.astype(np.float64)
    if isinstance(objs, list | tuple):
        if len(objs) == 0:
            return np.zeros((0, 4))
        if all(isinstance(o, dict) for o in objs):
            return _parse_rles(objs, what)
        if all(isinstance(o, list | tuple | np.ndarray) and len(o) == 4 for o in objs):
            return np.array(objs, dtype=np.float64)
    raise RLEError(f"{what} must be a list of RLE dicts or boxes (N, 4), got {type(objs).__name__}")


def _box_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """bbIou, with the same floating-point operations in the same order."""
    dt_area, gt_area = dt[:, 2] * dt[:, 3], gt[:, 2] * gt[:, 3]
    width = np.fmin((dt[:, 2] + dt[:, 0])[:, None], gt[:, 2] + gt[:, 0]) - np.fmax(
        dt[:, 0, None], gt[:, 0]
    )
    height = np.fmin((dt[:, 3] + dt[:, 1])[:, None], gt[:, 3] + gt[:, 1]) - np.fmax(
        dt[:, 1, None], gt[:, 1]
    )
    inter = width * height
    union = np.where(crowd, dt_area[:, None], (dt_area[:, None] + gt_area) - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = inter / union
    return np.where(~(width <= 0) & ~(height <= 0), ratio, 0.0)


def _intersections(
    dt: _Counts, gt: _Counts, pair_dt: np.ndarray, pair_gt: np.ndarray
) -> np.ndarray:
    """Pixels in both masks of each (dt, gt) pair of equal size."""
    # All gt masks on one line, each shifted past the previous one, so that a single sorted
    # search finds the gt run under any dt pixel.
    gt_shift = _segment_offsets(gt.sizes[:, 0] * gt.sizes[:, 1] + 1)[:-1]
    gt_owner = gt.owner()
    gt_starts = gt.run_starts() + gt_shift[gt_owner]
    gt_is_one = gt.local_index() % 2 == 1
    gt_ones = np.where(gt_is_one, gt.values, 0)
    gt_ones_before = np.cumsum(gt_ones) - gt_ones

    def gt_ones_up_to(position: np.ndarray) -> np.ndarray:
        run = np.searchsorted(gt_starts, position, side="right") - 1
        return gt_ones_before[run] + (position - gt_starts[run]) * gt_is_one[run]

    dt_fg = np.flatnonzero((dt.local_index() % 2 == 1) & (dt.values > 0))
    dt_fg_offsets = np.searchsorted(dt_fg, dt.offsets)
    runs_per_pair = np.diff(dt_fg_offsets)[pair_dt]
    pair = np.repeat(np.arange(len(pair_dt)), runs_per_pair)
    pair_first = np.cumsum(runs_per_pair) - runs_per_pair
    run = dt_fg[dt_fg_offsets[pair_dt][pair] + np.arange(len(pair)) - pair_first[pair]]
    shift = gt_shift[pair_gt][pair]
    begin = dt.run_starts()[run] + shift
    overlap = gt_ones_up_to(begin + dt.values[run]) - gt_ones_up_to(begin)
    totals = np.concatenate(([0], np.cumsum(overlap)))
    pair_offsets = _segment_offsets(runs_per_pair)
    return totals[pair_offsets[1:]] - totals[pair_offsets[:-1]]


def iou(dt: Any, gt: Any, iscrowd: Sequence[Any] | np.ndarray) -> np.ndarray | list:
    """IoU matrix (len(dt), len(gt)) of RLEs or of boxes, as ``pycocotools.mask.iou``.

    ``dt`` and ``gt`` are both lists of RLE dicts, or both boxes ``[x, y, w, h]`` (a list of
    4-sequences or an (N, 4) array). For a crowd gt the union is the detection's area. Pairs
    of RLEs of different sizes get -1 (when their boxes overlap, as in pycocotools). Like
    pycocotools, an empty dt or gt gives ``[]``.
    """
    dt_objs, gt_objs = _iou_operand(dt, "dt"), _iou_operand(gt, "gt")
    crowd = np.asarray(iscrowd)
    if crowd.dtype.kind not in "biuf":
        raise RLEError(f"iscrowd must be a sequence of 0/1 flags, got {iscrowd!r:.80}")
    crowd = crowd.reshape(-1) != 0
    if len(crowd) != len(gt_objs):
        raise RLEError(f"iscrowd has {len(crowd)} flags for {len(gt_objs)} gt objects")
    if len(dt_objs) == 0 or len(gt_objs) == 0:
        return []
    if isinstance(dt_objs, np.ndarray) != isinstance(gt_objs, np.ndarray):
        raise RLEError("dt and gt must both be RLEs or both be boxes")
    if isinstance(dt_objs, np.ndarray):
        return _box_iou(dt_objs, gt_objs, crowd)

    # rleIou computes exact overlaps only where the boxes overlap.
    result = _box_iou(_bboxes(dt_objs), _bboxes(gt_objs), crowd)
    pair_dt, pair_gt = np.nonzero(result > 0)
    same_size = np.all(dt_objs.sizes[pair_dt] == gt_objs.sizes[pair_gt], axis=1)
    result[pair_dt[~same_size], pair_gt[~same_size]] = -1
    pair_dt, pair_gt = pair_dt[same_size], pair_gt[same_size]
    inter = _intersections(dt_objs, gt_objs, pair_dt, pair_gt)
    dt_area, gt_area = dt_objs.areas()[pair_dt], gt_objs.areas()[pair_gt]
    union = np.where(crowd[pair_gt], dt_area, dt_area + gt_area - inter)
    result[pair_dt, pair_gt] = np.where(inter == 0, 0.0, inter / np.maximum(union, 1))
    return result


def iou_pairs(a: Sequence[RLE], b: Sequence[RLE]) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` for every ``i`` (float64, 0 where they do not overlap),
    in one pass over both lists, as ``pycocotools.mask.iou([a[i]], [b[i]], [0])`` gives it;
    the lists must be of one length and each pair of one size."""
    first, second = _parse_rles(a, "a"), _parse_rles(b, "b")
    if len(first) != len(second):
        raise RLEError(f"iou_pairs needs lists of one length, got {len(first)} and {len(second)}")
    differ = np.flatnonzero(np.any(first.sizes != second.sizes, axis=1))
    if differ.size:
        i = int(differ[0])
        raise RLEError(
            f"iou_pairs: pair {i} has masks of sizes {first.sizes[i].tolist()} and "
            f"{second.sizes[i].tolist()}"
        )
    rows = np.arange(len(first))
    intersection = _intersections(first, second, rows, rows)
    union = first.areas() + second.areas() - intersection
    return np.where(intersection == 0, 0.0, intersection / np.maximum(union, 1))


def merge(rles: Sequence[RLE], intersect: bool = False) -> RLE:
    """Union (or intersection) of RLEs of one size, as ``pycocotools.mask.merge``.

    Identical to pycocotools for RLEs whose runs are all non-empty (after the first), which is
    every RLE an encoder produces; for others the result is the same mask, written without
    the empty runs that pycocotools may carry over.
    """
    batch = _parse_rles(rles, "rles")
    if len(batch) == 0:
        return {"size": [0, 0], "counts": b""}
    if np.any(batch.sizes != batch.sizes[0]):
        raise RLEError(
            f"cannot merge RLEs of different sizes: {np.unique(batch.sizes, axis=0).tolist()}"
        )
    if len(batch) == 1:
        return _to_rles(batch)[0]

    h, w = (int(v) for v in batch.sizes[0])
    fg = np.flatnonzero((batch.local_index() % 2 == 1) & (batch.values > 0))
    starts = batch.run_starts()[fg]
    positions = np.concatenate((starts, starts + batch.values[fg]))
    steps = np.concatenate((np.ones(len(fg), np.int64), -np.ones(len(fg), np.int64)))
    order = np.argsort(positions, kind="stable")
    positions, covered = positions[order], np.cumsum(steps[order])
    settled = np.roll(_differs_from_previous(positions), -1)  # last event at each position
    positions, covered = positions[settled], covered[settled]
    inside = covered == len(batch) if intersect else covered > 0
    flips = positions[np.diff(inside, prepend=False)]
    counts = np.diff(np.concatenate(([0], flips, [h * w])))
    if flips.size and flips[-1] == h * w:
        counts = counts[:-1]
    return {"size": [h, w], "counts": _counts_to_strings(counts, np.array([0, len(counts)]))[0]}


# --------------------------------------------------------------------------------------------
# Polygons, boxes and uncompressed RLEs (frPyObjects).


def _polygon_counts(xy: np.ndarray, h: int, w: int, what: str) -> np.ndarray:
    """rleFrPoly: rasterise one polygon [x0, y0, x1, y1, ...] with its integer arithmetic."""
    n_points = len(xy) // 2
    if n_points == 0 or h * w == 0:
        return np.array([h * w], np.int64)
    if not np.all(np.isfinite(xy)):
        raise RLEError(f"{what}: polygon coordinates must be finite")
    # (int)(v + .5) in C truncates toward zero, which astype does too.
    x = (_POLY_SCALE * xy[0 : 2 * n_points : 2] + 0.5).astype(np.int64)
    y = (_POLY_SCALE * xy[1 : 2 * n_points : 2] + 0.5).astype(np.int64)
    if np.abs(np.concatenate((x, y))).max() >= 1 << 30:
        raise RLEError(f"{what}: polygon coordinates are out of range")

    # Upsample: every grid point along each edge, stepping along its longer axis.
    x_next, y_next = np.roll(x, -1), np.roll(y, -1)
    dx, dy = np.abs(x_next - x), np.abs(y - y_next)
    along_x = dx >= dy
    flip = (along_x & (x > x_next)) | (~along_x & (y > y_next))
    x0, x1 = np.where(flip, x_next, x), np.where(flip, x, x_next)
    y0, y1 = np.where(flip, y_next, y), np.where(flip, y, y_next)
    steps = np.where(along_x, dx, dy)
    rise = np.where(along_x, y1 - y0, x1 - x0).astype(np.float64)
    # A zero-length edge gives 0/0 in C; its single point never reaches the output.
    slope = np.divide(rise, steps, out=np.zeros_like(rise), where=steps > 0)

    if np.sum(steps + 1) > _MAX_POLYGON_POINTS:
        raise RLEError(f"{what}: polygon is too large to rasterise")
    edge = np.repeat(np.arange(n_points), steps + 1)
    d = np.arange(len(edge)) - np.repeat(np.cumsum(steps + 1) - (steps + 1), steps + 1)
    t = np.where(flip[edge], steps[edge] - d, d)
    along = along_x[edge]
    exact = t + np.where(along_x, x0, y0)[edge]
    rounded = (np.where(along_x, y0, x0)[edge] + slope[edge] * t + 0.5).astype(np.int64)
    u, v = np.where(along, exact, rounded), np.where(along, rounded, exact)

    # Keep the points where the boundary crosses a pixel column, back on the image grid.
    crossing = np.flatnonzero(u[1:] != u[:-1]) + 1
    uj, ui = u[crossing], u[crossing - 1]
    xd = (np.where(uj < ui, uj, uj - 1) + 0.5) / _POLY_SCALE - 0.5
    inside = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = (np.minimum(v[crossing], v[crossing - 1]) + 0.5) / _POLY_SCALE - 0.5
    yd = np.ceil(np.clip(yd, 0, h))
    flat = np.sort(xd[inside].astype(np.int64) * h + yd[inside].astype(np.int64))

    # rleFrPoly's toggles cancel in pairs: a position counts iff it occurs an odd number of
    # times; h*w always ends the last run.
    flat = flat[flat < h * w]
    first = np.flatnonzero(_differs_from_previous(flat))
    repeats = np.diff(np.append(first, len(flat)))
    toggles = flat[first][repeats % 2 == 1]
    return np.diff(np.concatenate(([0], toggles, [h * w])))


def _rles_from_counts(counts_list: list[np.ndarray], h: int, w: int) -> list[RLE]:
    offsets = _segment_offsets([len(c) for c in counts_list])
    counts = np.concatenate(counts_list) if counts_list else np.zeros(0, np.int64)
    return _to_rles(_Counts(counts, offsets, np.tile([h, w], (len(counts_list), 1))))


def from_polygons(polygons: Sequence[Sequence[float]], h: int, w: int) -> list[RLE]:
    """One RLE per polygon ``[x0, y0, x1, y1, ...]`` (pixel coordinates, not merged), as
    pycocotools' frPoly. An odd trailing coordinate is ignored."""
    h, w = _parse_size((h, w), "image size")
    counts = []
    for i, polygon in enumerate(polygons):
        try:
            xy = np.asarray(polygon, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise RLEError(f"polygons[{i}] must be a flat list of numbers") from None
        counts.append(_polygon_counts(xy, h, w, f"polygons[{i}]"))
    return _rles_from_counts(counts, h, w)


def from_bboxes(bboxes: Any, h: int, w: int) -> list[RLE]:
    """One RLE per box ``[x, y, width, height]``, as pycocotools' frBbox."""
    h, w = _parse_size((h, w), "image size")
    try:
        boxes = np.asarray(bboxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise RLEError("bboxes must be (N, 4) numbers [x, y, w, h]") from None
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise RLEError(f"bboxes must be (N, 4) [x, y, w, h], got shape {boxes.shape}")
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    corners = np.stack([x0, y0, x0, y1, x1, y1, x1, y0], axis=1)
    return _rles_from_counts(
        [_polygon_counts(c, h, w, f"bboxes[{i}]") for i, c in enumerate(corners)], h, w
    )


def _from_uncompressed(rle: dict, h: int, w: int, what: str) -> RLE:
    size = _parse_size(rle["size"], what)
    if size != (h, w):
        raise RLEError(f"{what}: size {list(size)} differs from the image size {[h, w]}")
    if isinstance(rle["counts"], bytes | str):
        return _to_rles(_parse_rles([rle], what))[0]
    counts = _as_counts_array(rle["counts"], f"{what}['counts']")
    batch = _Counts(counts, np.array([0, len(counts)]), np.array([[h, w]]))
    _check_counts(batch, what)
    return _to_rles(batch)[0]


def _is_sequence(obj: Any) -> bool:
    return isinstance(obj, list | tuple | np.ndarray)


def fr_py_objects(obj: Any, h: int, w: int) -> RLE | list[RLE]:
    """RLEs from COCO segmentation objects, dispatching like ``pycocotools.mask.frPyObjects``.

    - an (N, 4) array, or a list of 4-element lists: boxes -> list of RLEs
    - a list of lists longer than 4: polygons -> list of RLEs (one per polygon, not merged);
      as in pycocotools, the first element decides, so a first "polygon" of two points is a box
    - a list of dicts ``{"size", "counts"}`` with list counts: uncompressed RLEs -> list
    - a single box (4 numbers), polygon (more than 4 numbers) or dict -> one RLE

    Unlike pycocotools (which raises TypeError there), lists of boxes and the single box and
    polygon forms are accepted; dicts with already compressed counts are passed through.
    """
    h, w = _parse_size((h, w), "image size")
    if isinstance(obj, np.ndarray):
        return from_bboxes(obj, h, w)
    if isinstance(obj, dict) and "counts" in obj and "size" in obj:
        return _from_uncompressed(obj, h, w, "obj")
    if isinstance(obj, list | tuple):
        if len(obj) == 0:
            return []
        head = obj[0]
        if isinstance(head, dict):
            if not all(isinstance(o, dict) and "counts" in o and "size" in o for o in obj):
                raise RLEError("obj: every dict must have 'size' and 'counts'")
            return [_from_uncompressed(o, h, w, f"obj[{i}]") for i, o in enumerate(obj)]
        if _is_sequence(head) and len(head) == 4:
            return from_bboxes(obj, h, w)
        if _is_sequence(head) and len(head) > 4:
            return from_polygons(obj, h, w)
        if not _is_sequence(head) and len(obj) == 4:
            return from_bboxes([obj], h, w)[0]
        if not _is_sequence(head) and len(obj) > 4:
            return from_polygons([obj], h, w)[0]
    raise RLEError(
        "obj must be boxes, polygons or RLE dicts (see fr_py_objects), "
        f"got {type(obj).__name__} {obj!r:.80}"
    )
