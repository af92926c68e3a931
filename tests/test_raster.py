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


def test_an_s3_raster_is_segmented_in_the_shards_threads(s3_env, monkeypatch):
    """Opened in a reader thread, read and closed in the host thread: rasterio's fsspec
    opener state lives in the opening thread's context variables."""
    from segflow.demo.corpus import write_corpus
    from segflow.models import load_model

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    split = write_corpus("s3://geo-tiles/corpus", images=2, size=(128, 96), geotiff=2)
    model = load_model(str(Path(__file__).parents[1] / "models/demo/aerial_unet.pt2"))
    uris = [f"{split.geotiff}/train-0000{i}.tif" for i in range(2)]
    result = segment_images(model, uris, run_id="s3", read_timeout=None)
    assert result.tables["errors"].to_pylist() == []
    rows = result.tables["masks"].to_pylist()
    # Both tiles are on the mosaic's bottom row and the second on its right edge.
    expected = {uris[0]: 128 * (96 - 64), uris[1]: (128 - 64) * (96 - 64)}
    for uri, valid in expected.items():
        assert sum(row["area"] for row in rows if row["uri"] == uri) == valid


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


def test_export_vector_of_some_classes(geo_run, tmp_path):
    import geopandas

    from segflow.vector import VectorExport, export_vector

    run, result = geo_run
    names = sorted({row["class_name"] for row in result.tables["masks"].to_pylist()})
    out = tmp_path / "some.parquet"
    export_vector(str(run), str(out), VectorExport(crs="EPSG:32618", classes=tuple(names[:2])))
    assert sorted(set(geopandas.read_parquet(out).class_name)) == names[:2]
    with pytest.raises(raster.RasterError, match=r"--classes lake: no mask of .* has that class"):
        export_vector(str(run), str(out), VectorExport(crs="EPSG:32618", classes=("lake",)))


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


# --------------------------------------------------------------------------------------------
# Label rasters out (segflow.label_raster).


def _expected_labels(masks: list[dict], height: int, width: int, nodata: int) -> np.ndarray:
    """The label raster of semantic mask rows, decoded by pycocotools (the reference)."""
    from pycocotools import mask as coco_mask

    labels = np.full((height, width), nodata, np.int64)
    for row in masks:
        rle_ = {"size": [height, width], "counts": row["counts"].encode()}
        labels[coco_mask.decode(rle_).astype(bool)] = row["class_id"]
    return labels


def test_label_cogs_are_the_masks_on_the_rasters_grids(geo_run, geotiff, tmp_path):
    from segflow import palette
    from segflow.label_raster import export_raster

    run, result = geo_run
    summary = export_raster(str(run), str(tmp_path / "labels"))
    assert summary.rasters == 2 and len(summary.files) == 2
    assert (summary.format.dtype, summary.format.nodata) == ("uint8", 255)
    masks = result.tables["masks"].to_pylist()
    for name in ("RGB.byte", "RGB2.byte"):
        uri = str(geotiff / f"{name}.tif")
        with (
            rasterio.open(uri) as source,
            rasterio.open(tmp_path / "labels" / f"{name}.tif") as cog,
        ):
            assert (cog.crs, cog.transform, cog.shape) == (
                source.crs,
                source.transform,
                source.shape,
            )
            assert cog.dtypes == ("uint8",) and cog.nodata == 255
            assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert cog.overviews(1) == [2]  # 791 x 718 halves once to fit a 512 tile
            values = cog.read(1)
            overview = cog.read(1, out_shape=(source.height // 2, source.width // 2))
            valid = source.dataset_mask() > 0
            colours, names = cog.colormap(1), cog.tags(1)
        rows = [row for row in masks if row["uri"] == uri]
        expected = _expected_labels(rows, source.height, source.width, 255)
        np.testing.assert_array_equal(values, expected)
        np.testing.assert_array_equal(values != 255, valid)
        # Mode resampling: an overview holds only the classes (and nodata) of its raster.
        assert set(np.unique(overview)) <= set(np.unique(values))
        for row in rows:
            assert colours[row["class_id"]] == (*palette.colour(row["class_id"]), 255)
            assert names[f"CLASS_{row['class_id']}"] == row["class_name"]
        assert colours[255][3] == 0  # nodata transparent
        if name == "RGB.byte":
            assert (values != 255).sum() == RGB_BYTE_VALID


def test_label_runs_decode_across_strips_in_uint16(tmp_path):
    """More than 255 classes give uint16 with nodata 65535; masks whose runs cross the
    strips' column boundaries decode as pycocotools decodes them; overlapping masks are
    refused."""
    from pycocotools import mask as coco_mask

    from segflow.label_raster import STRIP_COLUMNS, Grid, LabelFormat, write_label_cog

    assert LabelFormat.for_classes(["c"] * 255).dtype == "uint8"
    label_format = LabelFormat.for_classes([f"c{i}" for i in range(301)])
    assert (label_format.dtype, label_format.nodata) == ("uint16", 65535)
    height, width = 300, 2 * STRIP_COLUMNS + 77
    rng = np.random.default_rng(13)
    truth = np.full((height, width), -1)
    for class_id in (0, 7, 299, 300):
        for _ in range(6):
            y, x = rng.integers(0, height - 40), rng.integers(0, width - 300)
            truth[y : y + rng.integers(5, 40), x : x + rng.integers(5, 300)] = class_id
    # Runs that go on from one strip into the next (column-major: down a column, then on
    # at the top of the next).
    truth[:, STRIP_COLUMNS - 30 : STRIP_COLUMNS + 30] = 299
    truth[250:, 2 * STRIP_COLUMNS - 1] = truth[:50, 2 * STRIP_COLUMNS] = 7
    masks = [
        (c, coco_mask.encode(np.asfortranarray(truth == c).astype(np.uint8))["counts"].decode())
        for c in np.unique(truth[truth >= 0])
    ]
    grid = Grid(height, width, "EPSG:32640", (0.5, 0.0, 300000.0, 0.0, -0.5, 2780000.0))
    path = str(tmp_path / "labels.tif")
    write_label_cog(path, grid, masks, label_format, what="synthetic")
    with rasterio.open(path) as cog:
        values = cog.read(1)
        assert cog.dtypes == ("uint16",) and cog.nodata == 65535 and cog.crs.to_epsg() == 32640
        assert cog.colormap(1)[300] != (0, 0, 0, 0)
    np.testing.assert_array_equal(values, np.where(truth < 0, 65535, truth))
    overlapping = [
        *masks,
        (5, coco_mask.encode(np.asfortranarray(truth == 0).astype(np.uint8))["counts"].decode()),
    ]
    with pytest.raises(raster.RasterError, match="synthetic: masks overlap"):
        write_label_cog(path, grid, overlapping, label_format, what="synthetic")


def test_label_cogs_go_to_s3(geo_run, s3_env, monkeypatch, tmp_path):
    import s3fs

    from segflow.label_raster import export_raster

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env["AWS_ENDPOINT_URL"]})
    fs.mkdir("labels-bucket")
    run, _ = geo_run
    summary = export_raster(str(run), "s3://labels-bucket/geo/labels")
    assert sorted(summary.files) == [
        "s3://labels-bucket/geo/labels/RGB.byte.tif",
        "s3://labels-bucket/geo/labels/RGB2.byte.tif",
    ]
    fs.get("labels-bucket/geo/labels/RGB.byte.tif", str(tmp_path / "back.tif"))
    with rasterio.open(tmp_path / "back.tif") as cog:
        assert (cog.read(1) != cog.nodata).sum() == RGB_BYTE_VALID


def test_label_file_names_follow_the_uri_stems():
    from segflow.label_raster import _file_name

    taken: set[str] = set()
    names = [_file_name(uri, i, taken) for i, uri in enumerate(["a/x.tif", "b/x.tiff", "c/y.jp2"])]
    assert names == ["x.tif", "x-1.tif", "y.tif"]


def test_export_raster_command(geo_run, espnet_tiled, shared, instance_run, tmp_path):
    from typer.testing import CliRunner

    from segflow.cli import app

    run, _ = geo_run
    done = CliRunner().invoke(app, ["export-raster", str(run), str(tmp_path / "labels")])
    assert done.exit_code == 0, done.output
    assert "2 label rasters (uint8, 11 classes, nodata 255)" in done.output
    frame = sorted((shared / "data" / "camvid_val" / "images").glob("*.png"))[0]
    plain = tmp_path / "plain"
    store = RunStore(str(plain), "plain")
    store.prepare({"input": "png"})
    result = segment_images(espnet_tiled, [str(frame)], run_id="plain")
    summary = {"shard": 0, "images": 1, "failed": 0, "not_evaluated": 0, "masks": 0}
    store.commit_shard(Shard(0, 0, 1), result.tables, summary)
    refused = CliRunner().invoke(app, ["export-raster", str(plain), str(tmp_path / "x")])
    assert refused.exit_code == 2 and "no georeferenced raster" in refused.output
    assert str(plain) in refused.output
    refused = CliRunner().invoke(app, ["export-raster", str(instance_run), str(tmp_path / "x")])
    assert refused.exit_code == 2 and "needs a semantic run" in refused.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_30000_pixel_high_cog_mosaic_is_segmented_in_bounded_memory(tmp_path):
    """A COG mosaic of the shared rasters 30,000 pixels high (nodata margins) through the
    actors' path, in a fresh process: its peak RSS beyond the loaded model stays below one
    band of logits over the height (what the old design held twice); raster.memory_bound,
    which depends on the height, not the width or the area, is printed beside it. 2,048 wide,
    so that the suite stays quick: the width only adds column bands, each finished and
    dropped before the next (bench/raster_memory.py measures 30000 x 30000). The model is a
    cheap 4-class one (tests.user_models.ChannelMixModel), tiled like every semantic model."""
    from bench.raster_memory import measure_in_child, write_mosaic

    side, width, tile, overlap = 30_000, 2_048, 512, 64
    path = tmp_path / "mosaic.tif"
    write_mosaic(path, side, width=width)
    got = measure_in_child(path, "tests.user_models:make_channel_mix_model", tile, overlap)
    bound = raster.memory_bound(side, got["classes"], tile, overlap, got["counts_bytes"])
    print(got, f"bound {bound / 2**20:.0f} MiB")
    assert 0 < got["masks"] <= got["classes"] and 0 < got["area"] < side * width
    # The old design held a band of logits over the whole height (twice while it grew): the
    # formula's bound is printed, not asserted: it leaves out the model's own working memory
    # (measured 284 to 322 MiB here against its 303).
    band = 4 * got["classes"] * (2 * tile - overlap) * side  # C x (tile + stride) x H floats
    assert got["peak_rss"] - got["loaded_rss"] < band < 4 * bound
