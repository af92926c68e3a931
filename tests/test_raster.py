"""GeoTIFF inputs (segflow.raster) and polygons out (segflow.vector), on the shared rasters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from segflow import raster, rle  # noqa: E402
from segflow.manifest import Shard  # noqa: E402
from segflow.shard import segment_images  # noqa: E402
from segflow.store import RunStore  # noqa: E402

RGB_BYTE_VALID = 383_115  # of 791 x 718 = 567,938


@pytest.fixture(scope="module")
def geotiff(shared: Path) -> Path:
    return shared / "data" / "geotiff"


@pytest.fixture(scope="module")
def espnet_tiled(shared: Path):
    from segflow.models import load_model

    # Tiles smaller than the rasters, so that they are read and blended window by window.
    return load_model(
        str(shared / "models" / "espnet_camvid.pt2"), device="cpu", tile_size=320, tile_overlap=64
    )


@pytest.fixture(scope="module")
def geo_run(espnet_tiled, geotiff: Path, tmp_path_factory):
    """A run over two rasters (one EPSG-coded, one with a .msk file and a WKT CRS), written by
    the workers' code path."""
    uris = [str(geotiff / "RGB.byte.tif"), str(geotiff / "RGB2.byte.tif")]
    result = segment_images(espnet_tiled, uris, run_id="geo", read_timeout=None)
    out = tmp_path_factory.mktemp("geo") / "out"
    store = RunStore(str(out), "geo")
    store.prepare({"input": "geotiff"})
    summary = {"shard": 0, "images": 2, "failed": 0, "not_evaluated": 0, "masks": 0}
    store.commit_shard(Shard(0, 0, 2), result.tables, summary)
    return out / "run=geo", result


def test_masks_cover_exactly_the_valid_pixels(geo_run, geotiff):
    _, result = geo_run
    images = result.tables["images"].to_pylist()
    assert [row["status"] for row in images] == ["ok", "ok"], result.tables["errors"].to_pylist()
    masks = result.tables["masks"].to_pylist()
    for uri in (str(geotiff / "RGB.byte.tif"), str(geotiff / "RGB2.byte.tif")):
        rows = [row for row in masks if row["uri"] == uri]
        decoded = rle.decode_masks([{"size": [718, 791], "counts": r["counts"]} for r in rows])
        with rasterio.open(uri) as dataset:
            valid = dataset.dataset_mask() > 0
        assert decoded.sum(0).max() == 1  # one class per pixel
        np.testing.assert_array_equal(decoded.sum(0).astype(bool), valid)
        assert sum(row["area"] for row in rows) == valid.sum()
    assert sum(r["area"] for r in masks if r["uri"].endswith("/RGB.byte.tif")) == RGB_BYTE_VALID


def test_window_by_window_labels_equal_the_whole_image_tiled(espnet_tiled, geotiff, tmp_path):
    """The windows read from the file, blended in blocks band of columns by band of columns,
    give the labels of the in-memory tiled inference over the whole image (invalid pixels
    aside), and the windows with no valid pixel are never read into the model."""
    with rasterio.open(geotiff / "RGB.byte.tif") as scene:
        profile, pixels = scene.profile, scene.read()
    margin = 320  # columns of nodata on the right: whole windows with nothing to segment
    padded = np.concatenate([pixels, np.zeros((3, scene.height, margin), np.uint8)], axis=2)
    path = tmp_path / "padded.tif"
    with rasterio.open(path, "w", **(profile | {"width": scene.width + margin})) as out:
        out.write(padded)
    source = raster.open_raster(str(path), raster.RasterOptions())
    skipped, read = [], []

    def counting(window):
        pixels = source.model_window(window)
        (skipped if pixels is None else read).append(window)
        return pixels

    labels = np.full((source.height, source.width), -1, np.int64)
    blocks = espnet_tiled.label_blocks(counting, source.height, source.width)
    for (top, bottom, left, right), block in blocks:
        if block is not None:
            labels[top:bottom, left:right] = block.numpy()
    valid = source.valid((0, source.height, 0, source.width))
    whole = espnet_tiled.predict([source.pixels((0, source.height, 0, source.width))])[0]
    source.close()

    def any_valid(window):
        top, bottom, left, right = window
        return valid[top:bottom, left:right].any()

    assert any(left >= scene.width for _, _, left, _ in skipped)
    assert not any(map(any_valid, skipped)) and all(map(any_valid, read))
    agreement = (labels[valid] == whole.labels.numpy()[valid]).mean()
    assert agreement > 0.9999, agreement  # blending order only: float rounding at ties


def test_images_record_crs_and_transform(geo_run):
    _, result = geo_run
    by_name = {Path(row["uri"]).name: row for row in result.tables["images"].to_pylist()}
    assert by_name["RGB.byte.tif"]["crs"] == "EPSG:32618"
    a, b, c, d, e, f = by_name["RGB.byte.tif"]["transform"]
    assert (b, c, d, f) == (0.0, 101985.0, 0.0, 2826915.0)
    assert a == pytest.approx(300.0379266750948) and e == pytest.approx(-300.041782729805)
    # RGB2 states its CRS as WKT only; pyproj may still find its code.
    assert by_name["RGB2.byte.tif"]["crs"].startswith(("EPSG:", "PROJCRS"))


def test_a_plain_image_has_no_georeference(espnet_tiled, shared):
    frame = sorted((shared / "data" / "camvid_val" / "images").glob("*.png"))[0]
    row = segment_images(espnet_tiled, [str(frame)], run_id="r").tables["images"].to_pylist()[0]
    assert row["status"] == "ok" and row["crs"] is None and row["transform"] is None


def test_band_and_rescale_errors_name_the_problem(geotiff):
    with pytest.raises(raster.RasterError, match=r"2 band.*cannot feed the model's 3 channels"):
        raster.parse_bands("1,2")
    with pytest.raises(raster.RasterError, match="band numbers start at 1"):
        raster.parse_bands("0,1,2")
    single = str(geotiff / "rgb1_fake_nir_epsg3857.tif")
    with pytest.raises(raster.RasterError, match=r"has 1 band.*--bands 1,1,1"):
        raster.open_raster(single, raster.RasterOptions())
    source = raster.open_raster(single, raster.RasterOptions(bands=(1, 1, 1)))
    pixels = source.pixels((0, 10, 0, 10))
    source.close()
    assert pixels.shape == (10, 10, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    uint16 = str(geotiff / "sample_geotiff.tif")
    with pytest.raises(raster.RasterError, match=r"uint16 need a rescale.*--rescale"):
        raster.open_raster(uint16, raster.RasterOptions(bands=(1, 1, 1)))
    with pytest.raises(raster.RasterError, match="LOW must be below HIGH"):
        raster.Rescale.parse("300,20")
    with pytest.raises(raster.RasterError, match="both or neither"):
        raster.Rescale.parse("p2,3000")


def test_rescale_by_values_and_by_percentiles(geotiff):
    uint16 = str(geotiff / "sample_geotiff.tif")  # values 54..6615
    by_values = raster.RasterOptions(bands=(1, 1, 1), rescale=raster.Rescale.parse("54,6615"))
    source = raster.open_raster(uint16, by_values)
    whole = (0, source.height, 0, source.width)
    pixels = source.pixels(whole)[..., 0]
    stored = source.dataset.read(1)
    source.close()
    assert pixels.min() == 0 and pixels.max() == 255
    expected = np.rint((stored.astype(np.float32) - 54) * (255 / (6615 - 54))).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)
    by_percentiles = raster.RasterOptions(bands=(1, 1, 1), rescale=raster.Rescale.parse("p2,p98"))
    source = raster.open_raster(uint16, by_percentiles)
    pixels = source.pixels(whole)[..., 0]
    source.close()
    # 2% of the pixels at or below the low percentile, 2% at or above the high one.
    assert 0.015 < (pixels == 0).mean() < 0.03 and 0.015 < (pixels == 255).mean() < 0.03


def test_signed_rasters_with_a_custom_crs_and_nodata(geotiff):
    path = str(geotiff / "sample_geotiff_custom_proj.tif")  # int16, nodata -9999, Albers WKT
    options = raster.RasterOptions(rescale=raster.Rescale.parse("p2,p98"))
    source = raster.open_raster(path, options)
    assert source.georeference.crs.startswith("PROJCRS")
    valid = source.valid((0, source.height, 0, source.width))
    stored = source.dataset.read(1)
    source.close()
    np.testing.assert_array_equal(valid, stored != -9999)


def test_an_s3_raster_is_read_through_fsspec(geotiff, s3_env, monkeypatch):
    import s3fs

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env["AWS_ENDPOINT_URL"]})
    fs.mkdir("geo-bucket")
    fs.put(str(geotiff / "RGB.byte.tif"), "geo-bucket/scenes/RGB.byte.tif")
    source = raster.open_raster("s3://geo-bucket/scenes/RGB.byte.tif", raster.RasterOptions())
    valid = source.valid((0, source.height, 0, source.width))
    source.close()
    assert valid.sum() == RGB_BYTE_VALID


def test_polygons_rasterize_back_to_the_masks_exactly(geo_run, tmp_path):
    import geopandas
    from affine import Affine
    from rasterio import features

    from segflow.vector import VectorExport, export_vector

    run, result = geo_run
    out = tmp_path / "polygons.parquet"
    if len({row["crs"] for row in result.tables["images"].to_pylist()}) > 1:
        with pytest.raises(raster.RasterError, match=r"2 CRSs.*--crs"):
            export_vector(str(run), str(out), VectorExport())
    summary = export_vector(str(run), str(out), VectorExport(crs="EPSG:32618"))
    frame = geopandas.read_parquet(out)
    assert summary.polygons == len(frame) > 0 and frame.crs.to_epsg() == 32618
    images = {row["image_id"]: row for row in result.tables["images"].to_pylist()}
    first = next(iter(images.values()))
    transform = Affine(*first["transform"])
    one = frame[frame.image_id == first["image_id"]]
    for row in result.tables["masks"].to_pylist():
        if row["image_id"] != first["image_id"]:
            continue
        polygons = one[one.class_id == row["class_id"]]
        mask = rle.decode({"size": [row["height"], row["width"]], "counts": row["counts"]})
        back = features.rasterize(
            polygons.geometry, out_shape=mask.shape, transform=transform, dtype=np.uint8
        )
        np.testing.assert_array_equal(back, mask)
        pixel_area = abs(transform.a * transform.e)
        assert polygons.area.sum() == pytest.approx(row["area"] * pixel_area, rel=1e-9)
        assert polygons["area"].sum() == pytest.approx(row["area"] * pixel_area, rel=1e-9)


def test_geoparquet_metadata_and_duckdb(geo_run, tmp_path):
    import duckdb
    import pyarrow.parquet as pq

    from segflow.vector import VectorExport, export_vector

    run, _ = geo_run
    out = tmp_path / "polygons.parquet"
    export_vector(str(run), str(out), VectorExport(crs="EPSG:32618", min_area=1e6))
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["crs"]["id"] == {
        "authority": "EPSG",
        "code": 32618,
    }
    assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    db = duckdb.connect()
    rows, smallest, inside = db.execute(
        f"SELECT count(*), min(area), bool_and(bbox.xmin <= bbox.xmax) FROM '{out}'"
    ).fetchone()
    assert rows > 0 and smallest >= 1e6 and inside


def test_geojson_is_read_by_geopandas(geo_run, tmp_path):
    import geopandas

    from segflow.vector import VectorExport, export_vector

    run, _ = geo_run
    out = tmp_path / "polygons.geojson"
    summary = export_vector(
        str(run), str(out), VectorExport(crs="EPSG:4326", simplify=0.001, format="geojson")
    )
    frame = geopandas.read_file(out)
    assert len(frame) == summary.polygons and frame.crs.to_epsg() == 4326
    assert set(frame.columns) >= {"image_id", "class_name", "area", "geometry"}


def test_export_vector_command(geo_run, tmp_path):
    from typer.testing import CliRunner

    from segflow.cli import app

    run, _ = geo_run
    out = tmp_path / "cli.parquet"
    done = CliRunner().invoke(app, ["export-vector", str(run), str(out), "--crs", "EPSG:32618"])
    assert done.exit_code == 0, done.output
    assert "polygons of" in done.output and out.stat().st_size > 0
    refused = CliRunner().invoke(app, ["export-vector", str(run), str(out), "--format", "shp"])
    assert refused.exit_code == 2 and "--format 'shp'" in refused.output


def test_without_rasterio_a_geotiff_fails_with_the_install_hint(geotiff, shared, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(raster, "rasterio_available", lambda: False)
    model = SimpleNamespace(name="unused", classes=("a",), task="semantic")
    result = segment_images(model, [str(geotiff / "RGB.byte.tif")], run_id="r")
    (error,) = result.tables["errors"].to_pylist()
    assert error["stage"] == "decode" and "pip install 'segflow[geo]'" in error["message"]


def test_segment_refuses_bands_that_cannot_feed_the_model_before_any_work(geotiff, tmp_path):
    from typer.testing import CliRunner

    from segflow.cli import app

    out = tmp_path / "out"
    arguments = ["segment", str(geotiff), "--model", "unused", "--out", str(out)]
    refused = CliRunner().invoke(app, [*arguments, "--bands", "1,2"])
    assert refused.exit_code == 2 and "cannot feed the model's 3 channels" in refused.output
    refused = CliRunner().invoke(app, [*arguments, "--rescale", "p98,p2"])
    assert refused.exit_code == 2 and "LOW must be below HIGH" in refused.output
    assert not out.exists()


@pytest.mark.slow
def test_a_30000_pixel_cog_mosaic_is_segmented_in_bounded_memory(tmp_path):
    """A 30000 x 30000 COG mosaic of the shared rasters (2.7 GB of pixels, nodata margins)
    through the actors' path, in a fresh process: its peak RSS beyond the loaded model stays
    under raster.memory_bound, which depends on the height, not the area. The model is a
    cheap 4-class one (tests.user_models.ChannelMixModel), tiled like every semantic model;
    bench/raster_memory.py runs ESPNet at such sizes."""
    from bench.raster_memory import measure_in_child, write_mosaic

    side, tile, overlap = 30_000, 512, 64
    path = tmp_path / "mosaic.tif"
    write_mosaic(path, side)
    got = measure_in_child(path, "tests.user_models:make_channel_mix_model", tile, overlap)
    bound = raster.memory_bound(side, got["classes"], tile, overlap, got["counts_bytes"])
    print(got, f"bound {bound / 2**20:.0f} MiB")
    assert got["masks"] == got["classes"] and 0 < got["area"] < side * side
    assert got["peak_rss"] - got["loaded_rss"] < bound
    # Held in the old design: the logits of a band of columns over the whole height.
    assert bound < 4 * got["classes"] * tile * side * 4
