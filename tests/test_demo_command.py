"""The README's main job, as a newcomer runs it: ``segflow demo`` (what ``make demo`` runs)
on the embedded default, end to end, leaving nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEGFLOW = str(Path(sys.executable).with_name("segflow"))


def processes_tagged(tag: str) -> dict[int, str]:
    """The processes whose environment holds ``tag``: the demo's and every descendant's,
    whichever parent they end up with, and nobody else's on the machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found[int(entry.name)] = (
                        (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    )
            except OSError:
                continue  # it ended while we looked, or is not ours to read
    return found


def test_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path: Path):
    run_tag = str(uuid.uuid4())
    log = tmp_path / "demo.log"
    out = tmp_path / "demo"
    with log.open("w") as output:
        done = subprocess.run(
            [SEGFLOW, "demo", "--out", str(out), "--images", "6", "--large", "1", "--broken", "2"],
            cwd=REPO_ROOT,
            env={**os.environ, "COLUMNS": "200", "SEGFLOW_DEMO_TEST": run_tag},
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    printed = log.read_text()
    assert done.returncode == 0, printed[-3000:]

    miou = float(re.search(r"│ miou\s+│\s+([0-9.]+)", printed).group(1))
    mask_ap = float(re.search(r"│ segm AP\s+│\s+([0-9.]+)", printed).group(1))
    assert miou >= 0.80 and mask_ap >= 0.50, printed[-3000:]
    assert "TruncatedImageError" in printed  # the planted broken files show as errors
    for name in ("semantic", "instance"):
        report = out / f"report-{name}.html"
        assert report.stat().st_size > 10_000 and str(report) in printed.replace("\n", "")
        [run] = (out / "runs" / name).glob("run=*")
        assert (run / "summary.json").is_file() and list((run / "evaluations").iterdir())
    check_the_geotiff_run(out, printed)

    # Ray, moto and Prefect's server stop with the demo (Ray's may take a moment).
    deadline = time.monotonic() + 30
    while leftovers := processes_tagged(f"SEGFLOW_DEMO_TEST={run_tag}"):
        if time.monotonic() > deadline:
            pytest.fail(f"the demo left processes behind: {leftovers}")
        time.sleep(1)


def check_the_geotiff_run(out: Path, printed: str) -> None:
    """The GeoTIFF tiles' buildings and roads as GeoParquet in the tiles' CRS, and a label
    COG per tile with nodata exactly on its margins."""
    import geopandas
    import rasterio

    from segflow.demo.corpus import NODATA_MARGIN

    polygons = out / "geotiff" / "buildings-roads.parquet"
    frame = geopandas.read_parquet(polygons)
    assert frame.crs.to_epsg() == 32640 and set(frame.class_name) == {"building", "road"}
    assert str(polygons) in printed.replace("\n", "") and "The GeoParquet in DuckDB" in printed
    labels = sorted((out / "geotiff" / "labels").glob("*.tif"))
    assert [path.name for path in labels] == [f"heldout-{i:05d}.tif" for i in range(6)]
    with rasterio.open(labels[0]) as inside, rasterio.open(labels[2]) as right_edge:
        assert inside.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert (inside.read(1) == inside.nodata).sum() == 0
        assert (right_edge.read(1) == right_edge.nodata).sum() == NODATA_MARGIN * 512
