"""A run's report: one self-contained HTML page, for a person to look at.

The page needs nothing but itself: CSS inline, charts as inline SVG, images as base64 JPEGs,
no script at all, and a Content-Security-Policy that forbids scripts and every fetch but
``data:`` images, so it can be mailed or archived and opened anywhere. Every string that comes
from data (URIs, class names, error messages) is escaped where it is written into the page.

Sections: the run (its configuration, ``summary.json``'s counts and throughput, per-stage
timings from the ``images`` table), the evaluation (semantic: dataset figures, per-class IoU
bars, the row-normalised confusion matrix; instance: COCO figures and per-class
precision-recall curves), the worst images with prediction and ground truth overlaid side by
side, and the errors.

Worst images: semantic runs rank evaluated images by their ``images.miou``, lowest first.
Instance runs rank them by a per-image F1 of the ``segm`` records at IoU 0.5, area ``all``,
over the detections scoring at least :data:`INSTANCE_SCORE_THRESHOLD` (the ones drawn):
``2 TP / (TP + FP + objects)``, where a true positive is a detection matched to a counted
object, a false positive one matched to nothing (detections matched to crowd regions count
as neither, as in COCOeval) and ``objects`` the image's counted ground-truth objects. An
image with neither objects nor such detections has no F1 and is not ranked. Ties go by URI.
"""

from __future__ import annotations

import base64
import html
import io
import math
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import fsspec
import numpy as np
from PIL import Image

from segflow import palette, rle
from segflow.decode import decode_rgb
from segflow.evaluation import (
    Run,
    RunEvaluation,
    evaluate,
    evaluated_tables,
    open_run,
    part_rows,
    part_scans,
    rows_of_images,
)
from segflow.groundtruth import ModelClasses, annotation_mask, open_ground_truth
from segflow.metrics.figures import figures_in, format_figure
from segflow.metrics.instance import IOU_THRESHOLDS, RECALL_THRESHOLDS, STAT_NAMES, CocoScores

if TYPE_CHECKING:
    from segflow.bootstrap import Bootstrap

INSTANCE_SCORE_THRESHOLD = 0.5
ERROR_ROWS = 200  # errors listed one by one; the rest are counted by stage and type
THUMBNAIL_SIDE = 420  # longest side of an overlay, pixels
TIMED_STAGES = ("read", "decode", "infer", "encode")
SUMMARY_FIGURES = (
    ("images", "images"),
    ("failed", "failed"),
    ("not_evaluated", "not evaluated"),
    ("masks", "masks"),
    ("shards", "shards"),
    ("seconds", "seconds (last invocation)"),
    ("images_per_second", "images / second (last invocation)"),
)

_FILL_ALPHA = 0.5
_EDGE_ALPHA = 0.6

PAGE = string.Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>segflow report: run $run_id</title>
<style>$css</style>
</head>
<body>
<h1>segflow report: run <code>$run_id</code></h1>
$sections
</body>
</html>
"""
)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2433;
       margin: 24px auto; max-width: 1240px; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #d6dae3;
     padding-bottom: 4px; margin-top: 32px; }
code, .uri { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px;
             overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eceef3; text-align: left;
         vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.columns { display: flex; flex-wrap: wrap; gap: 32px; align-items: flex-start; }
.note { color: #5b6475; }
svg text { font: 11px system-ui, sans-serif; fill: #1d2433; }
svg .axis { stroke: #9aa3b5; fill: none; }
.curves { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr));
          gap: 8px; }
.worst { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr));
         gap: 16px; }
figure { margin: 0; padding: 8px; border: 1px solid #d6dae3; border-radius: 6px; }
figure .pair { display: flex; gap: 6px; }
figure .pair div { flex: 1; min-width: 0; }
figure img { width: 100%; height: auto; display: block; }
figure .label { font-size: 12px; color: #5b6475; }
.legend span { display: inline-block; margin: 2px 10px 2px 0; font-size: 12px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px;
            vertical-align: -2px; border-radius: 2px; }
tr.error-row td { font-size: 12px; }
td.time { white-space: nowrap; }
"""


def render_report(location: str, *, worst: int = 12, bootstrap: Bootstrap | None = None) -> str:
    """The report of the run at ``location`` (see :func:`segflow.evaluation.open_run`) as one
    HTML page, with the ``worst`` lowest-scoring images drawn; with ``bootstrap``, each
    dataset figure with its interval (:mod:`segflow.bootstrap`) beside it."""
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise ValueError(f"worst must be a whole number >= 0, got {worst!r}")
    run = open_run(location)
    # What the sections read, not every table: each listed is a log read, and a view over a
    # file a shard (a semantic run's coco_* tables too, empty).
    tables = {"images", "masks", "errors", *(evaluated_tables(run, None) or ())}
    with run.connect(tables=tables, only_selects=True) as db:
        sections = _sections(run, db, worst, bootstrap)
    return PAGE.substitute(
        run_id=_e(run.store.run_id), css=CSS, sections="\n".join(s for s in sections if s)
    )


def _sections(
    run: Run, db: duckdb.DuckDBPyConnection, worst: int, bootstrap: Bootstrap | None
) -> list[str]:
    sections = [_run_section(run, db)]
    evaluation = run.evaluation
    if evaluation is None:
        sections.append(
            _section(
                "Evaluation",
                '<p class="note">Segmented without ground truth (no <code>--gt</code>): '
                "no figures, no worst images.</p>",
            )
        )
    elif evaluation["task"] == "semantic":
        sections += [
            _semantic_section(evaluate(run, db, bootstrap=bootstrap).result),
            _worst_section(_worst_semantic(run, db, worst), evaluation["classes"], worst),
        ]
    else:
        sections += [
            _instance_section(run, evaluate(run, db, bootstrap=bootstrap)),
            _worst_section(_worst_instance(run, db, worst), evaluation["classes"], worst),
        ]
    sections.append(_errors_section(db))
    return sections


# --------------------------------------------------------------------------------------------
# Markup helpers. Every value from data goes through _e.


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _section(title: str, body: str, section_id: str = "") -> str:
    anchor = f' id="{_e(section_id)}"' if section_id else ""
    return f"<section{anchor}>\n<h2>{_e(title)}</h2>\n{body}\n</section>"


def _figure(value: float | None, digits: int = 3) -> str:
    return format_figure(value, digits)


def _interval(result: Mapping[str, Any], figure: str, digits: int = 3) -> str:
    """`` [low, high]`` of the figure's bootstrap interval, when the result has one (plain
    text: numbers only)."""
    if figure not in result.get("intervals", {}):
        return ""
    low, high = result["intervals"][figure]
    return f" [{_figure(low, digits)}, {_figure(high, digits)}]"


def _count(value: float | int) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}"


def _key_value_table(
    rows: Iterable[tuple[str, str, str]], css_class: str, cell_class: str = "number"
) -> str:
    """Rows of (label, value, data key); the data key marks the cell for readers of the DOM."""
    body = "".join(
        f'<tr><th>{_e(label)}</th><td class="{cell_class}" data-figure="{_e(key)}">'
        f"{_e(value)}</td></tr>"
        for label, value, key in rows
    )
    return f'<table class="{css_class}">{body}</table>'


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


# --------------------------------------------------------------------------------------------
# The run.


def _run_section(run: Run, db: duckdb.DuckDBPyConnection) -> str:
    config = run.store.read_json("run.json") or {}
    summary = run.store.read_json("summary.json")
    described = [
        ("run", run.uri, "run"),
        ("input", config.get("input", "?"), "input"),
        ("model", config.get("model", "?"), "model"),
        ("ground truth", run.evaluation["gt"] if run.evaluation else "none", "gt"),
        ("shard size", config.get("shard_size", "?"), "shard_size"),
    ]
    if summary is None:
        committed = run.store.shard_summaries()
        note = (
            f'<p class="note">No summary.json: the run has not finished. Counts are those of '
            f"its {len(committed)} committed shard(s).</p>"
        )
        summary = {
            key: sum(s[key] for s in committed)
            for key in ("images", "failed", "not_evaluated", "masks")
        }
    else:
        note = (
            '<p class="note">Seconds and images per second are those of the last '
            "<code>segment</code> invocation (a resumed run counts only what it ran).</p>"
        )
    counts = [
        (label, _count(summary[key]), key) for key, label in SUMMARY_FIGURES if key in summary
    ]
    body = (
        _key_value_table(described, "run-config", "text")
        + '<div class="columns">'
        + _key_value_table(counts, "summary")
        + _timings_table(db)
        + "</div>"
        + note
    )
    return _section("Run", body, "run")


def _timings_table(db: duckdb.DuckDBPyConnection) -> str:
    # The stages' times a part of the files at a time, as numbers (8 bytes an image and stage),
    # for numpy's mean and linearly interpolated median and 95th percentile.
    columns = ", ".join(f"{stage}_ms" for stage in TIMED_STAGES)
    # numpy from DuckDB (pyarrow's to_numpy would import pandas: 40 MB).
    times = [
        db.sql(f"SELECT {columns} FROM {rows}").fetchnumpy() for rows in part_scans(db, "images")
    ]
    rows = []
    for stage in TIMED_STAGES:
        values = np.ma.concatenate([part[f"{stage}_ms"] for part in times]).compressed()
        mean, median, p95 = (
            (values.mean(), *np.percentile(values, [50, 95])) if len(values) else (None,) * 3
        )
        if mean is not None:
            cells = "".join(
                f'<td class="number" data-timing="{stage}-{name}">{value:.1f}</td>'
                for name, value in (("mean", mean), ("median", median), ("p95", p95))
            )
        else:
            cells = '<td colspan="3" class="note">not measured</td>'
        rows.append(f"<tr><th>{stage}</th>{cells}</tr>")
    return (
        '<table class="timings"><tr><th>per image, ms</th><th>mean</th><th>median</th>'
        f"<th>p95</th></tr>{''.join(rows)}</table>"
    )


# --------------------------------------------------------------------------------------------
# Semantic evaluation.


def _semantic_section(result: Mapping[str, Any]) -> str:
    semantic = result["semantic"]
    figures = [
        (f.label, _figure(semantic[f.name]) + _interval(result, f"semantic/{f.name}"), f.name)
        for f in figures_in(semantic)
    ]
    evaluated = result["images"]["evaluated"]
    width = semantic.get("trimap_width")
    band = (
        ""
        if width is None
        else f" Trimap IoU counts the pixels within {width} pixels of a ground-truth boundary."
    )
    body = (
        f"<p>{evaluated:,} image(s) evaluated. Figures pool the pixel counts of all of them; "
        f"a class absent from both ground truth and predictions is undefined.{_e(band)}</p>"
        '<div class="columns">'
        + _key_value_table(figures, "figures")
        + f"<div><h3>IoU per class</h3>{_iou_bars(semantic)}</div>"
        + "</div>"
        + "<h3>Figures per class</h3>"
        + _per_class_table(semantic)
        + _per_category_table(semantic)
        + "<h3>Confusion matrix</h3>"
        + '<p class="note">Row: ground-truth class; column: predicted class. Each row is '
        "normalised to the class's ground-truth pixels (numbers in %); the shade follows the "
        "square root of the share, so that small confusions show.</p>"
        + _confusion_heatmap(semantic["classes"], np.array(semantic["confusion"], np.int64))
    )
    return _section("Evaluation (semantic)", body, "evaluation")


def _per_class_table(semantic: Mapping[str, Any]) -> str:
    figures = [figure for figure in figures_in(semantic) if figure.per_class]
    head = "".join(f"<th>{_e(figure.class_label)}</th>" for figure in figures)
    rows = "".join(
        f'<tr data-class="{_e(name)}"><th>{_e(name)}</th>'
        + "".join(
            f'<td class="number" data-class-figure="{_e(figure.per_class)}">'
            f"{_figure(semantic[figure.per_class][i])}</td>"
            for figure in figures
        )
        + "</tr>"
        for i, name in enumerate(semantic["classes"])
    )
    return f'<table class="per-class"><tr><th>class</th>{head}</tr>{rows}</table>'


def _per_category_table(semantic: Mapping[str, Any]) -> str:
    """Cityscapes' category IoU and iIoU, for runs evaluated with its instance files."""
    ious = semantic.get("category_iou")
    if not ious:
        return ""
    iious = semantic.get("category_iiou") or {}
    rows = "".join(
        f'<tr data-category="{_e(name)}"><th>{_e(name)}</th>'
        f'<td class="number" data-category-figure="iou">{_figure(iou)}</td>'
        f'<td class="number" data-category-figure="iiou">{_figure(iious.get(name))}</td></tr>'
        for name, iou in ious.items()
    )
    return (
        "<h3>Figures per category</h3>"
        '<table class="per-category"><tr><th>category</th><th>IoU</th><th>iIoU</th></tr>'
        f"{rows}</table>"
    )


def _iou_bars(semantic: Mapping[str, Any]) -> str:
    classes, ious, gt_pixels = semantic["classes"], semantic["per_class_iou"], semantic["gt_pixels"]
    label_width, bar_width, row = 130, 320, 22
    height = row * len(classes) + 38
    parts = [
        f'<svg class="iou-bars" width="{label_width + bar_width + 170}" height="{height}" '
        f'viewBox="0 0 {label_width + bar_width + 170} {height}" role="img" '
        'aria-label="IoU per class">'
    ]
    for i, (name, iou, pixels) in enumerate(zip(classes, ious, gt_pixels, strict=True)):
        y = i * row
        width = 0.0 if iou is None else iou * bar_width
        shown = "undefined" if iou is None else f"{iou:.3f}"
        value = "" if iou is None else f' data-iou="{iou!r}"'
        parts.append(
            f'<g class="iou-row" data-class="{_e(name)}"{value}>'
            f"<title>{_e(name)}: IoU {shown}, {pixels:,} ground-truth pixels</title>"
            f'<text x="{label_width - 6}" y="{y + 15}" text-anchor="end">{_e(name)}</text>'
            f'<rect class="iou-bar" x="{label_width}" y="{y + 3}" width="{width:.2f}" '
            f'height="{row - 6}" fill="{_hex(palette.colour(i))}"/>'
            f'<text x="{label_width + width + 6:.2f}" y="{y + 15}">{shown}</text></g>'
        )
    axis_y = row * len(classes) + 2
    parts.append(f'<line class="axis" x1="{label_width}" y1="0" x2="{label_width}" y2="{axis_y}"/>')
    for tick in (0, 0.5, 1):
        x = label_width + tick * bar_width
        parts.append(
            f'<line class="axis" x1="{x}" y1="{axis_y}" x2="{x}" y2="{axis_y + 4}"/>'
            f'<text x="{x}" y="{axis_y + 16}" text-anchor="middle">{tick:g}</text>'
        )
    if semantic["miou"] is not None:
        x = label_width + semantic["miou"] * bar_width
        parts.append(
            f'<line x1="{x:.2f}" y1="0" x2="{x:.2f}" y2="{axis_y}" stroke="#1d2433" '
            f'stroke-dasharray="4 3"><title>mIoU {semantic["miou"]:.3f}</title></line>'
            f'<text x="{x:.2f}" y="{axis_y + 30}" text-anchor="middle">mIoU</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _confusion_heatmap(classes: Sequence[str], confusion: np.ndarray) -> str:
    n = len(classes)
    cell = int(np.clip(560 // max(n, 1), 8, 40))
    margin = max(100, 12 + 7 * max((len(name) for name in classes), default=0))
    size = margin + n * cell
    rows = confusion.sum(axis=1)
    parts = [
        f'<svg class="confusion" width="{size + 10}" height="{size + 10}" '
        f'viewBox="0 0 {size + 10} {size + 10}" role="img" aria-label="confusion matrix">'
    ]
    parts.append(
        f'<text x="4" y="{margin - 22}">predicted →</text>'
        f'<text x="4" y="{margin - 8}">ground truth ↓</text>'
    )
    for i, name in enumerate(classes):
        middle = margin + i * cell + cell / 2
        parts.append(
            f'<text class="gt-label" x="{margin - 4}" y="{middle + 4:.1f}" '
            f'text-anchor="end">{_e(name)}</text>'
            f'<text class="pred-label" transform="translate({middle + 4:.1f},{margin - 4}) '
            f'rotate(-60)">{_e(name)}</text>'
        )
    parts += [
        _heatmap_cell(classes, confusion, rows, g, p, margin, cell)
        for g in range(n)
        for p in range(n)
    ]
    parts.append("</svg>")
    return "".join(parts)


def _heatmap_cell(
    classes: Sequence[str],
    confusion: np.ndarray,
    rows: np.ndarray,
    g: int,
    p: int,
    margin: int,
    cell: int,
) -> str:
    x, y = margin + p * cell, margin + g * cell
    pixels = int(confusion[g, p])
    what = f"ground truth {classes[g]}, predicted {classes[p]}: {pixels:,} pixels"
    if rows[g] == 0:
        return (
            f'<rect class="cell" data-gt="{g}" data-pred="{p}" data-pixels="0" x="{x}" y="{y}" '
            f'width="{cell}" height="{cell}" fill="#eceef3">'
            f"<title>{_e(what)} (no ground-truth pixels of the class)</title></rect>"
        )
    share = pixels / int(rows[g])
    shade = math.sqrt(share)
    # White to dark blue.
    rgb = [round(255 + (target - 255) * shade) for target in (8, 48, 107)]
    label = ""
    if cell >= 24 and pixels:
        colour = "#ffffff" if shade > 0.55 else "#1d2433"
        percent = "<1" if share < 0.005 else f"{share * 100:.0f}"
        label = (
            f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" '
            f'style="fill:{colour}">{_e(percent)}</text>'
        )
    return (
        f'<g><rect class="cell" data-gt="{g}" data-pred="{p}" data-pixels="{pixels}" '
        f'data-fraction="{share!r}" x="{x}" y="{y}" width="{cell}" height="{cell}" '
        f'fill="{_hex(rgb)}" stroke="#ffffff" stroke-width="0.5">'
        f"<title>{_e(what)} ({share:.2%} of the row)</title></rect>{label}</g>"
    )


# --------------------------------------------------------------------------------------------
# Instance evaluation.


def _instance_section(run: Run, evaluation: RunEvaluation) -> str:
    result = evaluation.result
    instance = result["instance"]
    header = "".join(f"<th>{_e(iou_type)}</th>" for iou_type in instance)
    rows = []
    for i, name in enumerate(STAT_NAMES):
        cells = "".join(
            f'<td class="number" data-figure="{_e(iou_type)}/{name}">'
            f"{_figure(None if scores['stats'][i] == -1 else scores['stats'][i])}"
            f"{_interval(result, f'{iou_type}/{name}')}</td>"
            for iou_type, scores in instance.items()
        )
        rows.append(f"<tr><th>{name}</th>{cells}</tr>")
    stats = f'<table class="figures"><tr><th></th>{header}</tr>{"".join(rows)}</table>'
    evaluated = result["images"]["evaluated"]
    body = (
        f"<p>{evaluated:,} image(s) evaluated; COCO figures, as pycocotools' COCOeval gives "
        "them (undefined where no category has ground truth).</p>"
        + stats
        + "<h3>Precision-recall per category (masks, <code>segm</code>)</h3>"
        + '<p class="note">Area all, up to 100 detections per image; solid: IoU 0.50, '
        "dashed: the mean over IoU 0.50:0.95 (its area is the category's AP).</p>"
        + _pr_curves(run, evaluation.scores["segm"])
    )
    return _section("Evaluation (instance)", body, "evaluation")


def _pr_curves(run: Run, scores: CocoScores) -> str:
    names = {int(k): v for k, v in run.evaluation["categories"].items()}
    at_50 = int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, 0.5))[0])
    charts, without = [], []
    for k, category in enumerate(scores.categories):
        precision = scores.precision[:, :, k, 0, -1]  # (T, R), area all, 100 detections
        if (precision < 0).any():
            without.append(names.get(category, str(category)))
            continue
        charts.append(
            _pr_chart(
                names.get(category, str(category)),
                precision[at_50],
                precision.mean(axis=0),
                float(scores.per_class_ap[k]),
            )
        )
    note = (
        f'<p class="note">No ground-truth objects, no curve: {_e(", ".join(without))}.</p>'
        if without
        else ""
    )
    return f'<div class="curves">{"".join(charts)}</div>{note}'


def _pr_chart(name: str, at_50: np.ndarray, averaged: np.ndarray, ap: float) -> str:
    width, height, left, top, plot_w, plot_h = 230, 180, 34, 22, 186, 128

    def points(precision: np.ndarray) -> str:
        return " ".join(
            f"{left + r * plot_w:.2f},{top + (1 - p) * plot_h:.2f}"
            for r, p in zip(RECALL_THRESHOLDS, precision, strict=True)
        )

    def values(precision: np.ndarray) -> str:
        return " ".join(f"{p:.6f}" for p in precision)

    colour = "#1f5fbf"
    ticks = "".join(
        f'<text x="{left - 4}" y="{top + (1 - v) * plot_h + 4:.1f}" text-anchor="end">{v:g}</text>'
        f'<text x="{left + v * plot_w:.1f}" y="{top + plot_h + 14}" '
        f'text-anchor="middle">{v:g}</text>'
        for v in (0, 0.5, 1)
    )
    return (
        f'<svg class="pr-curve" data-category="{_e(name)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(name)} precision-recall">'
        f'<text x="{left}" y="14"><tspan style="font-weight:600">{_e(name)}</tspan> '
        f"AP {ap:.3f}</text>"
        f'<rect class="axis" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>{ticks}'
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">recall</text>'
        f'<polyline class="iou-50" data-precision="{values(at_50)}" points="{points(at_50)}" '
        f'fill="none" stroke="{colour}" stroke-width="1.6"/>'
        f'<polyline class="iou-50-95" data-precision="{values(averaged)}" '
        f'points="{points(averaged)}" fill="none" stroke="{colour}" stroke-width="1.4" '
        'stroke-dasharray="4 3"/></svg>'
    )


# --------------------------------------------------------------------------------------------
# Worst images.


@dataclass
class _Drawn:
    """One ranked image: its overlays (label, data URI), or why it cannot be drawn."""

    uri: str
    caption: str
    panels: list[tuple[str, str]] = field(default_factory=list)
    classes: set[int] = field(default_factory=set)  # class indices the overlays show
    problem: str = ""


# The layers drawn over an image: a class index per pixel (-1: none) and an object id per
# pixel (0: none), edges being drawn where the object changes.
_Layers = tuple[np.ndarray, np.ndarray]


def _worst_semantic(run: Run, db: duckdb.DuckDBPyConnection, n: int) -> list[_Drawn]:
    # The first of each part's first (a part of images' files at a time).
    firsts = part_rows(
        db,
        "images",
        "SELECT image_id, uri, miou, pixel_accuracy, boundary_iou FROM {rows} "
        f"WHERE status = 'ok' AND miou IS NOT NULL ORDER BY miou, uri LIMIT {int(n)}",
    )
    ranked = sorted(firsts.to_pylist(), key=lambda row: (row["miou"], row["uri"]))[:n]
    if not ranked:
        return []
    truth = open_ground_truth(
        run.evaluation["gt"],
        ignore_index=run.evaluation.get("ignore_index"),
        model=_model_classes(run),
    )
    masks = _mask_rows(db, [row["image_id"] for row in ranked])

    def layers(row: Mapping[str, Any], shape: tuple[int, int]) -> tuple[_Layers, _Layers]:
        predicted = _paint(
            shape,
            ((rle.decode(_rle_of(m)), m["class_id"]) for m in masks.get(row["image_id"], [])),
        )
        labels = truth.target(row["uri"]).labels  # IGNORE (-1) where not evaluated
        return predicted, (labels, labels + 1)

    return [
        _draw(
            row,
            f"mIoU {_figure(row['miou'])} · pixel accuracy {_figure(row['pixel_accuracy'])} · "
            f"boundary IoU {_figure(row['boundary_iou'])}",
            layers,
        )
        for row in ranked
    ]


def _worst_instance(run: Run, db: duckdb.DuckDBPyConnection, n: int) -> list[_Drawn]:
    # Bit 0 of matched_all / ignored_all: IoU threshold 0.5 (schema.COCO_DETECTIONS).
    ranked = _query(
        db,
        """
        WITH counted AS (
            SELECT image_id,
                count(*) FILTER (WHERE matched_all & 1 = 1 AND ignored_all & 1 = 0) AS tp,
                count(*) FILTER (WHERE matched_all & 1 = 0 AND ignored_all & 1 = 0) AS fp
            FROM coco_detections WHERE iou_type = 'segm' AND score >= $threshold GROUP BY image_id
        ), objects AS (
            SELECT image_id, sum(num_gt_all) AS objects
            FROM coco_ground_truth WHERE iou_type = 'segm' GROUP BY image_id
        ), scored AS (
            SELECT image_id, uri, coalesce(tp, 0) AS tp, coalesce(fp, 0) AS fp,
                coalesce(objects, 0)::BIGINT AS objects
            FROM images LEFT JOIN counted USING (image_id) LEFT JOIN objects USING (image_id)
            WHERE status = 'ok' AND gt_uri IS NOT NULL
        )
        SELECT *, 2 * tp / (tp + fp + objects) AS f1 FROM scored
        WHERE tp + fp + objects > 0 ORDER BY f1, uri LIMIT $n
        """,
        threshold=INSTANCE_SCORE_THRESHOLD,
        n=n,
    )
    if not ranked:
        return []
    classes = run.evaluation["classes"]
    class_of_category = {
        int(category): classes.index(name)
        for category, name in run.evaluation["categories"].items()
        if name in classes
    }
    truth = open_ground_truth(run.evaluation["gt"], model=_model_classes(run))
    masks = _mask_rows(db, [row["image_id"] for row in ranked])

    def layers(row: Mapping[str, Any], shape: tuple[int, int]) -> tuple[_Layers, _Layers]:
        confident = sorted(
            (m for m in masks.get(row["image_id"], []) if m["score"] >= INSTANCE_SCORE_THRESHOLD),
            key=lambda m: m["score"],  # the most confident drawn last, on top
        )
        predicted = _paint(shape, ((rle.decode(_rle_of(m)), m["class_id"]) for m in confident))
        target = truth.target(row["uri"])
        objects = (
            (
                annotation_mask(a, target.height, target.width, row["uri"]),
                class_of_category[a["category_id"]],
            )
            for a in target.annotations
            if a["category_id"] in class_of_category
        )
        return predicted, _paint(shape, objects)

    return [
        _draw(
            row,
            f"F1 {row['f1']:.3f} at IoU 0.5 · {row['tp']} of {row['objects']} object(s) found · "
            f"{row['fp']} false detection(s) (scores ≥ {INSTANCE_SCORE_THRESHOLD:g})",
            layers,
        )
        for row in ranked
    ]


def _model_classes(run: Run) -> ModelClasses:
    return ModelClasses(run.evaluation["task"], tuple(run.evaluation["classes"]))


def _draw(
    row: Mapping[str, Any],
    caption: str,
    layers: Callable[[Mapping[str, Any], tuple[int, int]], tuple[_Layers, _Layers]],
) -> _Drawn:
    drawn = _Drawn(row["uri"], caption)
    try:
        pixels = _read_image(row["uri"])
        predicted, truth = layers(row, pixels.shape[:2])
        for label, (classes, objects) in (("prediction", predicted), ("ground truth", truth)):
            drawn.panels.append((label, _overlay(pixels, classes, objects)))
            drawn.classes |= set(np.unique(classes[classes >= 0]).tolist())
    except (OSError, ValueError) as error:
        # The image or its ground truth changed or vanished since the run (ValueError covers
        # segflow's decode, ground-truth and RLE errors): the rest of the report still stands.
        drawn.panels.clear()
        drawn.problem = f"cannot be drawn: {type(error).__name__}: {error}"
    return drawn


def _paint(shape: tuple[int, int], objects: Iterable[tuple[np.ndarray, int]]) -> _Layers:
    classes = np.full(shape, -1, np.int64)
    ids = np.zeros(shape, np.int64)
    for number, (mask, class_index) in enumerate(objects, start=1):
        if mask.shape != shape:
            raise ValueError(
                f"a mask of {mask.shape[1]}x{mask.shape[0]} on a {shape[1]}x{shape[0]} image"
            )
        inside = mask.astype(bool)
        classes[inside] = class_index
        ids[inside] = number
    return classes, ids


def _overlay(pixels: np.ndarray, classes: np.ndarray, objects: np.ndarray) -> str:
    """The image, shrunk to a thumbnail, with classes filled in their colours and object
    edges darkened; a JPEG data URI."""
    height, width = pixels.shape[:2]
    if classes.shape != (height, width):
        raise ValueError(
            f"labels of {classes.shape[1]}x{classes.shape[0]} for a {width}x{height} image"
        )
    scale = min(1.0, THUMBNAIL_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)
    # Nearest neighbour, so that a thumbnail pixel has one class.
    rows = (np.arange(size[1]) * height) // size[1]
    columns = (np.arange(size[0]) * width) // size[0]
    classes, objects = classes[np.ix_(rows, columns)], objects[np.ix_(rows, columns)]
    out = palette.tint(np.asarray(image), classes, _FILL_ALPHA).astype(np.float64)
    edge = np.zeros(objects.shape, bool)
    edge[:, :-1] |= objects[:, :-1] != objects[:, 1:]
    edge[:-1, :] |= objects[:-1, :] != objects[1:, :]
    out[edge] *= 1 - _EDGE_ALPHA
    buffer = io.BytesIO()
    Image.fromarray(out.round().astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _query(db: duckdb.DuckDBPyConnection, sql: str, **params: Any) -> list[dict[str, Any]]:
    return db.sql(sql, params=params or None).to_arrow_table().to_pylist()


def _mask_rows(
    db: duckdb.DuckDBPyConnection, image_ids: Sequence[int]
) -> dict[int, list[dict[str, Any]]]:
    """The ``masks`` rows of a few images, by image (:func:`~segflow.evaluation.
    rows_of_images`: a run's masks need not fit in memory)."""
    found: dict[int, list[dict[str, Any]]] = {}
    for row in rows_of_images(db, "masks", image_ids).to_pylist():
        found.setdefault(row["image_id"], []).append(row)
    return found


def _rle_of(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"size": [row["height"], row["width"]], "counts": row["counts"]}


def _read_image(uri: str) -> np.ndarray:
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    return decode_rgb(data, name=uri)


def _worst_section(worst: list[_Drawn], classes: Sequence[str], n: int) -> str:
    if n == 0:
        return ""
    if not worst:
        body = '<p class="note">No evaluated image has a per-image figure to rank it by.</p>'
        return _section("Worst images", body, "worst")
    shown = sorted(set().union(*(drawn.classes for drawn in worst)))
    legend = "".join(
        f'<span><i style="background:{_hex(palette.colour(i))}"></i>{_e(classes[i])}</span>'
        for i in shown
    )
    figures = "".join(_worst_figure(rank, drawn) for rank, drawn in enumerate(worst, start=1))
    body = (
        f'<p class="note">The {len(worst)} lowest-ranked image(s), worst first (see '
        "<code>segflow.report</code> for the ranking). Left: prediction; right: ground truth; "
        "uncoloured ground-truth pixels are ignored or unlabelled.</p>"
        f'<div class="legend">{legend}</div><div class="worst">{figures}</div>'
    )
    return _section("Worst images", body, "worst")


def _worst_figure(rank: int, drawn: _Drawn) -> str:
    panels = "".join(
        f'<div><img class="overlay" data-panel="{_e(label)}" src="{_e(source)}" '
        f'alt="{_e(label)} over {_e(drawn.uri)}"><span class="label">{_e(label)}</span></div>'
        for label, source in drawn.panels
    )
    problem = f'<p class="note">{_e(drawn.problem)}</p>' if drawn.problem else ""
    return (
        f'<figure data-rank="{rank}" data-uri="{_e(drawn.uri)}">'
        f'<div class="pair">{panels}</div>{problem}'
        f'<figcaption>#{rank} <span class="uri">{_e(drawn.uri)}</span><br>'
        f"{_e(drawn.caption)}</figcaption></figure>"
    )


# --------------------------------------------------------------------------------------------
# Errors.


def _errors_section(db: duckdb.DuckDBPyConnection) -> str:
    [(errors,)] = db.sql("SELECT count(*) FROM errors").fetchall()
    if errors == 0:
        return _section("Errors", '<p class="note">No errors.</p>', "errors")
    counts = _query(
        db,
        "SELECT stage, error_type, count(*) AS n FROM errors GROUP BY ALL "
        "ORDER BY n DESC, stage, error_type",
    )
    count_rows = "".join(
        f"<tr><td>{_e(row['stage'])}</td><td>{_e(row['error_type'])}</td>"
        f'<td class="number">{row["n"]:,}</td></tr>'
        for row in counts
    )
    listed = _query(
        db,
        "SELECT uri, stage, error_type, message, occurred_at FROM errors "
        "ORDER BY occurred_at, uri LIMIT $n",
        n=ERROR_ROWS,
    )
    rows = "".join(
        '<tr class="error-row">'
        + "".join(
            f'<td class="{name}">{_e(row[name])}</td>'
            for name in ("uri", "stage", "error_type", "message")
        )
        + f'<td class="time">{_e(row["occurred_at"].isoformat(timespec="seconds"))}</td></tr>'
        for row in listed
    )
    more = (
        f'<p class="note">{errors - ERROR_ROWS:,} more: '
        '<code>segflow query RUN "SELECT * FROM errors"</code> lists them all.</p>'
        if errors > ERROR_ROWS
        else ""
    )
    body = (
        f"<p>{errors:,} error(s).</p>"
        '<table class="error-counts"><tr><th>stage</th><th>type</th><th>errors</th></tr>'
        f"{count_rows}</table>"
        '<table class="errors"><tr><th>uri</th><th>stage</th><th>type</th><th>message</th>'
        f"<th>at</th></tr>{rows}</table>{more}"
    )
    return _section("Errors", body, "errors")
