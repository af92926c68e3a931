"""Decode throughput per format: torchvision against PIL on the same bytes, in one process,
and what segflow's ``decode_image`` achieves (it should match the faster of the two).

Images are real: the CamVid validation PNGs and the aerial JPEG tiles from the shared data,
used as they are where the format matches and re-encoded in memory otherwise (JPEG quality
90, lossy WebP quality 90, lossless WebP, uncompressed and deflate TIFF, BMP). Every side
produces the same thing, an (H, W, 3) uint8 RGB array, and each corpus is timed over ROUNDS
interleaved passes, best pass kept. Before timing, torchvision's and PIL's pixels are compared
(max abs difference); for JPEG this runs over every aerial tile.

TIFF and BMP have no torchvision decoder. torchvision's PNG numbers are for the record only:
its decode_png crashes the process on damaged files, so segflow never routes PNG to it.

Run: ``python bench/decode.py`` (shared data: $SEGFLOW_SHARED, default ../shared).
"""

from __future__ import annotations

import io
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.io
from PIL import Image

from segflow.decode import decode_image

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3
AERIAL_TILES_PER_FOLDER = 3  # 24 tiles; re-encoding all 72 to PNG alone takes minutes

TORCHVISION_DECODERS: dict[str, Callable[..., torch.Tensor]] = {
    "JPEG": torchvision.io.decode_jpeg,
    "PNG": torchvision.io.decode_png,
    "WebP": torchvision.io.decode_webp,
    "WebP lossless": torchvision.io.decode_webp,
}
ENCODINGS: dict[str, tuple[str, dict]] = {
    "JPEG": ("JPEG", {"quality": 90}),
    "PNG": ("PNG", {}),
    "WebP": ("WEBP", {"quality": 90}),
    "WebP lossless": ("WEBP", {"lossless": True}),
    "TIFF": ("TIFF", {}),
    "TIFF deflate": ("TIFF", {"compression": "tiff_deflate"}),
    "BMP": ("BMP", {}),
}


def shared_root() -> Path:
    return Path(os.environ.get("SEGFLOW_SHARED", REPO_ROOT.parent / "shared")).resolve()


def decode_with_torchvision(decoder: Callable[..., torch.Tensor], data: bytes) -> np.ndarray:
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    chw = decoder(encoded, mode=torchvision.io.ImageReadMode.RGB)
    return chw.permute(1, 2, 0).contiguous().numpy()


def decode_with_pil(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def decode_with_segflow(data: bytes) -> np.ndarray:
    return decode_image(data).numpy()


def encode(image: Image.Image, image_format: str, options: dict) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def source_files(shared: Path) -> tuple[list[Path], list[Path]]:
    camvid = sorted((shared / "data/camvid_val/images").glob("*.png"))
    aerial = [
        tile
        for folder in sorted((shared / "data/aerial_dubai").glob("Tile *"))
        for tile in sorted((folder / "images").glob("*.jpg"))[:AERIAL_TILES_PER_FOLDER]
    ]
    return camvid, aerial


def corpora(camvid: list[Path], aerial: list[Path]) -> dict[str, list[bytes]]:
    """Per format, the bytes of every source image: the file itself when it already is in
    that format, else an in-memory re-encoding of its pixels."""
    sources = [(path, "PNG") for path in camvid] + [(path, "JPEG") for path in aerial]
    pixels = {path: Image.open(path).convert("RGB") for path, _ in sources}
    result = {}
    for label, (image_format, options) in ENCODINGS.items():
        result[label] = [
            path.read_bytes()
            if native == image_format and label in ("JPEG", "PNG")
            else encode(pixels[path], image_format, options)
            for path, native in sources
        ]
    return result


def max_abs_difference(decoder: Callable[..., torch.Tensor], images: list[bytes]) -> int:
    return max(
        int(
            np.abs(
                decode_with_torchvision(decoder, data).astype(np.int16)
                - decode_with_pil(data).astype(np.int16)
            ).max()
        )
        for data in images
    )


def best_pass_seconds(sides: dict[str, Callable[[bytes], np.ndarray]], images: list[bytes]):
    for decode in sides.values():
        decode(images[0])  # warm-up: library loading, first allocations
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(ROUNDS):
        for side, decode in sides.items():
            start = time.perf_counter()
            for data in images:
                decode(data)
            best[side] = min(best[side], time.perf_counter() - start)
    return best


def main() -> int:
    shared = shared_root()
    if not (shared / "README.md").is_file():
        print(f"shared data not found at {shared} (set SEGFLOW_SHARED)", file=sys.stderr)
        return 1
    # torchvision 0.29 deprecates its image codecs (in favour of TorchCodec) on every call.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
    camvid, aerial = source_files(shared)
    all_aerial = sorted((shared / "data/aerial_dubai").glob("Tile */images/*.jpg"))
    jpeg_difference = max_abs_difference(
        torchvision.io.decode_jpeg, [path.read_bytes() for path in all_aerial]
    )
    print(
        f"JPEG pixels, torchvision vs PIL, all {len(all_aerial)} aerial tiles: "
        f"max abs difference {jpeg_difference}"
    )
    print(
        f"corpus: {len(camvid)} CamVid frames + {len(aerial)} aerial tiles, per format; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Pillow {Image.__version__}; best of {ROUNDS} passes\n"
    )
    header = (
        f"{'format':<14}{'MP':>6}  {'torchvision':>17}  {'PIL':>17}  {'tv/PIL':>6}  "
        f"{'segflow':>17}  {'segflow/best':>12}  {'max|tv-PIL|':>11}"
    )
    print(header)
    print("-" * len(header))
    for label, images in corpora(camvid, aerial).items():
        megapixels = sum(np.prod(Image.open(io.BytesIO(d)).size) for d in images) / 1e6
        sides: dict[str, Callable[[bytes], np.ndarray]] = {"PIL": decode_with_pil}
        decoder = TORCHVISION_DECODERS.get(label)
        if decoder is not None:
            sides["torchvision"] = lambda data, decoder=decoder: decode_with_torchvision(
                decoder, data
            )
        sides["segflow"] = decode_with_segflow
        seconds = best_pass_seconds(sides, images)

        def rate(side: str, seconds=seconds, images=images, megapixels=megapixels) -> str:
            if side not in seconds:
                return f"{'no decoder':>17}"
            return f"{megapixels / seconds[side]:6.1f} MP/s {len(images) / seconds[side]:4.0f}/s"

        fastest = min(seconds[side] for side in ("PIL", "torchvision") if side in seconds)
        tv_over_pil = f"{seconds['PIL'] / seconds['torchvision']:5.2f}x" if decoder else f"{'-':>6}"
        difference = f"{max_abs_difference(decoder, images):>11}" if decoder else f"{'-':>11}"
        print(
            f"{label:<14}{megapixels:6.1f}  {rate('torchvision')}  {rate('PIL')}  "
            f"{tv_over_pil}  {rate('segflow')}  {fastest / seconds['segflow']:11.2f}x  "
            f"{difference}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
