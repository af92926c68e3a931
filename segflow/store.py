"""A run's output folder on any fsspec store: its tables are Delta Lake tables.

Layout::

    OUT/run=<run id>/
        run.json                   what the run is: input, model and the options that
                                   change its output (checked on every resume)
        manifest.parquet           the image URIs, in manifest order (column ``uri``)
        masks/                     a Delta table (``_delta_log/``) of the run's masks; its
                                   data files are segflow Parquet (:func:`segflow.schema.
                                   write_table`), one per shard and attempt:
                                   ``shard-NNNNNN-<attempt>.parquet`` (:func:`data_file_name`)
        images/, errors/           likewise (``errors``: zero rows when nothing failed)
        class_stats/, confusion/, coco_detections/, coco_ground_truth/   per-image
                                   evaluation state (zero rows in a run without ground truth)
        shards/                    a Delta table, one row per committed shard: its index and
                                   summary (JSON); committed last, so a shard is "committed"
                                   once its row is there
        evaluation.json            what evaluation needs: the model's task and classes,
                                   the ground truth and its categories (runs with --gt)
        summary.json               the run summary, written when every shard is committed

Every table exists, empty, from :meth:`RunStore.prepare` on, so a reader of a fresh run
sees zero rows rather than an error. A table's log has a checkpoint every 100 commits, and
one of its last version once the run is finished (:meth:`RunStore.finish`) or compacted.

Commit protocol, so that every image lands exactly once whatever is killed when. An actor
writes a shard's files (:meth:`RunStore.write_shard`), each under a name of its own attempt,
so a retried shard never overwrites a file that a reader may be reading, and returns what it
wrote (:class:`ShardFiles`). The driver, the tables' single writer, commits them
(:meth:`RunStore.commit`): per table one Delta transaction that adds the shard's file and
records the application transaction ``segflow:<run id>:shard-NNNNNN``; a table that already
holds that transaction is skipped, so a duplicated commit, or one finishing a shard that a
crash left committed in some tables only, adds nothing twice. The ``shards`` row comes last.
Files that no commit added (a killed attempt's) are in no table: Delta readers never see
them, and vacuum (:meth:`RunStore.compact`) removes them.

Any reader that reads Delta sees, in each table, every shard whole or not at all (Polars
``scan_delta``, ``deltalake``, Spark with Delta); :meth:`RunStore.files` lists the files of
exactly the committed shards, the same shards in every table, for plain Parquet readers
(DuckDB ``read_parquet([...])``, pyarrow, Spark's ``read.parquet``). Never glob a table's
folder: it may hold a killed attempt's file, or files a compaction replaced.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa

from segflow import schema
from segflow.errors import INCOMPLETE, SegflowError

if TYPE_CHECKING:
    from segflow.manifest import ManifestReader, Shard

SHARDS_TABLE = "shards"
SHARDS = pa.schema(
    [
        pa.field("shard", pa.int64(), nullable=False),
        pa.field("summary", pa.string(), nullable=False),  # the shard summary, JSON
    ]
)

# Delta's default (7 days): a reader that listed a table's files before a compaction keeps
# reading them for this long.
DEFAULT_RETAIN_HOURS = 168
DEFAULT_TARGET_SIZE = 256 * 2**20

# A checkpoint every 100 commits (delta-rs writes them as part of a commit), so listing a
# table's files replays at most 100 JSON commits on top of one Parquet checkpoint.
TABLE_CONFIGURATION = {"delta.checkpointInterval": "100"}

_DATA_FILE = re.compile(r"(shard-\d{6,})-([0-9a-f]{8})\.parquet")


class RunStoreError(SegflowError, ValueError):
    """The output cannot hold the run: a bad run id, a path that is a file, a missing bucket."""


class RunConflictError(SegflowError, ValueError):
    """The output folder already holds a run whose configuration differs."""


class RunNotFinishedError(SegflowError, ValueError):
    """An operation that needs a finished run (compaction) asked of an unfinished one."""


class CompactionError(SegflowError, RuntimeError):
    """A table that could not be rewritten (nothing of it was committed): rerunning the
    compaction compacts it and the tables after it."""

    exit_status = INCOMPLETE


def parse_size(text: str) -> int:
    """Bytes of a size such as ``256MB``, ``1GB``, ``64MiB`` or ``1000000``."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not found:
        raise RunStoreError(f"size {text!r}: expected a number of bytes, e.g. 256MB or 1GB")
    number, unit = float(found.group(1)), found.group(2).upper().rstrip("B").rstrip("I")
    size = int(number * 1024 ** "_KMGT".index(unit or "_"))
    if size <= 0:
        raise RunStoreError(f"size {text!r}: must be more than 0 bytes")
    return size


def data_file_name(shard: Shard) -> str:
    """A new name for one attempt's data file of ``shard`` (in any table)."""
    return f"{shard.name}-{uuid.uuid4().hex[:8]}.parquet"


def shard_of_file(path: str) -> int | None:
    """The shard index of a data file :func:`data_file_name` named; None for another file
    (one a compaction wrote, holding rows of every shard)."""
    found = _DATA_FILE.fullmatch(path.rsplit("/", 1)[-1])
    return int(found.group(1).removeprefix("shard-")) if found else None


@dataclass(frozen=True)
class DataFile:
    """One data file an actor wrote into a table's folder, with what Delta's add action
    records of it."""

    table: str
    path: str  # relative to the table's folder
    size: int
    rows: int
    modified_ms: int
    stats: str  # Delta's per-file statistics (JSON): rows, image_id's range

    @classmethod
    def written(
        cls, table: str, path: str, size: int, rows: int, image_ids: tuple[int, int] | None
    ) -> DataFile:
        """A file written now, of ``rows`` rows whose lowest and highest ``image_id`` are
        ``image_ids`` (None when it has no rows)."""
        stats: dict[str, Any] = {"numRecords": rows}
        if image_ids is not None:
            stats |= {
                "minValues": {"image_id": image_ids[0]},
                "maxValues": {"image_id": image_ids[1]},
                "nullCount": {"image_id": 0},
            }
        return cls(table, path, size, rows, int(time.time() * 1000), json.dumps(stats))

    def add_action(self, data_change: bool = True) -> Any:
        """Delta's action adding the file; without ``data_change``, one that rewrites rows
        the table holds already (a compaction's)."""
        from deltalake.transaction import AddAction

        return AddAction(self.path, self.size, {}, self.modified_ms, data_change, self.stats)


@dataclass(frozen=True)
class ShardFiles:
    """What :meth:`RunStore.write_shard` wrote of one shard, for :meth:`RunStore.commit`:
    a file for each table of :data:`segflow.schema.TABLES` and the ``shards`` row."""

    shard: int
    files: tuple[DataFile, ...]
    summary: Mapping[str, Any]


@dataclass(frozen=True)
class Compacted:
    """What :meth:`RunStore.compact` did to one table."""

    table: str
    files_before: int
    files_after: int
    files_removed: int  # by vacuum: replaced files older than the retention, and strays
    seconds: float


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
        """Create the run and its empty tables, or check that an existing one has the same
        ``config``.

        Returns True when the run already existed (a resume).
        """
        from deltalake import DeltaTable

        self.check(config)
        if self.exists():
            return True
        self.fs.makedirs(self.root, exist_ok=True)
        for name, table_schema in (*schema.TABLES.items(), (SHARDS_TABLE, SHARDS)):
            # "ignore": a table that a killed prepare created already stays as it is.
            DeltaTable.create(
                self.table_uri(name),
                table_schema,
                mode="ignore",
                configuration=TABLE_CONFIGURATION,
                storage_options=self.storage_options(),
            )
        # Last: a run is there once its tables are.
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
        from segflow.manifest import ManifestReader

        # Small blocks: a shard's read is one row group, not s3fs's default 50 MB read-ahead.
        return ManifestReader(self.fs.open(self.path("manifest.parquet"), "rb", block_size=1 << 20))

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        self._write_atomically(self.path(name), json.dumps(dict(data), indent=2, sort_keys=True))

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def write_parquet(self, name: str, table: pa.Table) -> None:
        self._write_atomically(self.path(name), _parquet_bytes(table).to_pybytes())

    def write_shard(
        self, shard: Shard, tables: Mapping[str, pa.Table], summary: Mapping[str, Any]
    ) -> ShardFiles:
        """Write a shard's file into each table's folder, and its ``shards`` row, committing
        nothing (:meth:`commit` does): what an actor does."""
        files = []
        for name in schema.TABLES:
            sink = pa.BufferOutputStream()
            schema.write_table(name, tables[name], sink)
            files.append(self._put_data_file(name, shard, sink.getvalue(), tables[name]))
        row = pa.table(
            {"shard": [shard.index], "summary": [json.dumps(dict(summary), sort_keys=True)]},
            schema=SHARDS,
        )
        files.append(self._put_data_file(SHARDS_TABLE, shard, _parquet_bytes(row), row))
        return ShardFiles(shard.index, tuple(files), dict(summary))

    def commit(self, written: ShardFiles) -> None:
        """Add a shard's files to the run's tables, one transaction per table, ``shards``
        last; a no-op in each table that holds the shard already (see the module's doc)."""
        data = [file for file in written.files if file.table != SHARDS_TABLE]
        [row] = [file for file in written.files if file.table == SHARDS_TABLE]
        # The tables' commits are independent: at once, as an object store's round trips
        # (a log listing, a conditional put) dominate each.
        with ThreadPoolExecutor(len(data)) as pool:
            list(pool.map(lambda file: self._commit_file(written.shard, file), data))
        self._commit_file(written.shard, row)

    def _commit_file(self, shard: int, file: DataFile) -> None:
        from deltalake import CommitProperties, Transaction

        app_id = f"segflow:{self.run_id}:shard-{shard:06d}"
        table = self._delta(file.table)
        if table.transaction_version(app_id) is not None:
            return
        table.create_write_transaction(
            [file.add_action()],
            mode="append",
            schema=SHARDS if file.table == SHARDS_TABLE else schema.TABLES[file.table],
            commit_properties=CommitProperties(app_transactions=[Transaction(app_id, 0)]),
        )

    def commit_shard(
        self, shard: Shard, tables: Mapping[str, pa.Table], summary: Mapping[str, Any]
    ) -> None:
        """Write and commit a shard in one process (:meth:`write_shard`, then :meth:`commit`)."""
        self.commit(self.write_shard(shard, tables, summary))

    def committed(self) -> set[int]:
        """Indexes of the committed shards: those of the ``shards`` table."""
        if not self._has_table(SHARDS_TABLE):
            return set()
        found = (shard_of_file(uri) for uri in self._delta(SHARDS_TABLE).file_uris())
        return {index for index in found if index is not None}

    def shard_summaries(self) -> list[dict[str, Any]]:
        """The committed shards' summaries, in shard order."""
        if not self._has_table(SHARDS_TABLE):
            return []
        rows = self._delta(SHARDS_TABLE).to_pyarrow_dataset().to_table()
        rows = rows.sort_by("shard")
        return [json.loads(summary) for summary in rows.column("summary").to_pylist()]

    def files(self, name: str, shards: Collection[int] | None = None) -> list[str]:
        """The data files of table ``name`` that hold exactly the committed shards (or
        ``shards``, a set the caller listed with :meth:`committed`, so that the tables it
        reads together are of the same shards while a run commits): local paths, or URIs
        (``s3://...``), for any Parquet reader. A compacted table's files hold every shard:
        it is read whole."""
        if name not in schema.TABLES:
            raise RunStoreError(f"unknown table {name!r}; a run has {sorted(schema.TABLES)}")
        committed = self.committed() if shards is None else None
        return self._files(name, committed if shards is None else set(shards), committed)

    def table_files(self, names: Collection[str] | None = None) -> dict[str, list[str]]:
        """Every table's :meth:`files` (or those of the tables ``names``), of the same
        committed shards, listed once (on an object store the tables' logs are read at once:
        each is a few requests; on a local disk one after another, as deltalake's allocator
        keeps what each listing freed: 1M images, 8 tables, 48 MB more at once). A finished
        run (``summary.json``) commits nothing more, and each of its tables holds every
        shard: their files are all of theirs, and the ``shards`` table's log (a commit a
        shard) is not read."""
        names = list(schema.TABLES) if names is None else [n for n in schema.TABLES if n in names]
        committed = None if self.fs.exists(self.path("summary.json")) else self.committed()
        at_once = len(names) if _is_object_store(self.fs) else 1
        with ThreadPoolExecutor(max(at_once, 1)) as pool:
            listed = pool.map(lambda name: self._files(name, committed, committed), names)
            return dict(zip(names, listed, strict=True))

    def _files(self, name: str, wanted: set[int] | None, committed: set[int] | None) -> list[str]:
        """Table ``name``'s files of the shards ``wanted`` (None: all its files)."""
        uris = self._delta(name).file_uris()
        if wanted is None:
            return sorted(uris)
        by_shard = {uri: shard_of_file(uri) for uri in uris}
        if None in by_shard.values() and wanted != (
            self.committed() if committed is None else committed
        ):
            raise RunStoreError(
                f"{self.uri}: table {name!r} is compacted (its files hold every shard), so "
                "it is read whole, not for some shards"
            )
        return sorted(uri for uri, index in by_shard.items() if index is None or index in wanted)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write the run summary: the run is finished. Its tables commit nothing more, so
        each first gets a checkpoint of its last version: a reader lists its files from that
        one Parquet file, not by replaying the commits since the interval's last checkpoint
        (1M images, 64 commits a table: listing 4 tables, 0.18 -> 0.09 s and 10 MB less)."""
        for name in schema.TABLES:
            self._delta(name).create_checkpoint()
        self.write_json("summary.json", summary)

    def compact(
        self, target_size: int = DEFAULT_TARGET_SIZE, retain_hours: float | None = None
    ) -> list[Compacted]:
        """Rewrite each table of a finished run into few files of about ``target_size``
        bytes, sorted by ``image_id`` (:func:`segflow.compaction.write_sorted`), committed
        in one Delta transaction per table that adds them and removes the files they
        replace, so a reader sees the old files or the new ones, and a compaction killed
        half-way leaves the old ones (rerun, it compacts the tables it had not; a table
        that holds no shard's file is compacted already). Then vacuum: files no table
        version newer than ``retain_hours`` needs (the replaced ones, a killed attempt's)
        are deleted; by default the tables' retention (:data:`DEFAULT_RETAIN_HOURS`), so a
        reader that listed them before keeps reading."""
        from deltalake import CommitProperties
        from deltalake.transaction import RemoveAction

        from segflow.compaction import write_sorted

        if self.read_json("summary.json") is None:
            raise RunNotFinishedError(
                f"{self.uri}: the run is not finished (no summary.json); compact it once "
                "its `segflow segment` command has committed every shard"
            )
        done = []
        for name in schema.TABLES:
            started = time.perf_counter()
            table = self._delta(name)
            replaced = pa.table(table.get_add_actions()).select(["path", "size_bytes"])
            paths = replaced.column("path").to_pylist()
            sizes = replaced.column("size_bytes").to_pylist()
            if any(shard_of_file(path) is not None for path in paths):
                try:
                    written = write_sorted(
                        self.fs, name, self.path(name), table.file_uris(), sum(sizes), target_size
                    )
                except Exception as error:
                    raise CompactionError(
                        f"{self.uri}: table {name!r} could not be compacted, and was left as "
                        f"it was: {error}"
                    ) from error
                now = int(time.time() * 1000)
                removes = [
                    RemoveAction(path, False, now, size)
                    for path, size in zip(paths, sizes, strict=True)
                ]
                table.create_write_transaction(
                    [file.add_action(data_change=False) for file in written] + removes,
                    mode="append",
                    schema=schema.TABLES[name],
                    commit_properties=CommitProperties(custom_metadata={"segflow": "compact"}),
                )
            removed = self._delta(name).vacuum(
                retention_hours=None if retain_hours is None else int(retain_hours),
                dry_run=False,
                full=True,  # also the files no commit ever added (a killed attempt's)
                # A retention shorter than the table's is the caller's explicit choice.
                enforce_retention_duration=retain_hours is None,
            )
            # Reloaded after each commit (the compaction's, vacuum's): vacuum's full mode
            # deletes every file the version it holds does not list, and the checkpoint is of
            # that version. As finish's: otherwise every reader replays the compaction's
            # commit of its thousands of removes (1M images, 3 tables: 0.14 -> 0.04 s, 14 MB).
            table = self._delta(name)
            table.create_checkpoint()
            after, seconds = len(table.file_uris()), time.perf_counter() - started
            done.append(Compacted(name, len(paths), after, len(removed), seconds))
        return done

    def _put_data_file(self, name: str, shard: Shard, blob: pa.Buffer, table: pa.Table) -> DataFile:
        import pyarrow.compute as pc  # a writer's: a reader of the tables starts without it

        relative = data_file_name(shard)
        # One put: on an object store the file appears whole or not at all; a local file
        # left half-written by a kill is in no table.
        self.fs.pipe_file(self.path(name, relative), blob.to_pybytes())
        image_ids = None
        if table.num_rows and "image_id" in table.schema.names:
            bounds = pc.min_max(table.column("image_id"))
            image_ids = (bounds["min"].as_py(), bounds["max"].as_py())
        return DataFile.written(name, relative, blob.size, table.num_rows, image_ids)

    def table_uri(self, name: str) -> str:
        """Where table ``name`` is, for Delta readers (``pl.scan_delta(store.table_uri(name),
        storage_options=store.storage_options())``, ``deltalake.DeltaTable``)."""
        path = self.path(name)
        return path if _is_local(self.fs) else self.fs.unstrip_protocol(path)

    def _has_table(self, name: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.table_uri(name), self.storage_options())

    def _delta(self, name: str) -> Any:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.table_uri(name), storage_options=self.storage_options())
        except TableNotFoundError:
            raise RunStoreError(
                f"{self.uri}: table {name!r} is not a Delta table (not a run, or one written by "
                "a segflow that wrote plain Parquet folders); segment it again"
            ) from None

    def storage_options(self) -> dict[str, str] | None:
        """delta-rs's options to reach the store (None: a local disk)."""
        return _delta_storage_options(self.fs)

    def _write_atomically(self, path: str, data: str | bytes) -> None:
        blob = data.encode() if isinstance(data, str) else data
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, blob)
        self.fs.mv(tmp, path)


def _delta_storage_options(fs: fsspec.AbstractFileSystem) -> dict[str, str] | None:
    """delta-rs's options for the store ``fs`` reaches: the s3fs endpoint, credentials and
    region (else the standard AWS variables, which delta-rs reads itself too)."""
    if not _is_s3(fs):
        return None
    client = getattr(fs, "client_kwargs", None) or {}
    endpoint = (
        client.get("endpoint_url")
        or getattr(fs, "endpoint_url", None)
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = client.get("region_name") or os.environ.get(
        "AWS_REGION", os.environ.get("AWS_DEFAULT_REGION")
    )
    options = {
        "AWS_ACCESS_KEY_ID": getattr(fs, "key", None) or os.environ.get("AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": getattr(fs, "secret", None)
        or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "AWS_SESSION_TOKEN": getattr(fs, "token", None) or os.environ.get("AWS_SESSION_TOKEN"),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": region,
        "AWS_ALLOW_HTTP": "true" if endpoint and endpoint.startswith("http://") else None,
    }
    return {key: value for key, value in options.items() if value}


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & {"s3", "s3a"})


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Stores of buckets and keys (s3, gcs, azure), where folders are only key prefixes."""
    return bool(_protocols(fs) & {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"})


def _parquet_bytes(table: pa.Table) -> pa.Buffer:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
