"""The per-image path end to end: real model, real images, planted bad files, real Parquet
read back by DuckDB and Polars, masks decoded by pycocotools."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as coco_mask

from segflow import schema
from segflow.decode import decode_image
from segflow.groundtruth import open_ground_truth
from segflow.models import load_model
from segflow.reading import read_bytes
from segflow.shard import segment_images
from tests.conftest import manifest_uris

pytestmark = pytest.mark.slow

GOOD = 4


@pytest.fixture(scope="module")
def espnet(shared: Path):
    return load_model(str(shared / "models" / "espnet_camvid.pt2"), device="cpu")


@pytest.fixture
def corpus(shared: Path, tmp_path: Path) -> Path:
    """A folder with a space in its name: four CamVid frames and four broken files."""
    folder = tmp_path / "camvid frames"
    folder.mkdir()
    frames = sorted((shared / "data" / "camvid_val" / "images").glob("*.png"))[:GOOD]
    for frame in frames:
        shutil.copy(frame, folder / frame.name)
    png = frames[0].read_bytes()
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "notes.jpg").write_bytes(b"this is not an image\n" * 10)
    (folder / "zz_huge.png").write_bytes(_png_header_declaring(100_000, 100_000))
    return folder


def _png_header_declaring(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def test_shard_rows_match_the_model_and_record_every_failure(espnet, corpus: Path):
    uris = manifest_uris(str(corpus))
    result = segment_images(espnet, uris, run_id="r1", batch_size=3)

    assert result.num_images == len(uris) == GOOD + 4
    errors = {Path(row["uri"]).name: row for row in result.tables["errors"].to_pylist()}
    assert set(errors) == {"empty.png", "truncated.png", "notes.jpg", "zz_huge.png"}
    assert {row["stage"] for row in errors.values()} == {"decode"}
    statuses = {Path(r["uri"]).name: r["status"] for r in result.tables["images"].to_pylist()}
    assert sum(s == "ok" for s in statuses.values()) == GOOD

    # Every good image's masks, decoded by pycocotools, rebuild exactly the model's label map.
    masks = result.tables["masks"].to_pylist()
    for uri in uris:
        name = Path(uri).name
        if name in errors:
            continue
        image = decode_image(Path(uri.removeprefix("file://")).read_bytes())
        [expected] = espnet.predict([image])
        rebuilt = np.full(expected.labels.shape, -1, dtype=np.int64)
        rows = [m for m in masks if m["uri"] == uri]
        assert rows, name
        for row in rows:
            size = [row["height"], row["width"]]
            encoded = {"size": size, "counts": row["counts"].encode()}
            decoded = coco_mask.decode(encoded)
            assert decoded.sum() == row["area"] == int(coco_mask.area(encoded))
            assert row["bbox"] == coco_mask.toBbox(encoded).tolist()
            assert (rebuilt[decoded == 1] == -1).all(), "classes overlap"
            rebuilt[decoded == 1] = row["class_id"]
            assert row["class_name"] == espnet.classes[row["class_id"]]
        np.testing.assert_array_equal(rebuilt, expected.labels.numpy())


def test_tables_read_back_in_duckdb_and_polars(espnet, corpus: Path, tmp_path: Path):
    result = segment_images(espnet, manifest_uris(str(corpus)), run_id="r2")
    paths = {}
    for name in ("masks", "images", "errors"):
        paths[name] = tmp_path / f"{name}.parquet"
        schema.write_table(name, result.tables[name], paths[name])
        metadata = pq.read_metadata(paths[name])
        assert metadata.metadata[b"segflow.schema_version"] == schema.SCHEMA_VERSION.encode()
        assert metadata.row_group(0).column(0).compression == "ZSTD"
        assert schema.read_table(name, paths[name]).num_rows == result.tables[name].num_rows

    con = duckdb.connect()
    n_rows, n_images = con.execute(
        f"SELECT count(*), count(DISTINCT image_id) FROM '{paths['images']}'"
    ).fetchone()
    assert (n_rows, n_images) == (GOOD + 4, GOOD + 4)
    duck_types = dict(
        con.execute(
            f"SELECT column_name, column_type FROM (DESCRIBE '{paths['masks']}')"
        ).fetchall()
    )
    assert duck_types["image_id"] == "BIGINT"
    assert duck_types["bbox"] == "DOUBLE[]"
    assert (
        "TIMESTAMP WITH TIME ZONE"
        in con.execute(f"SELECT typeof(processed_at) FROM '{paths['images']}' LIMIT 1").fetchone()[
            0
        ]
    )
    area_by_duckdb = con.execute(f"SELECT sum(area) FROM '{paths['masks']}'").fetchone()[0]
    pixels = con.execute(
        f"SELECT sum(height::BIGINT * width) FROM '{paths['images']}' WHERE status = 'ok'"
    ).fetchone()[0]
    assert area_by_duckdb == pixels  # semantic masks tile each image exactly

    masks = pl.read_parquet(paths["masks"])
    assert masks.schema["image_id"] == pl.Int64
    images = pl.read_parquet(paths["images"])
    assert images.schema["processed_at"] == pl.Datetime("us", "UTC")
    assert masks["area"].sum() == area_by_duckdb
    row = masks.row(0, named=True)
    expected = coco_mask.decode(
        {"size": [row["height"], row["width"]], "counts": row["counts"].encode()}
    )
    np.testing.assert_array_equal(schema.mask_from_row(row), expected)


def test_rows_with_a_null_in_a_required_column_are_refused():
    row = {name: None for name in schema.ERRORS.names}
    with pytest.raises(schema.SchemaError, match="must not be null"):
        schema.table_from_rows("errors", [row])
    with pytest.raises(schema.SchemaError, match="unknown table"):
        schema.table_from_rows("nope", [])


def _segment_in_background(**kwargs) -> tuple[threading.Thread, list]:
    """``segment_images`` in a daemon thread, so that a test whose read hangs fails (its
    join times out) instead of hanging the suite."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(segment_images(**kwargs)), daemon=True)
    thread.start()
    return thread, results


def test_a_fifo_among_the_frames_is_a_read_error_and_the_shard_goes_on(
    espnet, corpus: Path, tmp_path: Path
):
    fifo = corpus / "x.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    uris = manifest_uris(str(corpus))
    assert f"file://{fifo}" in uris
    thread, results = _segment_in_background(model=espnet, uris=uris, run_id="r1", batch_size=3)
    try:
        thread.join(timeout=300)
        assert not thread.is_alive(), "the shard hung on the FIFO"
    finally:
        with contextlib.suppress(OSError):  # unblock a reader stuck in open(), if any
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    [result] = results
    assert result.num_images == len(uris) == GOOD + 5
    errors = {Path(row["uri"]).name: row for row in result.tables["errors"].to_pylist()}
    assert errors["x.png"]["stage"] == "read"
    assert errors["x.png"]["message"] == f"not a regular file (a FIFO): {fifo}"
    assert {row["stage"] for name, row in errors.items() if name != "x.png"} == {"decode"}
    statuses = [row["status"] for row in result.tables["images"].to_pylist()]
    assert statuses.count("ok") == GOOD


def test_a_fifo_among_the_label_files_fails_that_evaluation_only(
    espnet, shared: Path, tmp_path: Path
):
    frames = sorted((shared / "data" / "camvid_val" / "images").glob("*.png"))[:3]
    labels = tmp_path / "labels"
    labels.mkdir()
    for frame in frames[1:]:
        shutil.copy(shared / "data" / "camvid_val" / "labels" / frame.name, labels / frame.name)
    os.mkfifo(labels / frames[0].name)
    ground_truth = open_ground_truth(f"masks:{labels}", ignore_index=11)
    uris = [str(frame) for frame in frames]
    thread, results = _segment_in_background(
        model=espnet, uris=uris, run_id="r1", ground_truth=ground_truth
    )
    try:
        thread.join(timeout=300)
        assert not thread.is_alive(), "the shard hung on the FIFO"
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(labels / frames[0].name, os.O_WRONLY | os.O_NONBLOCK))
    [result] = results
    [error] = result.tables["errors"].to_pylist()
    assert (error["uri"], error["stage"]) == (uris[0], "gt")
    assert f"not a regular file (a FIFO): {labels / frames[0].name}" in error["message"]
    assert result.num_failed == 0 and result.num_not_evaluated == 1


def test_a_read_that_never_returns_times_out_into_a_read_error(espnet, corpus: Path):
    uris = [u for u in manifest_uris(str(corpus)) if u.endswith("png")][:3]
    stalled = uris[1]
    released = threading.Event()

    def fetch(uri: str) -> bytes:
        if uri == stalled:
            released.wait()  # an object store that accepted the request and went silent
        return read_bytes(uri)

    thread, results = _segment_in_background(
        model=espnet, uris=uris, run_id="r1", fetch=fetch, read_timeout=0.5, batch_size=2
    )
    try:
        thread.join(timeout=300)
        assert not thread.is_alive(), "the shard waited on the stalled read"
    finally:
        released.set()
    [result] = results
    [error] = result.tables["errors"].to_pylist()
    assert (error["uri"], error["stage"], error["error_type"]) == (stalled, "read", "TimeoutError")
    assert error["message"] == "reading timed out after 0.5 s"
    images = {row["uri"]: row["status"] for row in result.tables["images"].to_pylist()}
    assert images == {uris[0]: "ok", stalled: "error", uris[2]: "ok"}


def test_reads_reuse_their_threads_and_a_stalled_one_is_replaced(espnet, corpus: Path):
    """Starting a thread a read held the GIL more than the reading; a stalled read keeps its
    thread, and the reads after it get another."""
    frames = [u for u in manifest_uris(str(corpus)) if u.endswith("png")][:4]
    uris = [frames[i % 4] for i in range(32)]
    released = threading.Event()
    readers: set[threading.Thread] = set()
    reads = iter(range(len(uris)))

    def fetch(uri: str) -> bytes:
        readers.add(threading.current_thread())
        if next(reads) == 5:  # the sixth read: an object store gone silent
            released.wait()
        return read_bytes(uri)

    try:
        result = segment_images(
            espnet, uris, run_id="r1", fetch=fetch, read_timeout=0.5, prefetch_threads=2
        )
    finally:
        released.set()
    statuses = [row["status"] for row in result.tables["images"].to_pylist()]
    assert statuses.count("error") == 1 and len(statuses) == len(uris)
    # Two reads at a time, and one thread left behind by the stall: far fewer than 32 reads.
    assert len(readers) <= 2 + 1 + 2


def test_a_read_timeout_must_be_positive(espnet):
    with pytest.raises(ValueError, match="read_timeout must be positive"):
        segment_images(espnet, [], run_id="r1", read_timeout=0)


def test_host_work_of_a_batch_runs_beside_the_next_forward_pass(espnet, frames):
    """Batch 1's host work ends by calling on_progress, which here waits (up to 60 s) to see
    batch 2's forward pass begin: beside the model it does at once; in a serial shard it
    cannot, and the wait runs out."""
    forwards, second_forward = [], threading.Event()

    class Recorder:  # segflow's model protocol, over ESPNet
        name, task, classes = espnet.name, espnet.task, espnet.classes

        def predict(self, images):
            forwards.append(len(images))
            if len(forwards) == 2:
                second_forward.set()
            return espnet.predict(images)

    seen = []

    def on_progress() -> None:
        if not seen:
            seen.append(second_forward.wait(timeout=60))

    uris = [str(frame) for frame in frames[:4]]
    result = segment_images(Recorder(), uris, run_id="r1", batch_size=2, on_progress=on_progress)
    assert seen == [True], "batch 1's rows were made only after batch 2's forward pass"
    assert forwards == [2, 2]
    # The rows of the serial path, in its order.
    images = result.tables["images"].to_pylist()
    assert [row["uri"] for row in images] == uris
    assert all(row["status"] == "ok" for row in images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decoding_hands_the_model_images_already_on_its_device(shared, frames, tmp_path):
    from PIL import Image

    jpeg = tmp_path / "frame.jpg"
    Image.open(frames[0]).convert("RGB").save(jpeg, quality=90)
    espnet_on_gpu = load_model(str(shared / "models" / "espnet_camvid.pt2"), device="cuda")
    devices = []

    class Recorder:  # segflow's model protocol, over ESPNet on the GPU
        name, task, classes = espnet_on_gpu.name, espnet_on_gpu.task, espnet_on_gpu.classes

        def predict(self, images):
            devices.extend(image.device.type for image in images)
            return espnet_on_gpu.predict(images)

    uris = [str(jpeg), str(frames[1])]
    result = segment_images(Recorder(), uris, run_id="g", decode_device=torch.device("cuda"))
    assert devices == ["cuda", "cuda"]
    assert [row["status"] for row in result.tables["images"].to_pylist()] == ["ok", "ok"]
