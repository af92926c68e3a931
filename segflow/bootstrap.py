"""Confidence intervals for a run's dataset figures, and paired comparisons of two runs, by an
image-level bootstrap over the per-image state the workers stored.

A dataset figure (mIoU, COCO AP, ...) is a function of the images evaluated; how much it would
move on another draw of images from the same population is estimated by recomputing it on
resamples of the images, each the run's images with repeats, reduced exactly as
:func:`segflow.evaluation.evaluate_run` reduces the run itself:

- Weights (the Poisson bootstrap): in replicate ``b``, image ``i`` counts ``w_bi`` times, with
  ``w_bi`` Poisson(1)-distributed, independently for each image and replicate: the inverse
  Poisson(1) distribution function at ``u = splitmix64(splitmix64(splitmix64(seed) ^ b) ^
  image_id) / 2**64``. A weight depends on nothing but (seed, replicate, image id): no sample
  is drawn or stored, a replicate is the same on any slice of the run, and two runs that
  scored the same image (the same URI, so the same ``image_id``) weight it alike, which
  pairs them. Unlike a multinomial resample, the number of images varies from replicate to
  replicate (by about its square root); for more than a few dozen images the intervals are
  the same.
- Semantic figures: per replicate, class and count of ``class_stats``
  (:data:`segflow.metrics.figures.INTEGER_SUMS`), the weighted
  sum over the images: the class totals of the resampled dataset, exactly (integers below
  2**53 summed in float64). They are summed as matrix products over blocks of images read in
  batches from DuckDB, so memory is bounded by the block, whatever the run's size. The
  figures come from :meth:`segflow.metrics.figures.ClassSums.figures`, the point estimate's
  own reduction, so every integer figure it computes (Trimap IoU included) has an interval.
- Instance figures: COCOeval on the resampled dataset, from the per-image records of the
  ``coco_*`` tables (never recomputing IoUs or matches: an image's copies match as it did),
  :meth:`segflow.metrics.instance.CocoEvaluator.compute_resampled`, equal to pycocotools'
  COCOeval on a dataset that holds each image ``w_bi`` times.
- Interval: the percentile bootstrap, the ``(1 - level) / 2`` and ``(1 + level) / 2``
  quantiles (numpy's linear interpolation) of the replicates' figures; replicates where the
  figure is undefined (no class with a union, ...) are left out, and with none left the
  interval is undefined (``None``).
- Paired comparison of ``current`` with ``baseline``: both restricted to the images both
  evaluated (by ``image_id``), the difference current − baseline per replicate, under the
  same weights; its interval. A drop is flagged when the whole interval is below 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from segflow.errors import SegflowError

# Floats in a block of weights (replicates x images): bounds the memory of a semantic bootstrap.
_BLOCK_ELEMENTS = 1 << 24
_MIX_ADD, _MIX_1, _MIX_2 = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
)


class BootstrapError(SegflowError, ValueError):
    """A bootstrap asked for with settings it cannot use; the message names the setting."""


@dataclass(frozen=True)
class Bootstrap:
    """How to bootstrap: ``level`` of the intervals, number of ``replicates``, ``seed``."""

    level: float = 0.95
    replicates: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.level, float | int) and 0 < self.level < 1):
            raise BootstrapError(f"--ci must be a level between 0 and 1, got {self.level!r}")
        if isinstance(self.replicates, bool) or not isinstance(self.replicates, int):
            raise BootstrapError(f"--bootstrap must be a whole number, got {self.replicates!r}")
        if self.replicates < 2:
            raise BootstrapError(f"--bootstrap needs at least 2 replicates, got {self.replicates}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise BootstrapError(f"--seed must be a whole number in [0, 2**64), got {self.seed!r}")

    def describe(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "replicates": self.replicates,
            "seed": self.seed,
            "method": "percentile; Poisson(1) image weights",
        }


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval; ``None`` bounds where the figure was undefined in every replicate."""

    low: float | None
    high: float | None

    def pair(self) -> list[float | None]:
        return [self.low, self.high]


def image_weights(image_ids: np.ndarray, replicates: np.ndarray, seed: int) -> np.ndarray:
    """(replicates, images) int64: how many times each image counts in each replicate."""
    with np.errstate(over="ignore"):
        keys = _mix(_mix(np.array([seed], np.uint64)) ^ replicates.astype(np.uint64))
        hashed = _mix(keys[:, None] ^ np.asarray(image_ids, np.int64).view(np.uint64)[None, :])
    # The weight of most hashes is that of their top bits; the few in a cell that a
    # threshold splits are looked up exactly.
    cell = hashed >> np.uint64(64 - _CELL_BITS)
    weights = _CELL_WEIGHT[cell].astype(np.int64)
    split = np.flatnonzero(_CELL_SPLIT[cell])
    weights.flat[split] = np.searchsorted(_POISSON_THRESHOLDS, hashed.flat[split], side="right")
    return weights


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function (wrapping uint64 arithmetic)."""
    z = z + _MIX_ADD
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def _poisson_thresholds() -> np.ndarray:
    """2**64 times the Poisson(1) distribution function at 0, 1, ...: a weight is the number
    of thresholds at or below the hash."""
    thresholds, cumulative, term, k = [], 0.0, math.exp(-1), 0
    while (threshold := int((cumulative + term) * 2**64)) < 2**64:
        thresholds.append(threshold)
        cumulative, k = cumulative + term, k + 1
        term /= k
    return np.array(thresholds, np.uint64)


_POISSON_THRESHOLDS = _poisson_thresholds()
_CELL_BITS = 20
_CELL_WEIGHT = np.searchsorted(
    _POISSON_THRESHOLDS,
    np.arange(1 << _CELL_BITS, dtype=np.uint64) << np.uint64(64 - _CELL_BITS),
    side="right",
).astype(np.uint8)
_CELL_SPLIT = np.zeros(1 << _CELL_BITS, bool)
_CELL_SPLIT[(_POISSON_THRESHOLDS >> np.uint64(64 - _CELL_BITS)).astype(np.int64)] = True


def figure_replicates(
    evaluation: Mapping[str, Any], db: duckdb.DuckDBPyConnection, bootstrap: Bootstrap
) -> dict[str, np.ndarray]:
    """Per headline figure (:func:`segflow.evaluation.headline_figures`' names), its value in
    each replicate, NaN where undefined, over the images of ``db``'s ``evaluated`` table (a
    connection of :func:`segflow.evaluation.select`'s) of a run whose ``evaluation.json`` is
    ``evaluation``."""
    from segflow.evaluation import headline_figures

    if evaluation["task"] == "semantic":
        results = (
            {"semantic": figures}
            for figures in _semantic_replicates(db, len(evaluation["classes"]), bootstrap)
        )
    else:
        results = (
            {"instance": {iou_type: {"stats": stats} for iou_type, stats in replicate.items()}}
            for replicate in _instance_replicates(evaluation, db, bootstrap)
        )
    rows = [headline_figures(result) for result in results]
    return {
        name: np.array([np.nan if row[name] is None else row[name] for row in rows])
        for name in rows[0]
    }


def intervals(replicates: Mapping[str, np.ndarray], level: float) -> dict[str, Interval]:
    """The percentile interval of each figure's replicates."""
    found = {}
    for name, values in replicates.items():
        defined = values[~np.isnan(values)]
        if not defined.size:
            found[name] = Interval(None, None)
            continue
        low, high = np.quantile(defined, [(1 - level) / 2, (1 + level) / 2])
        found[name] = Interval(float(low), float(high))
    return found


def _semantic_replicates(
    db: duckdb.DuckDBPyConnection, num_classes: int, bootstrap: Bootstrap
) -> Iterator[dict[str, Any]]:
    from segflow.metrics.figures import INTEGER_SUMS, ClassSums

    n_counts, replicates = len(INTEGER_SUMS), np.arange(bootstrap.replicates)
    totals = np.zeros((bootstrap.replicates, num_classes * n_counts))
    rows = max(1024, _BLOCK_ELEMENTS // bootstrap.replicates)
    reader = db.sql(
        "SELECT image_id, class_id, "
        + ", ".join(f'"{c}"' for c in INTEGER_SUMS)
        + " FROM class_stats SEMI JOIN evaluated USING (image_id)"
    ).to_arrow_reader(rows)
    for batch in reader:
        # A batch holds whole or partial images: the sums are linear, either adds up.
        ids, inverse = np.unique(batch.column("image_id").to_numpy(), return_inverse=True)
        cells = batch.column("class_id").to_numpy().astype(np.int64) * n_counts
        counts = np.zeros((len(ids), num_classes * n_counts))
        for c, name in enumerate(INTEGER_SUMS):
            # One row per image and class: no cell is written twice.
            counts[inverse, cells + c] = batch.column(name).to_numpy()
        totals += image_weights(ids, replicates, bootstrap.seed).astype(np.float64) @ counts
    totals = totals.reshape(bootstrap.replicates, num_classes, n_counts).astype(np.int64)
    for replicate in totals:
        yield ClassSums(**{name: replicate[:, c] for c, name in enumerate(INTEGER_SUMS)}).figures()


def _instance_replicates(
    evaluation: Mapping[str, Any], db: duckdb.DuckDBPyConnection, bootstrap: Bootstrap
) -> Iterator[dict[str, list[float]]]:
    from segflow.evaluation import coco_states
    from segflow.metrics.instance import CocoEvaluator

    states = coco_states(dict(evaluation), db)
    # compute_resampled's order of the images, the same in every IoU type's state: by
    # ascending ground-truth id.
    images = next(iter(states.values()))["images"]
    run_image_ids = images["run_image_id"][np.argsort(images["image_id"])]
    streams = [
        (
            iou_type,
            CocoEvaluator.from_state(state).compute_resampled(
                image_weights(run_image_ids, np.array([b]), bootstrap.seed)[0]
                for b in range(bootstrap.replicates)
            ),
        )
        for iou_type, state in states.items()
    ]
    for _ in range(bootstrap.replicates):
        yield {iou_type: [float(v) for v in next(stream).stats] for iou_type, stream in streams}


@dataclass(frozen=True)
class Change:
    """A figure of ``current`` minus the same of ``baseline``, over the images both evaluated:
    the difference and its paired bootstrap interval."""

    difference: float | None
    interval: Interval

    @property
    def dropped(self) -> bool:
        """The whole interval is below 0 (every figure here is better when higher)."""
        return self.interval.high is not None and self.interval.high < 0


@dataclass(frozen=True)
class Comparison:
    """:func:`compare_runs`' answer: how many images both runs evaluated, and per headline
    figure its :class:`Change`."""

    shared_images: int
    changes: dict[str, Change]


def compare_runs(
    current: str,
    baseline: str,
    bootstrap: Bootstrap,
    *,
    where: str | None = None,
    baseline_where: str | None = None,
) -> Comparison:
    """``current`` (the images ``where`` selects, all by default) against ``baseline`` (those
    ``baseline_where`` selects), on the images both evaluated, by a paired bootstrap."""
    from segflow.evaluation import (
        EvaluationError,
        evaluated_figures,
        headline_figures,
        open_run,
        select,
    )

    runs = {"current": open_run(current), "baseline": open_run(baseline)}
    connections = {name: run.connect() for name, run in runs.items()}
    select(runs["current"], connections["current"], where)
    select(runs["baseline"], connections["baseline"], baseline_where)
    scored = {
        name: (run.evaluation["task"], run.evaluation["classes"], run.evaluation.get("categories"))
        for name, run in runs.items()
    }
    if scored["current"] != scored["baseline"]:
        raise EvaluationError(
            f"{runs['current'].uri} and {runs['baseline'].uri} do not score the same classes "
            "or task: their figures are not comparable"
        )
    evaluated = {
        name: db.sql("SELECT * FROM evaluated ORDER BY image_id").to_arrow_table()
        for name, db in connections.items()
    }
    shared = {
        "current": shared_images(evaluated["current"], evaluated["baseline"]),
        "baseline": shared_images(evaluated["baseline"], evaluated["current"]),
    }
    if not shared["current"].num_rows:
        raise EvaluationError(
            f"{runs['current'].uri} and {runs['baseline'].uri} evaluated no image in common"
        )
    figures, replicates = {}, {}
    for name, db in connections.items():
        db.execute("DROP TABLE evaluated")
        db.register("evaluated", shared[name])
        figures[name] = headline_figures(evaluated_figures(runs[name], db))
        replicates[name] = figure_replicates(runs[name].evaluation, db, bootstrap)
    differences = {
        figure: replicates["current"][figure] - replicates["baseline"][figure]
        for figure in figures["current"]
    }
    found = intervals(differences, bootstrap.level)
    changes = {}
    for figure, interval in found.items():
        now, before = figures["current"][figure], figures["baseline"][figure]
        difference = None if now is None or before is None else now - before
        changes[figure] = Change(difference, interval)
    for db in connections.values():
        db.close()
    return Comparison(shared["current"].num_rows, changes)


def shared_images(first: pa.Table, second: pa.Table) -> pa.Table:
    """The rows of ``first`` whose ``image_id`` ``second`` has too."""
    keep = np.isin(first.column("image_id").to_numpy(), second.column("image_id").to_numpy())
    return first.filter(pa.array(keep))
