"""segflow report: real runs (one through the segment command, with a corrupt input whose name
is markup), their reports opened in a real headless Chromium, every figure on the page checked
against the run's own files or a computation from scratch (numpy, pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.cocoeval import COCOeval

from segflow.evaluation import coco_results_of_run
from segflow.report import render_report
from segflow.store import RunStore

SEGFLOW = str(Path(sys.executable).with_name("segflow"))
CHROMIUM = shutil.which("chromium")
IGNORE_INDEX = 11
# A corrupt input whose name, and so its URI and error message, is markup.
EVIL_NAME = 'evil <b id="injected">&amp; "frame" <img src=x onerror=alert(1)>.png'

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install -y chromium); the report is "
    "checked in a real browser",
)

# Loads the report unchanged in a frame (the report's own policy forbids scripts) and writes
# what Chromium made of it: its images as decoded, and its DOM.
HARNESS = """<!DOCTYPE html><html><body><pre id="result"></pre>
<iframe src="REPORT" width="1280" height="1000"></iframe>
<script>
window.addEventListener("load", () => {
  const doc = document.querySelector("iframe").contentDocument;
  const images = [...doc.images].map(image => ({
    complete: image.complete, width: image.naturalWidth, height: image.naturalHeight}));
  document.getElementById("result").textContent =
    JSON.stringify({images, html: doc.documentElement.outerHTML});
});
</script></body></html>
"""


def segflow(*args: str, log: Path) -> subprocess.CompletedProcess:
    with log.open("a") as out:  # a file, not a pipe nobody reads while Ray and Prefect talk
        return subprocess.run(
            [SEGFLOW, *args], stdout=out, stderr=subprocess.STDOUT, timeout=600, check=False
        )


def chromium(*args: str) -> str:
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None]) -> None:
        self.tag, self.attrs, self.children = tag, attrs, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag: str | None = None, css_class: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                classes = (child.attrs.get("class") or "").split()
                if (tag is None or child.tag == tag) and (
                    css_class is None or css_class in classes
                ):
                    found.append(child)
                found += child.find_all(tag, css_class)
        return found


class TreeBuilder(HTMLParser):
    VOID = frozenset({"meta", "img", "br", "link", "input", "hr", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag):
        while len(self.stack) > 1 and self.stack.pop().tag != tag:
            pass

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(markup: str) -> Node:
    builder = TreeBuilder()
    builder.feed(markup)
    builder.close()
    return builder.root


def open_in_chromium(report: Path) -> tuple[list[dict], Node]:
    """The report's images as Chromium decoded them, and its DOM as Chromium built it."""
    harness = report.with_name("harness.html")
    harness.write_text(HARNESS.replace("REPORT", report.name))
    dumped = parse(chromium("--allow-file-access-from-files", "--dump-dom", harness.as_uri()))
    [result] = [pre for pre in dumped.find_all("pre") if pre.attrs.get("id") == "result"]
    found = json.loads(result.text())
    return found["images"], parse(found["html"])


def screenshot(report: Path) -> np.ndarray:
    shot = report.with_suffix(".png")
    chromium(f"--screenshot={shot}", "--window-size=1280,3000", report.as_uri())
    return np.asarray(Image.open(shot).convert("RGB"))


def assert_self_contained(dom: Node) -> None:
    """No script, and nothing fetched: every image inline, a policy that forbids the rest."""
    assert dom.find_all("script") == [] and dom.find_all("link") == []
    assert all(img.attrs["src"].startswith("data:image/") for img in dom.find_all("img"))
    [policy] = [m for m in dom.find_all("meta") if m.attrs.get("http-equiv")]
    assert "default-src 'none'" in policy.attrs["content"]


def assert_not_blank(pixels: np.ndarray) -> None:
    assert pixels.std() > 20
    assert (pixels.min(axis=-1) < 200).mean() > 0.05  # more than a few lines of text


def figure(dom: Node, key: str) -> float:
    [cell] = [td for td in dom.find_all("td") if td.attrs.get("data-figure") == key]
    return float(cell.text().replace(",", ""))


# --------------------------------------------------------------------------------------------
# A semantic run with ground truth, through the segment command.


@pytest.fixture(scope="module")
def semantic_run(shared: Path, frames: list[Path], tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    images.mkdir()
    for frame in frames[:6]:
        shutil.copy(frame, images / frame.name)
    (images / EVIL_NAME).write_bytes(frames[0].read_bytes()[:3000])  # a truncated PNG
    out = root / "out"
    log = root / "segment.log"
    done = segflow(
        "segment",
        str(images),
        "--model",
        str(shared / "models" / "espnet_camvid.pt2"),
        "--gt",
        f"masks:{shared / 'data' / 'camvid_val' / 'labels'}",
        "--ignore-index",
        str(IGNORE_INDEX),
        "--shard-size",
        "4",
        "--out",
        str(out),
        log=log,
    )
    assert done.returncode == 1, log.read_text()[-3000:]  # 1: an image failed
    return out


def confusions_from_scratch(run: Path, labels_dir: Path, n: int) -> dict[str, np.ndarray]:
    """Each segmented image's confusion matrix [gt][pred], from its RLE masks decoded by
    pycocotools and its label PNG read by PIL."""
    predictions: dict[str, np.ndarray] = {}
    rows = duckdb.sql(
        f"SELECT uri, class_id, counts, height, width FROM '{run}/masks/*.parquet'"
    ).fetchall()
    for uri, class_id, counts, height, width in rows:
        label = predictions.setdefault(uri, np.full((height, width), -1, np.int64))
        label[coco_mask.decode({"size": [height, width], "counts": counts}) == 1] = class_id
    confusions = {}
    for uri, predicted in predictions.items():
        truth = np.array(Image.open(labels_dir / Path(uri).name), np.int64)
        valid = truth != IGNORE_INDEX
        cells = np.bincount(truth[valid] * n + predicted[valid], minlength=n * n)
        confusions[uri] = cells.reshape(n, n)
    return confusions


def iou(confusion: np.ndarray) -> np.ndarray:
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return intersection / union


@needs_chromium
@pytest.mark.integration
@pytest.mark.slow
def test_semantic_report_in_chromium(semantic_run: Path, shared: Path, tmp_path: Path):
    [run] = semantic_run.glob("run=*")
    report = tmp_path / "report.html"
    log = tmp_path / "report.log"
    done = segflow("report", str(semantic_run), "--out", str(report), "--worst", "3", log=log)
    assert done.returncode == 0, log.read_text()[-3000:]

    images, dom = open_in_chromium(report)
    assert_self_contained(dom)

    summary = json.loads((run / "summary.json").read_text())
    assert (summary["images"], summary["failed"]) == (7, 1)
    for key in ("images", "failed", "not_evaluated", "masks", "shards"):
        assert figure(dom, key) == summary[key], key
    for key in ("seconds", "images_per_second"):
        assert figure(dom, key) == pytest.approx(summary[key], abs=5e-4), key

    card = json.loads((shared / "models" / "espnet_camvid.json").read_text())
    classes = card["classes"]
    n = len(classes)
    labels_dir = shared / "data" / "camvid_val" / "labels"
    confusions = confusions_from_scratch(run, labels_dir, n)
    assert len(confusions) == 6
    dataset = sum(confusions.values())

    expected_iou = iou(dataset)
    assert figure(dom, "miou") == pytest.approx(np.nanmean(expected_iou), abs=5e-4)

    # One bar per class, its length the class's IoU over the six images.
    rows = dom.find_all("g", "iou-row")
    assert [row.attrs["data-class"] for row in rows] == classes
    scale = []
    for row, expected in zip(rows, expected_iou, strict=True):
        [bar] = row.find_all("rect", "iou-bar")
        if np.isnan(expected):
            assert "data-iou" not in row.attrs and float(bar.attrs["width"]) == 0
            continue
        assert float(row.attrs["data-iou"]) == pytest.approx(expected, abs=1e-12)
        scale.append(float(bar.attrs["width"]) / expected)
    assert len(scale) >= 8 and np.ptp(scale) < 0.02 * np.mean(scale)

    # The heatmap: every cell, each the share of its ground-truth row.
    cells = dom.find_all("rect", "cell")
    assert len(cells) == n * n
    row_sums = dataset.sum(axis=1)
    for cell in cells:
        g, p = int(cell.attrs["data-gt"]), int(cell.attrs["data-pred"])
        assert int(cell.attrs["data-pixels"]) == dataset[g, p]
        if row_sums[g] == 0:
            assert "data-fraction" not in cell.attrs
        else:
            assert float(cell.attrs["data-fraction"]) == pytest.approx(dataset[g, p] / row_sums[g])
    assert "sign_symbol" in [t.text() for t in dom.find_all("text", "gt-label")]

    # The worst images: the three of lowest per-image mIoU (classes present in its ground
    # truth or prediction), worst first, each drawn twice and decoded by the browser.
    per_image = {}
    for uri, confusion in confusions.items():
        present = confusion.sum(0) + confusion.sum(1) > 0
        per_image[uri] = iou(confusion)[present].mean()
    expected_worst = sorted(per_image, key=per_image.get)[:3]
    shown = dom.find_all("figure")
    assert [f.attrs["data-uri"] for f in shown] == expected_worst
    assert len(dom.find_all("img")) == len(images) == 6
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images)

    # The error row, its markup shown as text, not made into elements.
    [error] = dom.find_all("tr", "error-row")
    [uri_cell] = error.find_all("td", "uri")
    assert uri_cell.text().endswith("/" + EVIL_NAME)
    assert error.find_all("td", "stage")[0].text() == "decode"
    assert EVIL_NAME in error.find_all("td", "message")[0].text()
    assert not [n for n in dom.find_all() if n.attrs.get("id") == "injected"]

    assert_not_blank(screenshot(report))


# --------------------------------------------------------------------------------------------
# An instance run (tests/conftest.py's instance_run: jittered COCO ground truth).


def per_image_f1(coco, results: list[dict], threshold: float = 0.5) -> dict[int, float]:
    """Per COCO image: 2 TP / (TP + FP + objects) at IoU 0.5, area all, detections scoring at
    least ``threshold``, from pycocotools' own per-image records (masks scored by their area)."""
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(masks_only), "segm")
        evaluation.evaluate()
    counts = defaultdict(lambda: np.zeros(3, int))  # tp, fp, objects
    for record in evaluation.evalImgs:
        if record is None or record["aRng"] != evaluation.params.areaRng[0]:
            continue
        kept = np.array(record["dtScores"]) >= threshold
        matched = record["dtMatches"][0] > 0
        ignored = record["dtIgnore"][0].astype(bool)
        counts[record["image_id"]] += [
            (matched & ~ignored & kept).sum(),
            (~matched & ~ignored & kept).sum(),
            (np.array(record["gtIgnore"]) == 0).sum(),
        ]
    return {
        image: 2 * tp / (tp + fp + objects)
        for image, (tp, fp, objects) in counts.items()
        if tp + fp + objects
    }


@needs_chromium
def test_instance_report_in_chromium(instance_run: Path, coco_subset, tmp_path: Path):
    _, coco = coco_subset
    report = tmp_path / "report.html"
    log = tmp_path / "report.log"
    done = segflow("report", str(instance_run), "--out", str(report), "--worst", "4", log=log)
    assert done.returncode == 0, log.read_text()[-3000:]
    images, dom = open_in_chromium(report)
    assert_self_contained(dom)
    assert figure(dom, "images") == len(coco.imgs)
    assert figure(dom, "failed") == 0

    # PR curves against pycocotools' precision on the run's exported results.
    results = coco_results_of_run(str(instance_run))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(
            coco,
            coco.loadRes([{k: v for k, v in r.items() if k != "bbox"} for r in results]),
            "segm",
        )
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, 2]  # (T, R, K): area all, 100 dets
    names = [coco.cats[c]["name"] for c in evaluation.params.catIds]
    with_truth = {names[k] for k in range(len(names)) if (precision[:, :, k] > -1).all()}
    curves = {svg.attrs["data-category"]: svg for svg in dom.find_all("svg", "pr-curve")}
    assert set(curves) == with_truth and len(with_truth) >= 5
    for name, svg in curves.items():
        k = names.index(name)
        [at_50] = svg.find_all("polyline", "iou-50")
        [averaged] = svg.find_all("polyline", "iou-50-95")
        for line, expected in ((at_50, precision[0, :, k]), (averaged, precision[:, :, k].mean(0))):
            values = np.array(line.attrs["data-precision"].split(), float)
            np.testing.assert_allclose(values, expected, atol=1e-6)
            assert len(line.attrs["points"].split()) == len(expected)

    # The worst images: the four of lowest per-image F1, worst first.
    f1 = per_image_f1(coco, results)
    by_name = {image["file_name"]: image_id for image_id, image in coco.imgs.items()}
    shown = [f1[by_name[Path(f.attrs["data-uri"]).name]] for f in dom.find_all("figure")]
    assert shown == sorted(f1.values())[:4]
    assert len(images) == 8 and all(i["complete"] and i["width"] > 0 for i in images)
    assert_not_blank(screenshot(report))


# --------------------------------------------------------------------------------------------
# Runs with nothing to evaluate, and what is not a run.


def test_a_run_without_ground_truth_or_finished_shards_still_has_a_report(tmp_path: Path):
    RunStore(str(tmp_path), "plain").prepare({"input": "somewhere", "model": "m"})
    dom = parse(render_report(str(tmp_path)))
    assert figure(dom, "images") == figure(dom, "failed") == 0
    assert "without ground truth" in dom.text()
    assert dom.find_all("figure") == [] and dom.find_all("tr", "error-row") == []


def test_report_of_what_is_not_a_run_is_a_clear_error(tmp_path: Path):
    log = tmp_path / "report.log"
    done = segflow("report", str(tmp_path), "--out", str(tmp_path / "r.html"), log=log)
    assert done.returncode == 2
    assert "expected one run folder" in " ".join(log.read_text().split())  # rich wraps lines
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(ValueError, match="worst must be"):
        render_report(str(tmp_path), worst=-1)


def test_the_semantic_report_shows_every_per_class_figure(shared: Path, tmp_path: Path):
    """Trimap IoU and the soft IoUs of both forms, per class, as ``evaluate`` has them (a
    run written by the workers' code path on two CamVid frames, without Ray)."""
    from segflow.evaluation import evaluate_run
    from segflow.groundtruth import open_ground_truth
    from segflow.manifest import Shard
    from segflow.models import load_model
    from segflow.shard import segment_images

    labels = shared / "data" / "camvid_val" / "labels"
    uris = sorted(str(p) for p in (shared / "data" / "camvid_val" / "images").glob("*.png"))[:2]
    model = load_model(shared / "models" / "espnet_camvid.pt2", return_probabilities=True)
    gt = f"masks:{labels}"
    result = segment_images(
        model,
        uris,
        run_id="r",
        ground_truth=open_ground_truth(gt, ignore_index=11),
        trimap_width=3,
    )
    store = RunStore(str(tmp_path), "r")
    store.prepare({"input": "frames", "model": "espnet"})
    summary = {
        "shard": 0,
        "images": result.num_images,
        "failed": result.num_failed,
        "not_evaluated": result.num_not_evaluated,
        "masks": result.tables["masks"].num_rows,
    }
    store.commit_shard(Shard(0, 0, len(uris)), result.tables, summary)
    store.write_json(
        "evaluation.json",
        {
            "task": "semantic",
            "classes": list(model.classes),
            "gt": gt,
            "ignore_index": 11,
            "trimap_width": 3,
        },
    )
    semantic = evaluate_run(str(tmp_path))["semantic"]
    dom = parse(render_report(str(tmp_path), worst=1))
    assert figure(dom, "trimap_miou") == round(semantic["trimap_miou"], 3)
    assert "within 3 pixels" in dom.text()
    for key in ("per_class_trimap_iou", "per_class_soft_iou", "per_class_soft_iou_squared"):
        cells = [td for td in dom.find_all("td") if td.attrs.get("data-class-figure") == key]
        shown = [None if c.text() == "undefined" else float(c.text()) for c in cells]
        assert shown == [None if v is None else round(v, 3) for v in semantic[key]], key
    assert any(v is not None for v in semantic["per_class_trimap_iou"])
