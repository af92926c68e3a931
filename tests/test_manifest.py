"""Manifests from folders, globs, object stores and manifest files; deterministic shards."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segflow.manifest import ManifestError, Shard, build_manifest, shards


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "Tile 1"
    (root / "images").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "c.tif", "notes.txt"):
        (root / "images" / name).write_bytes(b"x")
    return root


def test_folder_is_listed_recursively_sorted_and_filtered(folder: Path):
    uris = build_manifest(str(folder)).to_pylist()
    assert [u.rsplit("/", 1)[1] for u in uris] == ["a.JPG", "b.png", "c.tif"]
    assert all(u.startswith("file://") and "Tile 1" in u for u in uris)
    assert build_manifest(f"file://{folder}").to_pylist() == uris


def test_glob_selects(folder: Path):
    uris = build_manifest(str(folder / "images" / "*.png")).to_pylist()
    assert [u.rsplit("/", 1)[1] for u in uris] == ["b.png"]


@pytest.mark.parametrize("kind", ["txt", "csv", "parquet"])
def test_manifest_files_keep_their_order(tmp_path: Path, kind: str):
    uris = ["s3://bucket/z.png", "s3://bucket/a.png", "/data/m.jpg"]
    path = tmp_path / f"list.{kind}"
    if kind == "txt":
        path.write_text("# a comment\n" + "\n".join(uris) + "\n\n")
    elif kind == "csv":
        path.write_text("uri,split\n" + "".join(f"{u},val\n" for u in uris))
    else:
        pq.write_table(pa.table({"uri": uris}), path)
    assert build_manifest(str(path)).to_pylist() == uris


def test_bad_inputs_name_the_input_and_the_problem(tmp_path: Path, folder: Path):
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="holds no images"):
        build_manifest(str(empty))
    no_uri = tmp_path / "m.csv"
    no_uri.write_text("path\n/a.png\n")
    with pytest.raises(ManifestError, match="no 'uri' column"):
        build_manifest(str(no_uri))
    dup = tmp_path / "d.txt"
    dup.write_text("/a.png\n/a.png\n")
    with pytest.raises(ManifestError, match="more than once"):
        build_manifest(str(dup))


@pytest.mark.integration
def test_s3_prefix_and_missing_credentials(s3_env, monkeypatch, folder: Path):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("manifest-test")
    fs.put(str(folder / "images"), "manifest-test/in put", recursive=True)
    uris = build_manifest("s3://manifest-test/in put").to_pylist()
    assert uris == [
        "s3://manifest-test/in put/a.JPG",
        "s3://manifest-test/in put/b.png",
        "s3://manifest-test/in put/c.tif",
    ]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    fsspec.filesystem("s3").clear_instance_cache()
    with pytest.raises(ManifestError, match="NoCredentialsError"):
        build_manifest("s3://manifest-test/in put")


def test_shards_are_deterministic_slices():
    assert list(shards(7, 3)) == [Shard(0, 0, 3), Shard(1, 3, 6), Shard(2, 6, 7)]
    assert list(shards(0, 3)) == []
    assert Shard(12, 0, 1).name == "shard-000012"
    with pytest.raises(ValueError, match="at least 1"):
        list(shards(5, 0))
