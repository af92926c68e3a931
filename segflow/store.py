"""A run's output folder on any fsspec store, and the shard commit protocol.

Layout::

    OUT/run=<run id>/
        run.json                   what the run is: input, model and the options that
                                   change its output (checked on every resume)
        manifest.parquet           the image URIs, in manifest order (column ``uri``)
        masks/shard-NNNNNN.parquet
        images/shard-NNNNNN.parquet
        errors/shard-NNNNNN.parquet    (zero rows when nothing failed)
        class_stats/, coco_detections/, coco_ground_truth/   per-image evaluation state
                                   (zero rows in a run without ground truth)
        evaluation.json            what evaluation needs: the model's task and classes,
                                   the ground truth and its categories (runs with --gt)
        _commits/shard-NNNNNN.json     the shard's summary; its presence means "committed"
        summary.json               the run summary, written when every shard is committed

Commit protocol, so that every image lands exactly once whatever is killed when: a shard's
tables are written under ``_tmp/`` and moved to their final names (a move is a rename
on local disks and a copy-then-delete on object stores, where an object appears whole or not
at all), and only then is the commit marker written. A shard without its marker is run again
and its files, whose names depend only on the shard index, are overwritten. Readers that
glob ``masks/*.parquet`` never see ``_tmp/`` (a separate folder) or ``_commits/`` (JSON).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Collection, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from segflow import schema
from segflow.errors import SegflowError
from segflow.manifest import ManifestReader, Shard


class RunStoreError(SegflowError, ValueError):
    """The output cannot hold the run: a bad run id, a path that is a file, a missing bucket."""


class RunConflictError(SegflowError, ValueError):
    """The output folder already holds a run whose configuration differs."""


class RunStore:
    def __init__(self, out: str, run_id: str) -> None:
        if not run_id or "/" in run_id or run_id.startswith((".", "_")):
            raise RunStoreError(f"run id {run_id!r} must be a plain name (no '/', not '.' or '_')")
        self.fs, root = fsspec.core.url_to_fs(out)
        self.run_id = run_id
        self.root = f"{root.rstrip('/')}/run={run_id}"

    @property
    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.root)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def exists(self) -> bool:
        return self.fs.exists(self.path("run.json"))

    def check(self, config: Mapping[str, Any]) -> None:
        """Fail, writing nothing, where the run cannot go here: the output is a file or lies
        under one, its bucket does not exist (never created: a typo would make a new one), or
        it already holds a run of another configuration."""
        if self.fs.exists(self.path("run.json")):
            existing = json.loads(self.fs.cat_file(self.path("run.json")))
            differences = {
                key: (existing.get(key), config.get(key))
                for key in sorted(set(existing) | set(config))
                if existing.get(key) != config.get(key)
            }
            if differences:
                described = "; ".join(
                    f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differences.items()
                )
                raise RunConflictError(
                    f"{self.uri} belongs to a run with another configuration ({described}); "
                    "choose another --run-id or --out"
                )
            return
        if _is_object_store(self.fs):
            bucket = self.root.split("/", 1)[0]
            if not self.fs.exists(bucket):
                raise RunStoreError(
                    f"output {self.uri}: bucket {bucket!r} does not exist (segflow does not "
                    "create buckets; create it, or check the name)"
                )
            return
        folder = self.root
        while folder and not self.fs.exists(folder):
            folder = folder.rpartition("/")[0]
        if folder and not self.fs.isdir(folder):
            raise RunStoreError(f"output {self.uri}: {folder} is a file, not a folder")

    def prepare(self, config: Mapping[str, Any]) -> bool:
        """Create the run, or check that an existing one has the same ``config``.

        Returns True when the run already existed (a resume).
        """
        self.check(config)
        if self.exists():
            return True
        self.fs.makedirs(self.root, exist_ok=True)
        self.write_json("run.json", config)
        return False

    def put_manifest(self, local_path: str) -> None:
        """Copy in the manifest :func:`segflow.manifest.build_manifest` wrote locally."""
        tmp = self.path(f".{uuid.uuid4().hex}.tmp")
        self.fs.put_file(local_path, tmp)
        self.fs.mv(tmp, self.path("manifest.parquet"))

    def has_manifest(self) -> bool:
        return self.fs.exists(self.path("manifest.parquet"))

    def open_manifest(self) -> ManifestReader:
        """The manifest, read a row range at a time (never whole: it may list millions)."""
        # Small blocks: a shard's read is one row group, not s3fs's default 50 MB read-ahead.
        return ManifestReader(self.fs.open(self.path("manifest.parquet"), "rb", block_size=1 << 20))

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        self._write_atomically(self.path(name), json.dumps(dict(data), indent=2, sort_keys=True))

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def write_parquet(self, name: str, table: pa.Table) -> None:
        self._write_atomically(self.path(name), _parquet_bytes(table))

    def committed(self) -> set[int]:
        """Indexes of the shards whose commit marker exists."""
        # Other processes commit shards: a cached listing (s3fs keeps one) would be stale.
        self.fs.invalidate_cache(self.path("_commits"))
        found = self.fs.glob(self.path("_commits", "shard-*.json"))
        return {int(p.rsplit("shard-", 1)[1].removesuffix(".json")) for p in found}

    def files(self, name: str, shards: Collection[int] | None = None) -> list[str]:
        """The data files of table ``name`` that readers see: the committed shards' (or those
        of ``shards``, indexes the caller read from :meth:`committed` already, so that the
        tables it reads together are of the same shards while a run commits), as full fsspec
        URLs (``file:///...``, ``s3://...``), in shard order."""
        if shards is None:
            shards = self.committed()
        folder = self.fs.unstrip_protocol(self.path(name))  # once: it costs, on local paths
        return [f"{folder}/shard-{index:06d}.parquet" for index in sorted(shards)]

    def commit_shard(
        self, shard: Shard, tables: Mapping[str, pa.Table], summary: Mapping[str, Any]
    ) -> None:
        staging = self.path("_tmp", uuid.uuid4().hex)
        self.fs.makedirs(staging, exist_ok=True)
        staged = []
        for name in schema.TABLES:
            tmp = f"{staging}/{name}.parquet"
            with self.fs.open(tmp, "wb") as f:
                schema.write_table(name, tables[name], f)
            staged.append((tmp, self.path(name, f"{shard.name}.parquet")))
        for tmp, final in staged:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(tmp, final)
        with contextlib.suppress(FileNotFoundError):  # object stores keep no empty folders
            self.fs.rm(staging, recursive=True)
        marker = self.path("_commits", f"{shard.name}.json")
        self._write_atomically(marker, json.dumps(dict(summary), sort_keys=True))

    def shard_summaries(self) -> list[dict[str, Any]]:
        self.fs.invalidate_cache(self.path("_commits"))
        paths = sorted(self.fs.glob(self.path("_commits", "shard-*.json")))
        return [json.loads(blob) for blob in self.fs.cat(paths).values()] if paths else []

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write the run summary and remove what killed attempts left in ``_tmp/``."""
        self.write_json("summary.json", summary)
        if self.fs.exists(self.path("_tmp")):
            self.fs.rm(self.path("_tmp"), recursive=True)

    def _write_atomically(self, path: str, data: str | bytes) -> None:
        blob = data.encode() if isinstance(data, str) else data
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, blob)
        self.fs.mv(tmp, path)


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Stores of buckets and keys (s3, gcs, azure), where folders are only key prefixes."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"})


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
