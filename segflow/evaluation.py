"""A run's dataset figures, from its Parquet alone, for all its images or any slice of them.

The workers left integer state per image (``class_stats``) and COCOeval's per-image records
(``coco_detections``, ``coco_ground_truth``); see :mod:`segflow.schema`. Evaluating a run, or
the images that an SQL predicate over its ``images`` table selects, sums or pools that state
— in DuckDB, over the metric rows only, never the masks — so the figures are those of
evaluating the same images from scratch, to the last bit:

- semantic: the figures of :mod:`segflow.metrics.figures` (mIoU, pixel accuracy, mean class
  accuracy, fwIoU, mDice, Boundary IoU, Trimap IoU; soft IoU and Dice in both forms where the
  run computed them; Cityscapes' iIoU and category IoU/iIoU where the run had its instance
  files) from the summed counts (a dataset confusion matrix's margins, the
  regions' counts), never a mean of per-image figures; a class absent from both ground truth
  and predictions is undefined (``None``), not 0;
- instance: COCO mAP for ``segm`` and ``bbox`` with
  :class:`~segflow.metrics.instance.CocoEvaluator`, identical to pycocotools' COCOeval.

Only committed shards count (:mod:`segflow.store`), so an interrupted run is evaluated over
what it finished, each image once. The tables are read a few hundred files at a time
(:data:`VIEW_PART_FILES`), partial sums then summed, so that the memory of a run of millions
of images is that of one part of its files. Asked for, every headline figure also gets a bootstrap
interval from the same state and the same reductions (:mod:`segflow.bootstrap`).
"""

from __future__ import annotations

import itertools
import json
import math
import weakref
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import fsspec
import numpy as np
import pyarrow as pa

from segflow import schema
from segflow.errors import SegflowError
from segflow.metrics.instance import STAT_NAMES, CocoEvaluator, CocoScores
from segflow.sql import (
    TableFiles,
    expose_files,
    has_subquery,
    lock_down,
    predicate_problem,
    select_where,
    sql_list,
    tables_named,
)
from segflow.store import RunStore, shard_of_file

if TYPE_CHECKING:
    from segflow.bootstrap import Bootstrap


class EvaluationError(SegflowError, ValueError):
    """A run that cannot be evaluated as asked; the message names the run and the reason."""


@dataclass(frozen=True)
class Run:
    """A finished or partial run, read back from its output folder.

    Every reader of a run's tables goes through :meth:`connect`: DuckDB views over exactly
    the files :meth:`segflow.store.RunStore.files` lists, scanned with projection and filter
    pushdown as a query needs them, so a run of a million images is queried without holding
    its tables in memory."""

    store: RunStore
    evaluation: dict[str, Any] | None

    @property
    def uri(self) -> str:
        return self.store.uri

    def connect(
        self,
        *,
        allow_external: bool = False,
        tables: Collection[str] | None = None,
        only_selects: bool = False,
    ) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with a view of each of the run's tables (or of
        those of ``tables``: each table's log is read to list its files, so SQL that names a
        few needs only theirs), over the committed shards when it opens (a table without any
        has the schema of :data:`segflow.schema.TABLES` and no rows), and the session time
        zone UTC, the zone of the run's timestamps. It reads nothing but those views' files,
        and writes none (:func:`segflow.sql.lock_down`), unless ``allow_external``. With
        ``only_selects``, the caller runs nothing on it but segflow's own SQL and SELECT
        statements (:func:`segflow.sql.only_selects`): the views of a local run then read
        their files natively, not through Python (see :mod:`segflow.sql`)."""
        db = duckdb.connect()
        db.execute("SET TimeZone = 'UTC'")
        # Its bar goes to stdout on a slow query, into `segflow query --format json|csv`.
        db.execute("SET enable_progress_bar = false")
        # No cache of the files' footers: a run's thousands of shard files would hold them
        # all (1M images: 340 MB peak for one scan of masks, not 250); a second scan of a
        # table (evaluate's) reads its small footers again.
        db.execute("SET parquet_metadata_cache = false")
        listed = self.store.table_files(tables)
        parts = {
            _part(name, start // VIEW_PART_FILES): files[start : start + VIEW_PART_FILES]
            for name, files in listed.items()
            if name in READ_IN_PARTS
            for start in range(0, len(files), VIEW_PART_FILES)
        }
        exposed = expose_files(
            db, self.store.fs, listed | parts, natively=allow_external or only_selects
        )
        for name in listed:
            files = exposed[name]
            if files.files:
                db.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({files.source()})")
            else:
                # Not Schema.empty_table(): that imports pandas (a second, on every command).
                db.register(name, pa.Table.from_batches([], schema=schema.TABLES[name]))
        _VIEWS[db] = exposed
        if not allow_external:
            # A part's files are its table's: only its glob is more.
            readable = {name for files in exposed.values() for name in files.readable()}
            lock_down(db, sorted(readable))
        return db


# The files of each connection's views and of their parts (Run.connect's), which
# tables_of_images and part_rows read directly.
_VIEWS: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, dict[str, TableFiles]] = (
    weakref.WeakKeyDictionary()
)

# Files of a table that evaluate's and the report's scans read at once (:func:`part_rows`),
# one query a part. DuckDB keeps some state of every file a scan has read until the scan
# ends (about 4 KB a column: evaluate's sums read 15 columns of class_stats, 230 MB over a
# 1M-image run's 3,900 shard files), and a view that is a UNION ALL of parts runs them at once.
VIEW_PART_FILES = 256
# The tables read a part at a time; the others' files are exposed once (each name costs).
READ_IN_PARTS = frozenset({"images", "class_stats", "confusion"})


def _part(table: str, index: int) -> str:
    """The name under which :meth:`Run.connect` exposes a part of a table's files."""
    return f"{table}/part-{index}"


def _part_sources(db: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    """SQL naming the files of each part of a view :meth:`Run.connect` made (none for a
    table without files, or not of :data:`READ_IN_PARTS`)."""
    views = _VIEWS[db]
    return [
        views[_part(table, k)].source()
        for k in itertools.takewhile(lambda k: _part(table, k) in views, itertools.count())
    ]


def part_scans(db: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    """SQL naming the rows of each part of a view's files as ``table`` (the view itself for
    a table without parts)."""
    return [f"read_parquet({files}) AS {table}" for files in _part_sources(db, table)] or [table]


def part_rows(db: duckdb.DuckDBPyConnection, table: str, sql: str) -> pa.Table:
    """The rows of ``sql``, a query of ``{rows}`` (``table``'s), run on each part of the
    table's files (:data:`VIEW_PART_FILES`) one after another, so that DuckDB holds the
    state of one part's files at a time; in the parts' order."""
    return pa.concat_tables(
        db.sql(sql.format(rows=rows)).to_arrow_table() for rows in part_scans(db, table)
    )


def in_parts(
    db: duckdb.DuckDBPyConnection, table: str, partial: str, final: str
) -> dict[str, np.ndarray]:
    """``final``, a query of ``_partials``: the rows :func:`part_rows` of ``partial``, e.g.
    a sum of sums (the answer of ``partial`` over the whole table, to the floats' rounding)
    or the first rows of each part's first rows."""
    db.register("_partials", part_rows(db, table, partial))
    try:
        return db.sql(final).fetchnumpy()  # not pyarrow's to_numpy: that imports pandas
    finally:
        db.unregister("_partials")


def rows_of_images(db: duckdb.DuckDBPyConnection, table: str, image_ids: Sequence[int]) -> pa.Table:
    """The rows of ``table`` (a view :meth:`Run.connect` made) of a few images
    (:func:`tables_of_images`)."""
    return tables_of_images(db, [table], image_ids)[table]


def tables_of_images(
    db: duckdb.DuckDBPyConnection, tables: Sequence[str], image_ids: Sequence[int]
) -> dict[str, pa.Table]:
    """The rows of each of ``tables`` (views :meth:`Run.connect` made) of a few images,
    reading only the files that hold them. A filter over a whole view would decode every
    column of every file, and a run has thousands of shard files; but a shard file holds
    one shard, and the same shards are in every table: a scan of the ``image_id`` column
    of ``images`` alone (a row an image: the table of fewest rows) finds the images' shards,
    whose file is then read in each table. A compacted table's files hold every shard,
    sorted by ``image_id``: they are read with the filter, which skips every row group whose
    ``image_id`` range holds none of the images."""
    ids = ", ".join(str(int(i)) for i in image_ids) or "NULL"
    views = _VIEWS[db]
    images = views["images"].files
    in_images = [
        name for part in _part_sources(db, "images") for name in _files_holding(db, part, ids)
    ]
    # The images' shards are known when images is in shard files (not compacted).
    known = bool(images) and None not in {shard_of_file(name) for name in images}
    shards = {shard_of_file(name) for name in in_images}
    found = {}
    for table in tables:
        if table == "images":
            read = in_images
        else:
            files = views[table].files
            read = [name for name in files if shard_of_file(name) is None]
            sharded = [name for name in files if shard_of_file(name) is not None]
            if known:
                read += [name for name in sharded if shard_of_file(name) in shards]
            elif sharded:
                read += _files_holding(db, sql_list(sorted(sharded)), ids)
        found[table] = (
            db.sql(
                f"SELECT * FROM read_parquet({sql_list(sorted(read))}) WHERE image_id IN ({ids})"
            )
            if read
            else db.sql(f"SELECT * FROM {table} LIMIT 0")  # a table of no files: its schema
        ).to_arrow_table()
    return found


def _files_holding(db: duckdb.DuckDBPyConnection, files: str, ids: str) -> list[str]:
    """Those of ``files`` (SQL: a glob or a list) that hold a row of the images ``ids``
    (SQL), from a scan of their ``image_id`` column alone."""
    found = db.sql(
        f"SELECT DISTINCT filename FROM read_parquet({files}, filename = true) "
        f"WHERE image_id IN ({ids})"
    )
    return [name for (name,) in found.fetchall()]


def open_run(location: str, *, latest: bool = False) -> Run:
    """``OUT/run=<id>``, or ``OUT`` when it holds exactly one run — or, with ``latest``, the
    run of ``OUT`` that finished last (a scheduled evaluation of whatever ran last night)."""
    fs, root = fsspec.core.url_to_fs(location)
    root = root.rstrip("/")
    leaf = root.rsplit("/", 1)[-1]
    if leaf.startswith("run="):
        out, run_id = location.rstrip("/").rsplit("/", 1)[0], leaf.removeprefix("run=")
    else:
        pattern = "summary.json" if latest else "run.json"
        found = fs.glob(f"{root}/run=*/{pattern}")
        if latest and found:
            found = [max(found, key=fs.modified)]
        if len(found) != 1:
            names = ", ".join(sorted(p.rsplit("/", 2)[-2] for p in found)) or "none"
            wanted = "a finished run" if latest else "one run folder (run=<id>)"
            raise EvaluationError(f"{location}: expected {wanted} in it, found {names}")
        out, run_id = location, found[0].rsplit("/", 2)[-2].removeprefix("run=")
    store = RunStore(out, run_id)
    if not store.exists():
        raise EvaluationError(f"{location}: not a segflow run (no run.json)")
    return Run(store, store.read_json("evaluation.json"))


@dataclass(frozen=True)
class RunEvaluation:
    """What evaluating a run (or a slice) gives: ``result``, the JSON-ready object of
    :func:`evaluate_run`, and for an instance run COCOeval's pooled results per IoU type
    (``scores``; see :func:`instance_scores`), empty for a semantic run."""

    result: dict[str, Any]
    scores: dict[str, CocoScores]


def evaluate_run(
    location: str,
    *,
    where: str | None = None,
    latest: bool = False,
    bootstrap: Bootstrap | None = None,
) -> dict[str, Any]:
    """The run's figures as one JSON-ready object: ``semantic`` or ``instance`` as the run's
    model is, plus the counts of images selected and evaluated (see :func:`open_run` for
    ``location`` and ``latest``); with ``bootstrap``, also ``intervals``: per headline figure
    (:func:`headline_figures`) its ``[low, high]`` (:mod:`segflow.bootstrap`)."""
    run = open_run(location, latest=latest)
    with run.connect(tables=evaluated_tables(run, where), only_selects=True) as db:
        return evaluate(run, db, where, bootstrap=bootstrap).result


# What evaluating a run reads, by its task: images (to select), then the metric rows.
_METRIC_TABLES = {
    "semantic": ("class_stats", "confusion"),
    "instance": ("coco_detections", "coco_ground_truth"),
}


def evaluated_tables(run: Run, where: str | None) -> set[str] | None:
    """The tables :func:`evaluate` reads of ``run``, ``where``'s subqueries' included (None:
    every table, for a run :func:`select` refuses)."""
    if run.evaluation is None:
        return None
    named = tables_named(select_where(where, "images"), schema.TABLES) if where else set()
    return {"images", *_METRIC_TABLES[run.evaluation["task"]], *named}


def instance_scores(location: str, *, where: str | None = None) -> dict[str, CocoScores]:
    """COCOeval's pooled results over an instance run's evaluated images (or a slice), per
    IoU type (``segm``, ``bbox``): what :func:`evaluate_run` summarises, with the precision a
    PR curve reads, ``precision[t, :, k, 0, -1]`` (IoU threshold t, category k, area ``all``,
    100 detections) at :data:`~segflow.metrics.instance.RECALL_THRESHOLDS`. Categories are the
    ground truth's ids, which the run's ``evaluation["categories"]`` names."""
    run = open_run(location)
    if run.evaluation is None or run.evaluation["task"] != "instance":
        raise EvaluationError(
            f"{run.uri} is not an instance run segmented with ground truth (--gt coco:FILE)"
        )
    with run.connect(only_selects=True) as db:
        return evaluate(run, db, where).scores


def evaluate(
    run: Run,
    db: duckdb.DuckDBPyConnection,
    where: str | None = None,
    *,
    bootstrap: Bootstrap | None = None,
) -> RunEvaluation:
    """:func:`evaluate_run` on a connection :meth:`Run.connect` opened (which then holds the
    images evaluated, as ``evaluated``), for a caller that reads the run further."""
    selected, evaluated = select(run, db, where)
    result: dict[str, Any] = {
        "run": run.uri,
        "where": where,
        "images": {"selected": selected, "evaluated": evaluated},
    }
    if run.evaluation["task"] == "semantic":
        # Every image of the run evaluated: the metric rows are all theirs (the views are of
        # the same shards), so they are summed without the join that would select them.
        every_image = where is None and selected == evaluated
        result["semantic"], scores = _semantic(run, db, every_image), {}
    else:
        scores = _coco_scores(run, db)
        result["instance"] = instance_figures(run, scores)
    if bootstrap is not None:
        from segflow.bootstrap import figure_replicates, intervals

        found = intervals(figure_replicates(run.evaluation, db, bootstrap), bootstrap.level)
        result["bootstrap"] = bootstrap.describe()
        result["intervals"] = {name: interval.pair() for name, interval in found.items()}
    return RunEvaluation(result, scores)


def evaluated_figures(run: Run, db: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """``semantic`` or ``instance``: the figures of the images of ``db``'s ``evaluated``
    table (made by :func:`select`)."""
    if run.evaluation["task"] == "semantic":
        return {"semantic": _semantic(run, db)}
    return {"instance": instance_figures(run, _coco_scores(run, db))}


def instance_figures(run: Run, scores: dict[str, CocoScores]) -> dict[str, Any]:
    categories = {int(k): v for k, v in run.evaluation["categories"].items()}
    return {
        iou_type: {
            "stats": [float(v) for v in pooled.stats],
            "stat_names": list(STAT_NAMES),
            "per_class_ap": {
                categories[c]: _number(ap, undefined=-1)
                for c, ap in zip(pooled.categories, pooled.per_class_ap, strict=True)
            },
        }
        for iou_type, pooled in scores.items()
    }


def check_where(where: str) -> str:
    """The statement that selects the images ``where`` selects, once :mod:`segflow.sql`
    finds ``where`` to be one expression over ``images`` (its subqueries reading the run's
    tables only); an :class:`EvaluationError` naming what it refused otherwise."""
    problem = predicate_problem(where, "images", schema.TABLES)
    if problem is not None:
        raise EvaluationError(
            f"--where must be one boolean expression over images' columns; {problem}"
        )
    return select_where(where, "images")


def select(run: Run, db: duckdb.DuckDBPyConnection, where: str | None) -> tuple[int, int]:
    """Make ``evaluated`` in ``db``: the ids (and, for instance runs, the ground truth) of
    the images ``where`` selects that were segmented and evaluated, by id; how many images
    ``where`` selects, and how many of them were evaluated."""
    if run.evaluation is None:
        raise EvaluationError(
            f"{run.uri} was segmented without ground truth: rerun segment with --gt to evaluate it"
        )
    if where:
        check_where(where)
    evaluable = "status = 'ok' AND gt_uri IS NOT NULL"
    # Only COCOeval's image ids need the ground truth's URIs: a semantic run keeps ids alone.
    columns = "image_id" if run.evaluation["task"] == "semantic" else "image_id, gt_uri"
    # One scan of images, a part of its files at a time (part_scans), but for a predicate with
    # a subquery, which would run once a part: the selection's ids and whether each is
    # evaluated, kept.
    scans = ["images"] if where and has_subquery(where, "images") else part_scans(db, "images")
    try:
        for i, rows in enumerate(scans):
            selection = select_where(where, rows) if where else f"SELECT * FROM {rows}"
            into = "CREATE TEMP TABLE selected AS" if i == 0 else "INSERT INTO selected"
            db.execute(f"{into} SELECT {columns}, ({evaluable}) AS evaluable FROM ({selection})")
    except duckdb.Error as exc:
        raise EvaluationError(f"--where {where!r} is not a predicate over images: {exc}") from None
    [(selected, evaluated)] = db.sql(
        "SELECT count(*), count(*) FILTER (evaluable) FROM selected"
    ).fetchall()
    db.execute(f"CREATE TEMP TABLE evaluated AS SELECT {columns} FROM selected WHERE evaluable")
    db.execute("DROP TABLE selected")
    return selected, evaluated


def headline_figures(result: dict[str, Any]) -> dict[str, float | None]:
    """The dataset-level figures of :func:`evaluate_run`'s result, flat and named
    (``semantic/miou``, ``segm/AP50``, ...): what is tracked from one evaluation to the next."""
    from segflow.metrics.figures import figures_in

    figures: dict[str, float | None] = {}
    if "semantic" in result:
        semantic = result["semantic"]
        figures |= {f"semantic/{f.name}": semantic[f.name] for f in figures_in(semantic)}
    for iou_type, scores in result.get("instance", {}).items():
        figures |= {
            f"{iou_type}/{name}": _number(value, undefined=-1)
            for name, value in zip(STAT_NAMES, scores["stats"], strict=True)
        }
    return figures


def _semantic(run: Run, db: duckdb.DuckDBPyConnection, every_image: bool = False) -> dict[str, Any]:
    """The figures of :class:`~segflow.metrics.figures.ClassSums` over the selected images'
    ``class_stats`` (all of its rows when ``every_image``: every image of the run is in
    ``evaluated``), summed by class in DuckDB (integers exactly; the soft sums, floats, to
    rounding), with the confusion matrix and the classes' pixel counts."""
    # Here, not at the top: `segflow query` and `show` start without the metrics.
    from segflow.metrics.figures import INSTANCE_SUMS, INTEGER_SUMS, SOFT_SUMS, ClassSums

    classes = run.evaluation["classes"]
    of_evaluated = "" if every_image else " SEMI JOIN evaluated USING (image_id)"
    # A run written before a column existed reads it as null: its figure is undefined.
    sums = in_parts(
        db,
        "class_stats",
        "SELECT class_id, "
        + ", ".join(f"sum({c})::BIGINT AS {c}" for c in INTEGER_SUMS)
        + ", "
        + ", ".join(f"sum({c}) AS {c}" for c in SOFT_SUMS + INSTANCE_SUMS)
        + f" FROM {{rows}}{of_evaluated} GROUP BY class_id",
        "SELECT class_id, "
        + ", ".join(f"coalesce(sum({c}), 0)::BIGINT AS {c}" for c in INTEGER_SUMS)
        + ", "
        + ", ".join(f"sum({c}) AS {c}" for c in SOFT_SUMS + INSTANCE_SUMS)
        + " FROM _partials GROUP BY class_id",
    )
    totals = ClassSums.of_rows(
        {name: np.ma.filled(np.ma.asarray(v, np.float64), np.nan) for name, v in sums.items()},
        len(classes),
    )
    cells = in_parts(
        db,
        "confusion",
        "SELECT gt_class, pred_class, sum(pixels)::BIGINT AS pixels "
        f"FROM {{rows}}{of_evaluated} GROUP BY ALL",
        "SELECT gt_class, pred_class, sum(pixels)::BIGINT AS pixels FROM _partials GROUP BY ALL",
    )
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    confusion[cells["gt_class"], cells["pred_class"]] = cells["pixels"]
    return totals.figures() | {
        "classes": classes,
        "trimap_width": run.evaluation.get("trimap_width"),
        "gt_pixels": totals.gt_pixels.tolist(),
        "pred_pixels": totals.pred_pixels.tolist(),
        "confusion": confusion.tolist(),  # [ground-truth class][predicted class], pixels
    }


def _coco_scores(run: Run, db: duckdb.DuckDBPyConnection) -> dict[str, CocoScores]:
    return {
        iou_type: CocoEvaluator.from_state(state).compute()
        for iou_type, state in coco_states(run.evaluation, db).items()
    }


def coco_states(
    evaluation: dict[str, Any], db: duckdb.DuckDBPyConnection
) -> dict[str, dict[str, Any]]:
    """Per IoU type, the :class:`CocoEvaluator` state of the images of ``evaluated`` (see
    :func:`select`), under the ground truth's image ids, with ``images`` also holding each
    image's segflow ``run_image_id`` (the order of both: ``evaluated``'s)."""
    from segflow.groundtruth import coco_image_id
    from segflow.scoring import IOU_TYPES

    categories = sorted(int(c) for c in evaluation["categories"])
    evaluated = db.sql("SELECT image_id, gt_uri FROM evaluated ORDER BY image_id").fetchnumpy()
    # COCOeval's image ids, in whose order it pools detections of equal score.
    images = {
        "image_id": np.array([coco_image_id(s) for s in evaluated["gt_uri"]], np.int64),
        "run_image_id": evaluated["image_id"],
    }
    states = {}
    for iou_type in IOU_TYPES:
        tables = {
            name: db.sql(
                "SELECT * EXCLUDE (run_id, iou_type, image_id, gt_image_id), "
                f"gt_image_id AS image_id FROM {table} "
                "SEMI JOIN evaluated USING (image_id) WHERE iou_type = $iou_type",
                params={"iou_type": iou_type},
            ).fetchnumpy()
            for name, table in (
                ("detections", "coco_detections"),
                ("ground_truth", "coco_ground_truth"),
            )
        }
        states[iou_type] = {
            "iou_type": iou_type,
            "categories": categories,
            "images": images,
            **tables,
        }
    return states


def coco_results_of_run(location: str) -> list[dict[str, Any]]:
    """A run's detections as COCO results (what pycocotools' ``loadRes`` reads), with the
    ground truth's image and category ids when the run was evaluated against COCO ground
    truth, segflow's image ids and class ids otherwise, in the masks' order: the list
    :func:`write_coco_results` writes.

    Each result has the detector's ``bbox`` and the mask. pycocotools, given results with
    boxes, takes a box's area for the area ranges of ``segm`` too: drop the boxes (as
    detectron2 does, and as ``segflow evaluate`` does for ``segm``) to score masks by their
    own area.
    """
    text = b"".join(_text(texts) for texts in _coco_result_texts(location))
    return json.loads(b"[" + text[1:] + b"]")


# Results a batch: the JSON text of one batch is in memory at a time.
COCO_RESULTS_BATCH = 20_000


def write_coco_results(location: str, out: str, *, batch: int = COCO_RESULTS_BATCH) -> int:
    """Write the run's detections (:func:`coco_results_of_run`) to ``out`` (a local path or
    fsspec URL) as one JSON list, and return how many. DuckDB makes each result's JSON text
    in one scan of the masks, about ``batch`` results at a time, and they are written as
    Arrow holds them: no Python object a result, and memory that of a batch however many
    masks the run has. Nothing is written when the run has no detections to give (a
    semantic run)."""
    batches = _coco_result_texts(location, batch)
    first = next(batches, pa.array([], pa.string()))  # the run is checked before out is opened
    written = 0
    with fsspec.open(out, "wb") as f:
        f.write(b"[")
        for texts in itertools.chain([first], batches):
            text = _text(texts)
            f.write(text if written else text[1:])  # each text begins with its comma
            written += len(texts)
        f.write(b"]")
    return written


def _text(texts: pa.StringArray) -> memoryview:
    """An Arrow string array's strings back to back, as it holds them (no copy)."""
    offset = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], offset)[texts.offset :][: len(texts) + 1]
    return memoryview(texts.buffers()[2] or b"")[offsets[0] : offsets[-1]] if len(texts) else b""


def _coco_result_texts(location: str, batch: int = COCO_RESULTS_BATCH) -> Iterator[pa.StringArray]:
    """The JSON texts of the run's COCO results, each after a comma, about ``batch`` at a
    time (see :func:`write_coco_results`)."""
    import pyarrow.compute as pc

    run = open_run(location)
    with run.connect(only_selects=True) as db:
        [(semantic, unscored)] = db.sql(
            "SELECT count(*) FILTER (instance IS NULL), count(*) FILTER (score IS NULL) FROM masks"
        ).fetchall()
        if semantic:
            raise EvaluationError(f"{run.uri} is a semantic run: COCO results are detections")
        if unscored:
            raise EvaluationError(f"{run.uri}: {unscored} detection(s) have no score")
        ids = _coco_ids(run, db)
        # By DuckDB, in a scan of the masks alone: a scan keeps the masks' order, a join
        # would not (COCOeval breaks ties of score by that order). With the ground truth's
        # ids, those are put in front here. The score as a double: a float32's shortest
        # text reads back as another number.
        fields = (
            "'score': score::DOUBLE, 'bbox': bbox, "
            "'segmentation': {'size': [height, width], 'counts': counts}"
        )
        if ids is None:
            text = f"',' || to_json({{'image_id': image_id, 'category_id': class_id, {fields}}})"
        else:
            text = f"substr(to_json({{{fields}}})::VARCHAR, 2)"  # less its "{"
        scanned = db.sql(f"SELECT image_id, class_name, {text} AS text FROM masks").to_arrow_reader(
            batch
        )
        for masks in _gathered(scanned, batch):
            texts = masks["text"]
            if ids is not None:
                image_id, category_id, kept = ids.of(masks["image_id"], masks["class_name"])
                texts = pc.binary_join_element_wise(
                    ',{"image_id":',
                    pc.cast(image_id, pa.string()),
                    ',"category_id":',
                    pc.cast(category_id, pa.string()),
                    ",",
                    texts.filter(kept),
                    "",
                )
            yield texts.combine_chunks()


def _gathered(batches: pa.RecordBatchReader, rows: int) -> Iterator[pa.Table]:
    """``batches`` (DuckDB streams a few thousand rows a batch) as tables of at least
    ``rows`` rows but the last: Arrow's calls then cost once per many rows."""
    gathered: list[pa.RecordBatch] = []
    for batch in batches:
        gathered.append(batch)
        if sum(b.num_rows for b in gathered) >= rows:
            yield pa.Table.from_batches(gathered)
            gathered = []
    if gathered:
        yield pa.Table.from_batches(gathered)


@dataclass(frozen=True)
class _CocoIds:
    """The ground truth's image ids of a run's images, by segflow image id (sorted), and its
    category ids by class name."""

    image_ids: np.ndarray
    coco_image_ids: np.ndarray
    class_names: pa.Array
    category_ids: pa.Array

    def of(
        self, image_ids: pa.ChunkedArray, class_names: pa.ChunkedArray
    ) -> tuple[pa.Array, pa.Array, pa.Array]:
        """Rows' ground-truth image and category ids, of the rows that have both, and which
        rows those are."""
        import pyarrow.compute as pc

        wanted = image_ids.to_numpy()
        at = np.minimum(np.searchsorted(self.image_ids, wanted), len(self.image_ids) - 1)
        found = self.image_ids[at] == wanted if len(self.image_ids) else np.zeros(len(wanted), bool)
        category = pc.take(self.category_ids, pc.index_in(class_names, value_set=self.class_names))
        kept = pc.and_(pa.array(found), pc.is_valid(category))
        coco = pa.array(self.coco_image_ids[at] if len(self.image_ids) else wanted, pa.int64())
        return coco.filter(kept), category.filter(kept), kept


def _coco_ids(run: Run, db: duckdb.DuckDBPyConnection) -> _CocoIds | None:
    """The ground truth's ids of an instance run evaluated against COCO; None for another
    run (its results keep segflow's image ids and class ids)."""
    from segflow.groundtruth import coco_image_id

    if run.evaluation is None or run.evaluation["task"] != "instance":
        return None
    sources = db.sql("SELECT DISTINCT gt_uri FROM images WHERE gt_uri IS NOT NULL").fetchall()
    uris = [uri for (uri,) in sources]
    db.register(
        "coco_images", pa.table({"gt_uri": uris, "coco_id": [coco_image_id(u) for u in uris]})
    )
    images = db.sql(
        "SELECT image_id, coco_id::BIGINT AS coco_id FROM images JOIN coco_images USING (gt_uri) "
        "ORDER BY image_id"
    ).fetchnumpy()
    db.unregister("coco_images")
    categories = {name: int(i) for i, name in run.evaluation["categories"].items()}
    return _CocoIds(
        np.asarray(images["image_id"]),
        np.asarray(images["coco_id"]),
        pa.array(list(categories), pa.string()),
        pa.array(list(categories.values()), pa.int64()),
    )


def _number(value: float, undefined: float | None = None) -> float | None:
    """JSON has no NaN: an undefined figure is ``None``."""
    value = float(value)
    return None if math.isnan(value) or value == undefined else value
