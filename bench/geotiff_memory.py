"""Peak memory and speed of segmenting one large GeoTIFF window by window.

    python bench/geotiff_memory.py SIDE [--tile 1024] [--model PATH]

Writes a SIDE x SIDE COG-layout GeoTIFF (512 px internal tiles, deflate, overviews) made by
repeating the shared ``cogeo.tif`` with a nodata margin, segments it with
:func:`segflow.shard.segment_images` (the actors' path) and prints the file size, the peak
RSS of the process (``ru_maxrss``) and the seconds per megapixel.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from segflow.models import load_model
from segflow.shard import segment_images

SHARED = Path(os.environ.get("SEGFLOW_SHARED", Path(__file__).parents[1].parent / "shared"))


def write_mosaic(path: Path, side: int) -> None:
    with rasterio.open(SHARED / "data" / "geotiff" / "cogeo.tif") as source:
        block, profile = source.read(), source.profile
    profile |= {
        "width": side,
        "height": side,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "nodata": 0,
        "driver": "GTiff",
        "photometric": "RGB",
    }
    tile = block.shape[1]
    with rasterio.open(path, "w", **profile) as out:
        for top in range(0, side, tile):
            for left in range(0, side, tile):
                h, w = min(tile, side - top), min(tile, side - left)
                pixels = block[:, :h, :w]
                if left + w > side - side // 8:  # a nodata margin on the right
                    pixels = np.zeros_like(pixels)
                out.write(pixels, window=Window(left, top, w, h))
        out.build_overviews([2, 4, 8, 16], rasterio.enums.Resampling.average)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", type=int)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--model", default=str(SHARED / "models" / "espnet_camvid.pt2"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"mosaic_{args.side}.tif"
        write_mosaic(path, args.side)
        model = load_model(args.model, device="cpu", tile_size=args.tile)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        result = segment_images(model, [str(path)], run_id="bench", read_timeout=None)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        images = result.tables["images"].to_pylist()
        assert images[0]["status"] == "ok", result.tables["errors"].to_pylist()
        megapixels = args.side**2 / 1e6
        print(
            f"side {args.side}: file {path.stat().st_size / 1e6:.1f} MB, "
            f"{result.tables['masks'].num_rows} masks, peak RSS {peak / 1024:.0f} MiB "
            f"(after model load {before / 1024:.0f} MiB), {seconds:.1f} s, "
            f"{seconds / megapixels:.2f} s/MP"
        )


if __name__ == "__main__":
    main()
