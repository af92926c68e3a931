"""Peak memory and speed of segmenting large GeoTIFFs window by window, side by side.

    python bench/raster_memory.py [--sides 2048 4096 8192] [--model PATH|module:factory]
                                  [--tile 512] [--overlap 64]

For each side, writes a SIDE x SIDE Cloud-Optimized-layout GeoTIFF mosaic of the shared
rasters (:func:`write_mosaic`) and segments it with :func:`segflow.shard.segment_images`
(the actors' path) in a fresh child process, which reports its peak RSS (``VmHWM``), its RSS
after loading the model, and the seconds. Prints one line per side: peak RSS, the growth
over the model's, and the seconds per megapixel; next to the bound of
:func:`segflow.raster.memory_bound` for that raster. The default model is ESPNet-CamVid.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("SEGFLOW_SHARED", Path(__file__).parents[1].parent / "shared"))
# Scenes of the mosaic, as (file, bands): Landsat with its nodata footprint, a COG, and the
# alpha-masked scene (its invalid pixels written as nodata 0).
MOSAIC_SCENES = (("RGB.byte.tif", (1, 2, 3)), ("cogeo.tif", (1, 2, 3)), ("RGBA.byte.tif", None))
BLOCK = 512


def _scenes() -> list[np.ndarray]:
    import rasterio

    scenes = []
    for name, bands in MOSAIC_SCENES:
        with rasterio.open(SHARED / "data" / "geotiff" / name) as source:
            if bands is None:
                pixels = source.read([1, 2, 3])
                pixels[:, source.read(4) == 0] = 0
            else:
                pixels = source.read(list(bands))
        scenes.append(pixels)
    return scenes


def write_mosaic(
    path: Path, side: int, *, width: int | None = None, overviews: bool = True
) -> None:
    """A ``side`` high, ``width`` (default ``side``) wide 3-band uint8 GeoTIFF laid out as a
    COG (512 px deflate tiles, overviews): the shared scenes repeated in a grid, shifted row by
    row, with nodata 0 in the scenes' own footprints and in margins on the top and right
    (a sixteenth of the shorter side)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    scenes = _scenes()
    cell = max(max(s.shape[1] for s in scenes), max(s.shape[2] for s in scenes))
    width = side if width is None else width
    margin = min(side, width) // 16
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": side,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32618",
        "transform": from_origin(100_000.0, 3_000_000.0, 0.5, 0.5),
        "nodata": 0,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "deflate",
        "photometric": "RGB",
        "interleave": "pixel",
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as out:
        for row, top in enumerate(range(0, side, cell)):
            height = min(cell, side - top)
            strip = np.zeros((3, height, width), np.uint8)
            if top + height > margin:
                for column, left in enumerate(range(0, width - margin, cell)):
                    scene = scenes[(row + column) % len(scenes)]
                    h = min(height, scene.shape[1])
                    w = min(scene.shape[2], width - margin - left)
                    strip[:, :h, left : left + w] = scene[:, :h, :w]
                strip[:, : max(0, margin - top)] = 0
            out.write(strip, window=Window(0, top, width, height))
        if overviews:
            out.build_overviews([4, 16, 64], Resampling.nearest)


def _peak_rss_bytes() -> tuple[int, int]:
    """(VmHWM, VmRSS) of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return tuple(int(fields[key].split()[0]) * 1024 for key in ("VmHWM", "VmRSS"))


def measure(path: str, model_spec: str, tile: int, overlap: int) -> dict:
    """Segments ``path`` here and reports peak RSS (bytes) and seconds; run it in a fresh
    process, the peak is the process's."""
    from segflow.models import load_model
    from segflow.shard import segment_images

    model = load_model(model_spec, device="cpu", tile_size=tile, tile_overlap=overlap)
    _, loaded = _peak_rss_bytes()
    started = time.perf_counter()
    result = segment_images(model, [path], run_id="bench", read_timeout=None)
    seconds = time.perf_counter() - started
    peak, _ = _peak_rss_bytes()
    images = result.tables["images"].to_pylist()
    if images[0]["status"] != "ok":
        raise RuntimeError(result.tables["errors"].to_pylist())
    masks = result.tables["masks"]
    return {
        "peak_rss": peak,
        "loaded_rss": loaded,
        "seconds": seconds,
        "masks": masks.num_rows,
        "area": sum(masks.column("area").to_pylist()),
        "counts_bytes": sum(len(c) for c in masks.column("counts").to_pylist()),
        "classes": len(model.classes),
    }


def measure_in_child(path: Path, model_spec: str, tile: int, overlap: int) -> dict:
    """:func:`measure` in a fresh Python process (its peak RSS is that run's alone)."""
    code = (
        "import json, sys; from bench.raster_memory import measure; "
        "print(json.dumps(measure(*sys.argv[1:3], int(sys.argv[3]), int(sys.argv[4]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), model_spec, str(tile), str(overlap)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sides", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--model", default=str(SHARED / "models" / "espnet_camvid.pt2"))
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    args = parser.parse_args()
    from segflow.raster import memory_bound

    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}  model: {args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            path = Path(tmp) / f"mosaic_{side}.tif"
            write_mosaic(path, side)
            got = measure_in_child(path, args.model, args.tile, args.overlap)
            path.unlink()
            bound = memory_bound(side, got["classes"], args.tile, args.overlap, got["counts_bytes"])
            megapixels = side**2 / 1e6
            mib = 1 << 20
            print(
                f"side {side:6d}: peak RSS {got['peak_rss'] / mib:7.0f} MiB, over the loaded "
                f"model {(got['peak_rss'] - got['loaded_rss']) / mib:6.0f} MiB (bound "
                f"{bound / mib:.0f} MiB), {got['masks']} masks of {got['counts_bytes'] / mib:.1f}"
                f" MiB counts, {got['seconds']:.0f} s, {got['seconds'] / megapixels:.3f} s/MP",
                flush=True,
            )


if __name__ == "__main__":
    main()
