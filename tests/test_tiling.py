"""Tiled inference: windows cover the image, blending leaves no seams, memory stays banded."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segflow.tiling import blended_bands, blended_column_blocks, tile_starts, tiled_prediction


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(2, 64), st.data())
def test_windows_cover_everything_with_the_overlap(length, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.int64)
    for start in starts:
        covered[start : start + tile] += 1
    assert (covered >= 1).all()
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    for a, b in itertools.pairwise(starts):
        assert a + tile - b >= overlap  # neighbours share at least `overlap` pixels


def pointwise_model(classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, classes, kernel_size=1)


def contextual_model(classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, classes, 3, padding=1),
    )


def image(height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(height * 1000 + width)
    return torch.rand((1, 3, height, width), generator=generator)


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"), [(97, 130, 32, 8), (40, 40, 64, 8), (33, 200, 33, 0)]
)
def test_a_pointwise_model_gives_the_untiled_answer(height, width, tile, overlap):
    model = pointwise_model()
    x = image(height, width)
    with torch.inference_mode():
        logits = model(x)[0]
        tiled = tiled_prediction(
            model, x, tile=tile, overlap=overlap, return_scores=True, return_probabilities=True
        )
        labels, scores = tiled.labels, tiled.scores
    torch.testing.assert_close(scores, torch.softmax(logits, 0).max(0).values)
    torch.testing.assert_close(tiled.probabilities, torch.softmax(logits, 0))
    # Blending identical logits can move them by an ulp; only exact ties could flip.
    agree = (labels == logits.argmax(0)).float().mean().item()
    assert agree == 1.0


def test_blending_hides_the_seams_of_a_model_with_context():
    model = contextual_model()
    x = image(150, 170)
    with torch.inference_mode():
        reference = model(x)[0].argmax(0)
        blended = tiled_prediction(model, x, tile=48, overlap=16).labels
        hard_cut = tiled_prediction(model, x, tile=48, overlap=0).labels
    # Windows that simply abut disagree with the untiled run along every cut; blended ones
    # only where a random model's logits are near ties (the window edges still count, at
    # weight (1/17)^3).
    blended_errors = (blended != reference).sum().item()
    hard_errors = (hard_cut != reference).sum().item()
    assert blended_errors <= 0.001 * reference.numel()
    assert blended_errors * 20 < hard_errors


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [
        (150, 170, 48, 16),  # the last window overlaps its neighbour by most of a tile
        (97, 130, 32, 8),
        (200, 33, 33, 0),  # one column of windows
        (61, 300, 40, 30),  # overlap beyond half a tile: pixels under three windows
        (130, 97, 32, 31),
    ],
)
def test_column_blocks_blend_bit_for_bit_as_whole_column_bands(height, width, tile, overlap):
    """Blocks finished band by band hold the logits of blending whole bands of columns (the
    row bands of the transposed image), exactly: same windows, same sums in the same order.
    Windows with nothing to segment (here: the top-left ones) are skipped in both."""
    model = contextual_model()
    x = image(height, width)

    def read(window):
        top, bottom, left, right = window
        return None if bottom <= tile and right <= tile else x[..., top:bottom, left:right]

    def read_transposed(window):
        top, bottom, left, right = window
        pixels = read((left, right, top, bottom))
        return None if pixels is None else pixels.transpose(-1, -2)

    def model_transposed(pixels):
        return model(pixels.transpose(-1, -2).contiguous()).transpose(-1, -2)

    # NaN where only skipped windows reach: a block or band of them comes as None, else as
    # 0 / 0.
    expected = torch.full((5, height, width), torch.nan)
    got = torch.full((5, height, width), torch.nan)
    seen = torch.zeros((height, width), dtype=torch.int64)
    with torch.inference_mode():
        bands = blended_bands(
            model_transposed,
            read_transposed,
            width,
            height,
            tile=tile,
            overlap=overlap,
            device="cpu",
        )
        for left, right, logits in bands:
            if logits is not None:
                expected[:, :, left:right] = logits.transpose(-1, -2)
        finished_columns = 0
        blocks = blended_column_blocks(
            model, read, height, width, tile=tile, overlap=overlap, device="cpu"
        )
        for (top, bottom, left, right), logits in blocks:
            assert left == finished_columns and (top > 0 or seen[:, left:right].sum() == 0)
            seen[top:bottom, left:right] += 1
            if bottom == height:
                finished_columns = right
            if logits is not None:
                got[:, top:bottom, left:right] = logits
    assert (seen == 1).all() and finished_columns == width
    skipped = expected.isnan()
    assert skipped.any() and torch.equal(skipped, got.isnan())
    assert torch.equal(expected[~skipped], got[~skipped])


def test_bad_tiling_arguments():
    with pytest.raises(ValueError, match="overlap"):
        tiled_prediction(pointwise_model(), image(10, 10), tile=8, overlap=8)
    with pytest.raises(ValueError, match="one image"):
        tiled_prediction(pointwise_model(), image(10, 10).repeat(2, 1, 1, 1), tile=8, overlap=2)


@pytest.mark.slow
def test_blending_reduces_seams_of_a_real_model_on_the_largest_aerial_tile(shared):
    from segflow.decode import decode_image
    from segflow.models import load_model

    images = sorted((shared / "data" / "aerial_dubai").glob("Tile */images/*.jpg"))
    largest = max(images, key=lambda p: p.stat().st_size)
    image = decode_image(largest.read_bytes(), name=str(largest))
    height, width = image.shape[:2]
    model_path = str(shared / "models" / "espnet_camvid.pt2")
    whole = load_model(model_path, device="cpu", tile_size=None).predict([image])[0].labels

    def disagreement(overlap: int) -> tuple[float, float]:
        """Share of pixels whose label differs from the untiled run: on the seams (the middle
        of each overlap) and everywhere."""
        model = load_model(model_path, device="cpu", tile_size=512, tile_overlap=overlap)
        labels = model.predict([image])[0].labels
        assert labels.shape == (height, width)
        differs = labels != whole
        seams = torch.zeros_like(differs)
        for start in tile_starts(height, 512, overlap)[1:]:
            seams[start + overlap // 2 - 4 : start + overlap // 2 + 4] = True
        for start in tile_starts(width, 512, overlap)[1:]:
            seams[:, start + overlap // 2 - 4 : start + overlap // 2 + 4] = True
        return differs[seams].float().mean().item(), differs.float().mean().item()

    # A CamVid model on aerial photos leans on wide context, so windows change many labels
    # whatever the blending; windows that abut change far more along their cuts.
    cut_seams, cut_all = disagreement(0)
    blended_seams, blended_all = disagreement(128)
    print(f"seams: cut {cut_seams:.3f}, blended {blended_seams:.3f}")
    print(f"all pixels: cut {cut_all:.3f}, blended {blended_all:.3f}")
    assert blended_seams < 0.7 * cut_seams
    assert blended_all < cut_all
