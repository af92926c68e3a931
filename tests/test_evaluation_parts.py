"""Evaluation reads a run's metric tables a part of their files at a time (segflow.evaluation.
VIEW_PART_FILES): the figures are those of one scan, and of the counts summed from scratch."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from segflow import evaluation, schema
from segflow.evaluation import evaluate_run, in_parts, open_run
from segflow.manifest import Shard
from segflow.report import TIMED_STAGES, _timings_table
from segflow.store import RunStore
from tests.test_bootstrap import CLASSES, class_stats, population_counts, table_of, uris

IMAGES, SHARDS = 60, 12
TIMES = np.random.default_rng(6).gamma(2.0, 10.0, (len(TIMED_STAGES), IMAGES)).round(1)
MIOU = np.random.default_rng(7).integers(0, 20, IMAGES) / 20  # ties, broken by URI


def sharded_run(out: Path, counts: dict[str, np.ndarray]) -> str:
    """A finished semantic run of ``IMAGES`` images in ``SHARDS`` shards (a file a table
    each), its confusion cells ground-truth class -> the same class, its intersections."""
    store = RunStore(str(out), "parts")
    store.prepare({"input": "parts"})
    names = uris(IMAGES)
    ids = [schema.image_id_for(u) for u in names]
    images = table_of(
        "images",
        {
            "run_id": ["parts"] * IMAGES,
            "image_id": ids,
            "uri": names,
            "status": ["ok"] * IMAGES,
            "num_masks": [0] * IMAGES,
            "model": ["synthetic"] * IMAGES,
            "processed_at": [datetime.now(UTC)] * IMAGES,
            "gt_uri": [u.replace("frames", "labels") for u in names],
            **{f"{stage}_ms": TIMES[i] for i, stage in enumerate(TIMED_STAGES)},
            "miou": MIOU,
        },
        IMAGES,
    )
    stats = class_stats("parts", counts)
    image, klass = np.nonzero(counts["intersection"])
    confusion = table_of(
        "confusion",
        {
            "run_id": ["parts"] * len(image),
            "image_id": np.array(ids)[image],
            "gt_class": klass.astype(np.int32),
            "pred_class": klass.astype(np.int32),
            "pixels": counts["intersection"][image, klass],
        },
        len(image),
    )
    per_shard = IMAGES // SHARDS
    for index in range(SHARDS):
        mine = set(ids[index * per_shard : (index + 1) * per_shard])
        tables = {name: fields.empty_table() for name, fields in schema.TABLES.items()}
        for name, table in (("images", images), ("class_stats", stats), ("confusion", confusion)):
            keep = np.isin(table.column("image_id").to_numpy(), list(mine))
            tables[name] = table.filter(keep)
        summary = {"shard": index, "images": per_shard, "failed": 0, "not_evaluated": 0}
        start = index * per_shard
        store.commit_shard(Shard(index, start, start + per_shard), tables, summary)
    store.write_json(
        "evaluation.json",
        {"task": "semantic", "classes": CLASSES, "gt": "masks:/data/labels", "ignore_index": None},
    )
    store.finish({"images": IMAGES, "failed": 0, "not_evaluated": 0, "masks": 0})
    return store.uri


@pytest.mark.parametrize(
    "where",
    [None, "image_id % 3 = 0", "image_id IN (SELECT image_id FROM class_stats WHERE class_id = 2)"],
    ids=["all", "slice", "subquery"],
)
def test_figures_read_a_few_files_at_a_time_are_those_of_one_scan(tmp_path, monkeypatch, where):
    counts = population_counts(np.random.default_rng(5), IMAGES)
    run = sharded_run(tmp_path / "out", counts)
    assert len(RunStore(str(tmp_path / "out"), "parts").files("class_stats")) == SHARDS
    whole = evaluate_run(run, where=where)
    monkeypatch.setattr(evaluation, "VIEW_PART_FILES", 5)  # 12 files a table: 3 parts
    in_parts = evaluate_run(run, where=where)
    assert in_parts == whole

    ids = np.array([schema.image_id_for(u) for u in uris(IMAGES)])
    selected = {
        None: np.ones(IMAGES, bool),
        "image_id % 3 = 0": ids % 3 == 0,
        "subquery": (counts["gt_pixels"][:, 2] > 0) | (counts["pred_pixels"][:, 2] > 0),
    }[where if where is None or "%" in where else "subquery"]
    assert whole["images"] == {"selected": int(selected.sum()), "evaluated": int(selected.sum())}
    semantic = whole["semantic"]
    assert semantic["gt_pixels"] == counts["gt_pixels"][selected].sum(axis=0).tolist()
    assert semantic["pred_pixels"] == counts["pred_pixels"][selected].sum(axis=0).tolist()
    assert np.diag(semantic["confusion"]).tolist() == (
        counts["intersection"][selected].sum(axis=0).tolist()
    )


def test_the_reports_timings_and_ranking_read_a_few_files_at_a_time(tmp_path, monkeypatch):
    counts = population_counts(np.random.default_rng(5), IMAGES)
    run = open_run(sharded_run(tmp_path / "out", counts))
    monkeypatch.setattr(evaluation, "VIEW_PART_FILES", 5)
    with run.connect() as db:
        html = _timings_table(db)
        ranked = in_parts(
            db,
            "images",
            "SELECT uri, miou FROM {rows} ORDER BY miou, uri LIMIT 7",
            "SELECT * FROM _partials ORDER BY miou, uri LIMIT 7",
        )
    for i, stage in enumerate(TIMED_STAGES):
        for name, value in (
            ("mean", TIMES[i].mean()),
            ("median", np.median(TIMES[i])),
            ("p95", np.percentile(TIMES[i], 95)),
        ):
            assert f'data-timing="{stage}-{name}">{value:.1f}<' in html
    expected = sorted(zip(MIOU.tolist(), uris(IMAGES), strict=True))[:7]
    assert list(zip(ranked["miou"].tolist(), ranked["uri"].tolist(), strict=True)) == expected
