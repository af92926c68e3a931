"""A run's dataset figures, from its Parquet alone, for all its images or any slice of them.

The workers left integer state per image (``class_stats``) and COCOeval's per-image records
(``coco_detections``, ``coco_ground_truth``); see :mod:`segflow.schema`. Evaluating a run, or
the images that an SQL predicate over its ``images`` table selects, sums or pools that state
— in DuckDB, over the metric rows only, never the masks — so the figures are those of
evaluating the same images from scratch, to the last bit:

- semantic: the figures of :mod:`segflow.metrics.figures` (mIoU, pixel accuracy, mean class
  accuracy, fwIoU, mDice, Boundary IoU, Trimap IoU; soft IoU and Dice in both forms where the
  run computed them) from the summed counts (a dataset confusion matrix's margins, the
  regions' counts), never a mean of per-image figures; a class absent from both ground truth
  and predictions is undefined (``None``), not 0;
- instance: COCO mAP for ``segm`` and ``bbox`` with
  :class:`~segflow.metrics.instance.CocoEvaluator`, identical to pycocotools' COCOeval.

Only committed shards count (:mod:`segflow.store`), so an interrupted run is evaluated over
what it finished, each image once.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from segflow import schema
from segflow.errors import SegflowError
from segflow.metrics.figures import INTEGER_SUMS, SOFT_SUMS, ClassSums, figures_in
from segflow.metrics.instance import STAT_NAMES, CocoEvaluator, CocoScores
from segflow.sql import lock_down, predicate_problem, select_where
from segflow.store import RunStore


class EvaluationError(SegflowError, ValueError):
    """A run that cannot be evaluated as asked; the message names the run and the reason."""


@dataclass(frozen=True)
class Run:
    """A finished or partial run, read back from its output folder.

    Every reader of a run's tables goes through :meth:`dataset`: a pyarrow dataset over
    exactly the committed shards' files of one table, read lazily (a scan reads the columns
    and rows it needs, one file at a time), so a run of a million images is queried without
    holding its tables in memory. :meth:`connect` gives DuckDB a view of each."""

    store: RunStore
    evaluation: dict[str, Any] | None

    @property
    def uri(self) -> str:
        return self.store.uri

    def dataset(self, name: str, shards: Collection[int] | None = None) -> ds.Dataset:
        """Table ``name`` over the committed shards (no rows when there are none), with the
        schema of :data:`segflow.schema.TABLES`; ``shards``: those the caller listed already,
        so that the tables it reads together are of the same shards while a run commits."""
        if shards is None:
            shards = self.store.committed()
        files = [self.store.path(name, f"shard-{index:06d}.parquet") for index in sorted(shards)]
        return ds.dataset(
            files, schema=schema.TABLES[name], format="parquet", filesystem=self._filesystem()
        )

    def table(
        self, name: str, columns: Sequence[str] | None = None, filter: pc.Expression | None = None
    ) -> pa.Table:
        """The rows of table ``name`` that ``filter`` keeps (all of them by default), in
        memory: for a table's few columns or rows; :meth:`dataset` to scan a whole one."""
        return self.dataset(name).to_table(columns=columns, filter=filter)

    def connect(self, *, allow_external: bool = False) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with a view of each of the run's tables
        (:meth:`dataset`: DuckDB scans them with projection and filter pushdown) and the
        session time zone UTC, the zone of the run's timestamps. It reads nothing but those
        views (:func:`segflow.sql.lock_down`) unless ``allow_external``."""
        db = duckdb.connect()
        db.execute("SET TimeZone = 'UTC'")
        # Its bar goes to stdout on a slow query, into `segflow query --format json|csv`.
        db.execute("SET enable_progress_bar = false")
        shards = self.store.committed()
        for name in schema.TABLES:
            db.register(name, self.dataset(name, shards))
        if not allow_external:
            lock_down(db)
        return db

    def _filesystem(self) -> pafs.FileSystem:
        # Local runs through Arrow's own file system: read in Arrow's threads, without the GIL.
        if isinstance(self.store.fs, LocalFileSystem):
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.store.fs))


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


def evaluate_run(
    location: str, *, where: str | None = None, latest: bool = False
) -> dict[str, Any]:
    """The run's figures as one JSON-ready object: ``semantic`` or ``instance`` as the run's
    model is, plus the counts of images selected and evaluated (see :func:`open_run` for
    ``location`` and ``latest``)."""
    run = open_run(location, latest=latest)
    db, selected, evaluated = _select(run, where)
    result: dict[str, Any] = {
        "run": run.uri,
        "where": where,
        "images": {"selected": selected, "evaluated": evaluated},
    }
    if run.evaluation["task"] == "semantic":
        result["semantic"] = _semantic(run, db)
    else:
        categories = {int(k): v for k, v in run.evaluation["categories"].items()}
        result["instance"] = {
            iou_type: {
                "stats": [float(v) for v in scores.stats],
                "stat_names": list(STAT_NAMES),
                "per_class_ap": {
                    categories[c]: _number(ap, undefined=-1)
                    for c, ap in zip(scores.categories, scores.per_class_ap, strict=True)
                },
            }
            for iou_type, scores in _coco_scores(run, db).items()
        }
    return result


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
    db, _, _ = _select(run, where)
    return _coco_scores(run, db)


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


def _select(run: Run, where: str | None) -> tuple[duckdb.DuckDBPyConnection, int, int]:
    """The run's connection (:meth:`Run.connect`, locked) holding also, as ``evaluated``, the
    ids and ground truth of the images ``where`` selects that were segmented and evaluated;
    how many images ``where`` selects, and how many of them were evaluated."""
    if run.evaluation is None:
        raise EvaluationError(
            f"{run.uri} was segmented without ground truth: rerun segment with --gt to evaluate it"
        )
    selection = check_where(where) if where else "SELECT * FROM images"
    db = run.connect()
    try:
        evaluated = db.sql(
            f"SELECT image_id, gt_uri FROM ({selection}) "
            "WHERE status = 'ok' AND gt_uri IS NOT NULL ORDER BY image_id"
        ).to_arrow_table()
        [(selected,)] = db.sql(f"SELECT count(*) FROM ({selection})").fetchall()
    except duckdb.Error as exc:
        raise EvaluationError(f"--where {where!r} is not a predicate over images: {exc}") from None
    db.register("evaluated", evaluated)
    return db, selected, evaluated.num_rows


def headline_figures(result: dict[str, Any]) -> dict[str, float | None]:
    """The dataset-level figures of :func:`evaluate_run`'s result, flat and named
    (``semantic/miou``, ``segm/AP50``, ...): what is tracked from one evaluation to the next."""
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


def _semantic(run: Run, db: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The figures of :class:`~segflow.metrics.figures.ClassSums` over the selected images'
    ``class_stats`` (summed by class in DuckDB: integers exactly; the soft sums, floats, to
    rounding), with the confusion matrix and the classes' pixel counts."""
    classes = run.evaluation["classes"]
    # A run written before a column existed reads it as null: its figure is undefined.
    sums = db.sql(
        "SELECT class_id, "
        + ", ".join(f"coalesce(sum({c}), 0)::BIGINT AS {c}" for c in INTEGER_SUMS)
        + ", "
        + ", ".join(f"sum({c}) AS {c}" for c in SOFT_SUMS)
        + " FROM class_stats SEMI JOIN evaluated USING (image_id) GROUP BY class_id"
    ).fetchnumpy()
    rows = {
        name: np.ma.filled(np.ma.asarray(values, dtype=np.float64), np.nan)
        if name in SOFT_SUMS
        else values
        for name, values in sums.items()
    }
    totals = ClassSums.of_rows(rows, len(classes))
    cells = db.sql(
        "SELECT gt_class, pred_class, sum(pixels)::BIGINT AS pixels FROM confusion "
        "SEMI JOIN evaluated USING (image_id) GROUP BY ALL"
    ).fetchnumpy()
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
    from segflow.groundtruth import coco_image_id
    from segflow.scoring import IOU_TYPES

    categories = sorted(int(c) for c in run.evaluation["categories"])
    gt_sources = db.sql("SELECT gt_uri FROM evaluated").fetchnumpy()["gt_uri"]
    # COCOeval's image ids, in whose order it pools detections of equal score.
    images = {"image_id": np.array([coco_image_id(s) for s in gt_sources], np.int64)}
    scores = {}
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
        state = {"iou_type": iou_type, "categories": categories, "images": images, **tables}
        scores[iou_type] = CocoEvaluator.from_state(state).compute()
    return scores


def coco_results_of_run(location: str) -> list[dict[str, Any]]:
    """A run's detections as COCO results (what pycocotools' ``loadRes`` reads), with the
    ground truth's image and category ids when the run was evaluated against COCO ground
    truth, segflow's image ids and class ids otherwise.

    Each result has the detector's ``bbox`` and the mask. pycocotools, given results with
    boxes, takes a box's area for the area ranges of ``segm`` too: drop the boxes (as
    detectron2 does, and as ``segflow evaluate`` does for ``segm``) to score masks by their
    own area.
    """
    from segflow.coco_results import coco_results_from_masks
    from segflow.groundtruth import coco_image_id

    run = open_run(location)
    masks = run.table("masks")
    if masks.num_rows and masks.column("instance").null_count:
        raise EvaluationError(f"{run.uri} is a semantic run: COCO results are detections")
    image_ids = category_ids = None
    if run.evaluation is not None and run.evaluation["task"] == "instance":
        images = run.table("images", ["image_id", "gt_uri"]).filter(pc.is_valid(pc.field("gt_uri")))
        image_ids = {
            image_id: coco_image_id(source)
            for image_id, source in zip(
                images.column("image_id").to_pylist(),
                images.column("gt_uri").to_pylist(),
                strict=True,
            )
        }
        masks = masks.filter(pc.is_in(masks.column("image_id"), pa.array(list(image_ids))))
        category_ids = {name: int(i) for i, name in run.evaluation["categories"].items()}
        masks = masks.filter(
            pc.is_in(masks.column("class_name"), pa.array(list(category_ids), pa.string()))
        )
    return coco_results_from_masks(masks, image_ids=image_ids, category_ids=category_ids)


def _number(value: float, undefined: float | None = None) -> float | None:
    """JSON has no NaN: an undefined figure is ``None``."""
    value = float(value)
    return None if math.isnan(value) or value == undefined else value
