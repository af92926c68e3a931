"""Tiled inference for images larger than a model should see at once (aerial tiles up to
10k x 10k and beyond).

The image is cut into overlapping ``tile x tile`` windows. Each window's logits are weighted
by a ramp that falls towards the window's edges — where a network sees the least context and
its zero padding — and the weighted logits of all windows are summed and normalised before
the argmax, so neighbouring windows blend instead of meeting at a seam.

Memory stays bounded by one band of rows: windows are processed one row of windows at a
time, and the rows that no later window touches are finalised (argmax) and dropped, so a
C-class, W-wide image needs about ``C x (tile + stride) x W`` floats, not ``C x H x W``.

The windows come from a ``read`` callable, so the image need not be in memory at all: a
georeferenced raster's windows are read from its file (:mod:`segflow.raster`), and a window
``read`` declines (all nodata) costs nothing. :func:`blended_column_blocks` finishes blocks
band of columns by band of columns instead, whose labels flatten to COCO RLE's
column-major order, and holds about C x (tile + stride)² floats plus C x overlap x H for
the columns a band shares with the next one: nearly flat in the image's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from segflow.prediction import SemanticPrediction


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts covering ``[0, length)`` with at least ``overlap`` shared pixels; the last
    window ends exactly at ``length``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def ramp(size: int, overlap: int, *, fade_start: bool, fade_end: bool, device) -> torch.Tensor:
    """1-D blending weights of a window: 1 in the middle, falling over ``overlap`` pixels
    towards the sides that border another window (never to 0, so every pixel has weight).
    Sides on the image border keep weight 1: no other window covers them, and the untiled
    model sees the same border there."""
    position = torch.arange(size, device=device, dtype=torch.float32)
    distance = torch.full_like(position, float(overlap + 1))
    if fade_start:
        distance = torch.minimum(distance, position + 1)
    if fade_end:
        distance = torch.minimum(distance, size - position)
    # Cubed, so the window edge (where the network saw zero padding instead of the image)
    # weighs (1 / (overlap + 1))^3 against the neighbour's well-informed middle.
    return (distance / (overlap + 1)) ** 3


Window = tuple[int, int, int, int]  # top, bottom, left, right


def blended_bands(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    read: Callable[[Window], torch.Tensor | None],
    height: int,
    width: int,
    *,
    tile: int,
    overlap: int,
    device,
) -> Iterator[tuple[int, int, torch.Tensor | None]]:
    """The blended logits of a ``height x width`` image, one finished band of rows at a time:
    ``(top, bottom, logits)`` with logits (C, bottom - top, width), in order, covering every
    row once. ``read(window)`` gives the window's pixels (1, 3, h, w), or None for a window
    to skip (one with nothing to segment): it adds no logits, so rows that only skipped
    windows cover have weight 0, and a band before any window ran comes as None."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    rows = tile_starts(height, tile, overlap)
    columns = tile_starts(width, tile, overlap)
    band_top = 0  # first image row held in the accumulators
    accumulated: torch.Tensor | None = None  # (C, rows held, W)
    weights = torch.zeros((0, width), device=device)
    for row_index, top in enumerate(rows):
        bottom = min(top + tile, height)
        needed = bottom - band_top
        if weights.shape[0] < needed:
            grow = needed - weights.shape[0]
            weights = torch.cat([weights, weights.new_zeros((grow, width))], 0)
            if accumulated is not None:
                accumulated = torch.cat(
                    [accumulated, accumulated.new_zeros((accumulated.shape[0], grow, width))], 1
                )
        row_weight = ramp(
            bottom - top, overlap, fade_start=top > 0, fade_end=bottom < height, device=device
        )
        for left in columns:
            right = min(left + tile, width)
            pixels = read((top, bottom, left, right))
            if pixels is None:
                continue
            window = logits_fn(pixels)[0].float()
            if accumulated is None:
                accumulated = window.new_zeros((window.shape[0], weights.shape[0], width))
            column_weight = ramp(
                right - left, overlap, fade_start=left > 0, fade_end=right < width, device=device
            )
            weight = row_weight[:, None] * column_weight[None, :]
            accumulated[:, top - band_top : bottom - band_top, left:right] += window * weight
            weights[top - band_top : bottom - band_top, left:right] += weight
        # Rows above the next window's top are final: no later window reaches them.
        done = rows[row_index + 1] if row_index + 1 < len(rows) else height
        finished = done - band_top
        if accumulated is None:
            yield band_top, done, None
        else:
            yield band_top, done, accumulated[:, :finished] / weights[:finished]
            accumulated = accumulated[:, finished:]
        weights = weights[finished:]
        band_top = done


def _window_weight(window: Window, height: int, width: int, overlap: int, device) -> torch.Tensor:
    """The (h, w) blending weight of a window of a ``height x width`` image."""
    top, bottom, left, right = window
    row = ramp(bottom - top, overlap, fade_start=top > 0, fade_end=bottom < height, device=device)
    column = ramp(right - left, overlap, fade_start=left > 0, fade_end=right < width, device=device)
    return row[:, None] * column[None, :]


def _band_schedule(rows: list[int], tile: int, windows: int) -> list[tuple[int, int, bool]]:
    """The order of a column band's windows, ``(window column, row index, rows finish)``.

    One column of windows runs top to bottom. Two (the image's last two, whose columns the
    last window's start overlaps by up to a whole tile) run interleaved, the second lagging
    until no later window of the first shares rows with it: every pixel still gets the
    first column's windows before the second's, in row order, as :func:`blended_bands`
    adds them, and only rows that both have passed are held, instead of carrying most of a
    tile's columns over the whole height to the last band."""
    if windows == 1:
        return [(0, index, True) for index in range(len(rows))]
    order, lagging = [], 0
    for index in range(len(rows)):
        order.append((0, index, False))
        while lagging < len(rows) and (
            index + 1 == len(rows) or rows[index + 1] >= rows[lagging] + tile
        ):
            order.append((1, lagging, True))
            lagging += 1
    return order


def blended_column_blocks(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    read: Callable[[Window], torch.Tensor | None],
    height: int,
    width: int,
    *,
    tile: int,
    overlap: int,
    device,
) -> Iterator[tuple[Window, torch.Tensor | None]]:
    """The blended logits of a ``height x width`` image in finished blocks, a band of columns
    at a time and each band from top to bottom: ``(window, logits)`` with logits (C, bottom -
    top, right - left). A band's blocks cover its columns and every row once, and the bands
    cover every column once, left to right, so a band's labels flattened column by column
    follow COCO RLE's column-major order. ``read`` is :func:`blended_bands`'s; a block that
    only skipped windows cover comes as None.

    A band is one column of windows, the last band the last two (:func:`_band_schedule`).
    Held at once: the band's rows not yet finished, at most C x (tile + stride) x (tile +
    stride) floats, and the partial sums of the ``overlap`` columns a band shares with the
    next, C x overlap x height floats, for the band before and the band being blended (with
    one weight per pixel of each). Every pixel's sum adds its windows in the order
    :func:`blended_bands` over the transposed image adds them (column of windows, then row),
    so the logits are those of blending whole bands of columns, bit for bit."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    rows = tile_starts(height, tile, overlap)
    starts = tile_starts(width, tile, overlap)
    bands = [[start] for start in starts[:-2]] + [starts[-2:]]
    channels: int | None = None  # known once a window has run
    carried = torch.zeros((0, height, 0), device=device)  # (C, H, columns shared)
    carried_weight = torch.zeros((height, 0), device=device)
    for band_index, band in enumerate(bands):
        left, right = band[0], min(band[-1] + tile, width)
        # Columns left of the next band's first are final once this band is done.
        done = bands[band_index + 1][0] if band_index + 1 < len(bands) else width
        finished_columns, shared = done - left, carried_weight.shape[1]
        held = torch.zeros((channels or 0, 0, right - left), device=device)
        held_weight = torch.zeros((0, right - left), device=device)
        to_carry = torch.zeros((channels or 0, height, right - done), device=device)
        to_carry_weight = torch.zeros((height, right - done), device=device)
        band_top = 0  # first row held
        for which, row_index, rows_finish in _band_schedule(rows, tile, len(band)):
            top, window_left = rows[row_index], band[which]
            bottom, window_right = min(top + tile, height), min(window_left + tile, width)
            first_new = band_top + held_weight.shape[0]
            if bottom > first_new:
                grown = held_weight.new_zeros((bottom - first_new, right - left))
                grown[:, :shared] = carried_weight[first_new:bottom]
                held_weight = torch.cat([held_weight, grown])
                grown = held.new_zeros((held.shape[0], bottom - first_new, right - left))
                grown[:, :, :shared] = carried[:, first_new:bottom]
                held = torch.cat([held, grown], 1)
            pixels = read((top, bottom, window_left, window_right))
            if pixels is not None:
                window = logits_fn(pixels)[0].float()
                if channels is None:  # every sum so far is 0
                    channels = window.shape[0]
                    held = held.new_zeros((channels, *held_weight.shape))
                    carried = carried.new_zeros((channels, height, shared))
                    to_carry = to_carry.new_zeros((channels, height, right - done))
                weight = _window_weight(
                    (top, bottom, window_left, window_right), height, width, overlap, device
                )
                place = (
                    slice(top - band_top, bottom - band_top),
                    slice(window_left - left, window_right - left),
                )
                held[:, place[0], place[1]] += window * weight
                held_weight[place] += weight
            if not rows_finish:
                continue
            # Rows above the next window's top are final: no later window reaches them.
            row_done = rows[row_index + 1] if row_index + 1 < len(rows) else height
            finished = row_done - band_top
            block = (band_top, row_done, left, done)
            if channels is None:
                yield block, None
            else:
                yield (
                    block,
                    held[:, :finished, :finished_columns]
                    / held_weight[:finished, :finished_columns],
                )
                to_carry[:, band_top:row_done] = held[:, :finished, finished_columns:]
            to_carry_weight[band_top:row_done] = held_weight[:finished, finished_columns:]
            held, held_weight = held[:, finished:], held_weight[finished:]
            band_top = row_done
        carried, carried_weight = to_carry, to_carry_weight


def tiled_prediction(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    return_scores: bool = False,
    return_probabilities: bool = False,
) -> SemanticPrediction:
    """The label map (H, W) int64 of one image (1, 3, H, W), and optionally the winning softmax
    probability (H, W) and every class's (C, H, W), running ``logits_fn`` on windows of at
    most ``tile x tile``. The probabilities are the one output as large as the logits."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"tiled inference takes one image (1, 3, H, W), got {tuple(image.shape)}")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    device = image.device
    labels = torch.empty((height, width), dtype=torch.int64, device=device)
    scores = (
        torch.empty((height, width), dtype=torch.float32, device=device) if return_scores else None
    )
    probabilities: torch.Tensor | None = None  # (C, H, W), allocated once C is known

    def read(window: Window) -> torch.Tensor:
        top, bottom, left, right = window
        return image[..., top:bottom, left:right]

    bands = blended_bands(logits_fn, read, height, width, tile=tile, overlap=overlap, device=device)
    for top, bottom, blended in bands:
        if return_scores or return_probabilities:
            softmax = torch.softmax(blended, dim=0)
            best, winner = softmax.max(dim=0)
            labels[top:bottom] = winner
            if scores is not None:
                scores[top:bottom] = best
            if return_probabilities:
                if probabilities is None:
                    probabilities = softmax.new_empty((softmax.shape[0], height, width))
                probabilities[:, top:bottom] = softmax
        else:
            labels[top:bottom] = blended.max(dim=0).indices
    return SemanticPrediction(labels=labels, scores=scores, probabilities=probabilities)
