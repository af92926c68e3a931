"""Manifests from folders, globs, object stores and manifest files, listed a page at a time;
deterministic shards, read by row range."""

from __future__ import annotations

import itertools
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segflow import manifest
from segflow.manifest import (
    IMAGE_SUFFIXES,
    ManifestError,
    ManifestReader,
    Shard,
    build_manifest,
    shards,
)
from tests.conftest import manifest_uris


def listed_by_find(location: str) -> list[str]:
    """A folder's manifest as it was made before listings came in pages: fsspec's ``find``,
    filtered and sorted in Python."""
    fs, path = fsspec.core.url_to_fs(location)
    found = fs.find(path)
    return sorted(fs.unstrip_protocol(p) for p in found if p.lower().endswith(IMAGE_SUFFIXES))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "Tile 1"
    (root / "images").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "c.tif", "notes.txt"):
        (root / "images" / name).write_bytes(b"x")
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A few thousand images in nested folders whose names sort differently as names and as
    paths ("a" < "a.png" < "a/..."), some not ASCII, a symlinked folder and other files."""
    root = tmp_path / "corpus"
    for i in range(3000):
        folder = root / f"a{i % 7}" / ("é" if i % 3 else "z") / ("a" * (i % 2))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}{IMAGE_SUFFIXES[i // 7 % 7]}").write_bytes(b"")
    (root / "a1.png").write_bytes(b"")
    (root / "a1.txt").write_bytes(b"")
    (root / "linked").symlink_to(root / "a2")  # listed as a file, as find does, not followed
    return root


def test_folder_is_listed_recursively_sorted_and_filtered(folder: Path):
    uris = manifest_uris(str(folder))
    assert [u.rsplit("/", 1)[1] for u in uris] == ["a.JPG", "b.png", "c.tif"]
    assert all(u.startswith("file://") and "Tile 1" in u for u in uris)
    assert manifest_uris(f"file://{folder}") == uris


def test_a_large_folder_listed_in_pages_is_the_listing_find_gives(corpus: Path):
    expected = listed_by_find(str(corpus))
    assert len(expected) == 3001
    assert manifest_uris(str(corpus), page_size=100) == expected


def test_glob_selects(folder: Path, corpus: Path):
    uris = manifest_uris(str(folder / "images" / "*.png"))
    assert [u.rsplit("/", 1)[1] for u in uris] == ["b.png"]
    fs = fsspec.filesystem("file")
    for pattern in (f"{corpus}/a[12]/é/*.jpg", f"{corpus}/**/a/*.png", f"{corpus}/a?.png"):
        expected = sorted(fs.unstrip_protocol(p) for p in fs.glob(pattern) if fs.isfile(p))
        assert manifest_uris(pattern, page_size=50) == expected, pattern
        assert expected


@pytest.mark.parametrize("kind", ["txt", "csv", "parquet"])
def test_manifest_files_keep_their_order(tmp_path: Path, kind: str, monkeypatch):
    monkeypatch.setattr(manifest, "ROW_GROUP_ROWS", 1000)
    # Enough lines to span several of the reads a large manifest file is read in.
    uris = ["s3://bucket/z.png", "s3://bucket/a.png", "/data/m.jpg"] + [
        f"s3://bucket/{'long-prefix/' * 4}{i:07d}.jpg" for i in reversed(range(90_000))
    ]
    path = tmp_path / f"list.{kind}"
    if kind == "txt":
        path.write_text("# a comment\n" + "\n".join(uris) + "\n\n")
    elif kind == "csv":
        path.write_text("uri,split\n" + "".join(f"{u},val\n" for u in uris))
    else:
        pq.write_table(pa.table({"uri": uris}), path, row_group_size=7000)
    assert manifest_uris(str(path)) == uris


def test_bad_inputs_name_the_input_and_the_problem(tmp_path: Path, folder: Path):
    def fails(location: Path, match: str) -> None:
        with pytest.raises(ManifestError, match=match):
            manifest_uris(str(location))

    fails(tmp_path / "missing", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "holds no images")
    no_uri = tmp_path / "m.csv"
    no_uri.write_text("path\n/a.png\n")
    fails(no_uri, r"no 'uri' column \(columns: \['path'\]\)")
    pq.write_table(pa.table({"path": ["/a.png"]}), tmp_path / "m.parquet")
    fails(tmp_path / "m.parquet", "no 'uri' column")
    dup = tmp_path / "d.txt"
    dup.write_text("/a.png\n/b.png\n/a.png\n/b.png\n/a.png\n/c.png\n")
    fails(dup, r"lists 3 uri\(s\) more than once \(e.g. '/a.png'\)")
    blank = tmp_path / "blank.csv"
    blank.write_text("uri,split\n/a.png,val\n,val\n")
    fails(blank, r"has 1 empty uri\(s\)")
    pq.write_table(pa.table({"uri": ["/a.png", None, ""]}), tmp_path / "null.parquet")
    fails(tmp_path / "null.parquet", r"has 2 empty uri\(s\)")
    (tmp_path / "comments.txt").write_text("# nothing here\n\n")
    fails(tmp_path / "comments.txt", "lists no images")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    fails(tmp_path / "bad.parquet", "cannot be read")


@pytest.mark.integration
def test_s3_prefix_listed_in_pages_and_missing_credentials(s3_env, monkeypatch, folder: Path):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("manifest-test")
    fs.put(str(folder / "images"), "manifest-test/in put", recursive=True)
    assert manifest_uris("s3://manifest-test/in put") == [
        "s3://manifest-test/in put/a.JPG",
        "s3://manifest-test/in put/b.png",
        "s3://manifest-test/in put/c.tif",
    ]
    objects = {
        f"manifest-test/paged/{'é' if i % 3 else 'a'}/{i % 5}/{i:04d}{IMAGE_SUFFIXES[i % 7]}": b""
        for i in range(120)
    }
    fs.pipe(objects | {"manifest-test/paged/a/": b"", "manifest-test/paged/x.txt": b""})
    fs.invalidate_cache()
    expected = listed_by_find("s3://manifest-test/paged")
    assert len(expected) == 120
    assert manifest_uris("s3://manifest-test/paged", page_size=7) == expected
    assert manifest_uris("s3://manifest-test/paged/*/[12]/*.png", page_size=7) == sorted(
        fs.unstrip_protocol(p) for p in fs.glob("manifest-test/paged/*/[12]/*.png")
    )

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3 = fsspec.get_filesystem_class("s3")
    s3.clear_instance_cache()
    try:
        with pytest.raises(ManifestError, match="NoCredentialsError"):
            manifest_uris("s3://manifest-test/in put")
    finally:
        s3.clear_instance_cache()  # later tests must not get this credential-less instance


def test_shards_are_deterministic_slices():
    assert list(shards(7, 3)) == [Shard(0, 0, 3), Shard(1, 3, 6), Shard(2, 6, 7)]
    assert list(shards(0, 3)) == []
    assert Shard(12, 0, 1).name == "shard-000012"
    with pytest.raises(ValueError, match="at least 1"):
        list(shards(5, 0))


def test_shards_read_by_row_range_are_slices_of_the_manifest(
    tmp_path: Path, corpus: Path, monkeypatch
):
    monkeypatch.setattr(manifest, "ROW_GROUP_ROWS", 100)
    dest = tmp_path / "manifest.parquet"
    build_manifest(str(corpus), str(dest))
    whole = pq.read_table(dest).column("uri").to_pylist()
    # Row groups of any size (a run planned by an older segflow wrote one) read the same.
    uneven = tmp_path / "uneven.parquet"
    pq.write_table(pq.read_table(dest), uneven, row_group_size=333)
    for path in (dest, uneven):
        with ManifestReader(open(path, "rb")) as reader:
            assert len(reader) == len(whole)
            for size in (1, 64, 100, 256, 1000, len(whole)):
                read = [reader.uris(shard) for shard in shards(len(whole), size)]
                assert list(itertools.chain(*read)) == whole
            assert reader.uris(Shard(0, 99, 201)) == whole[99:201]
            assert reader.uris(Shard(3, 2990, 3001)) == whole[2990:3001]
