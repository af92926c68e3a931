"""Shared fixtures. Real data and models come from ``../shared`` (override: SEGFLOW_SHARED)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from segflow import schema
from segflow.groundtruth import open_ground_truth
from segflow.manifest import Shard, build_manifest
from segflow.prediction import InstancePrediction
from segflow.scoring import scorer_for
from segflow.shard import mask_rows
from segflow.store import RunStore

REPO_ROOT = Path(__file__).resolve().parents[1]

# Ray reads its auth mode when imported; the tests, like the segflow command, keep token
# authentication on for every Ray they start or join.
os.environ.setdefault("RAY_AUTH_MODE", "token")


def manifest_uris(location: str, **options) -> list[str]:
    """The URIs :func:`~segflow.manifest.build_manifest` lists for ``location``, read back
    whole (a test's corpus is small)."""
    with tempfile.TemporaryDirectory() as tmp:
        dest = os.path.join(tmp, "manifest.parquet")
        count = build_manifest(location, dest, **options)
        uris = pq.read_table(dest).column("uri").to_pylist()
        assert count == len(uris)
        assert os.listdir(tmp) == ["manifest.parquet"]  # nothing else left behind
    return uris


def shared_root() -> Path:
    return Path(os.environ.get("SEGFLOW_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    root = shared_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"shared data not found at {root} (set SEGFLOW_SHARED)")
    return root


@pytest.fixture(scope="session")
def frames(shared: Path) -> list[Path]:
    """The CamVid validation frames (PNG, 480x360)."""
    return sorted((shared / "data" / "camvid_val" / "images").glob("*.png"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """A real S3 endpoint (moto server) on loopback, and the standard AWS variables that
    point boto/s3fs at it. Tests pass these to subprocesses or set them with monkeypatch."""
    from segflow.demo.s3 import local_s3

    with local_s3() as env:
        yield env


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A real, temporary Prefect server for the flows under test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray cluster in this process, with token authentication on. Module-scoped:
    the ``ray start`` cluster tests must not find it running."""
    import ray

    from workers.cluster import connect

    connect(None)
    yield
    ray.shutdown()


# --------------------------------------------------------------------------------------------
# An instance run with COCO ground truth, without a model: jittered ground truth as detections.


@pytest.fixture(scope="session")
def coco_subset(shared: Path) -> tuple[Path, COCO]:
    path = shared / "data" / "coco_val2017_10" / "annotations" / "instances_val2017_subset.json"
    with contextlib.redirect_stdout(io.StringIO()):
        return path, COCO(str(path))


def jittered_detections(coco: COCO, image_id: int, rng) -> InstancePrediction:
    """Detections near the image's objects (some with the wrong category), and false
    positives, scores with one decimal so that ties occur."""
    image = coco.imgs[image_id]
    height, width = image["height"], image["width"]
    masks, labels = [], []
    for annotation in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
        mask = coco.annToMask(annotation)
        for _ in range(int(rng.integers(0, 3))):
            masks.append(np.roll(mask, rng.integers(-6, 7, 2), axis=(0, 1)))
            wrong = rng.random() < 0.15
            labels.append(
                int(rng.choice(sorted(coco.cats))) if wrong else annotation["category_id"]
            )
    for _ in range(int(rng.integers(1, 4))):
        mask = np.zeros((height, width), np.uint8)
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        mask[y : y + int(rng.integers(4, 40)), x : x + int(rng.integers(4, 40))] = 1
        masks.append(mask)
        labels.append(int(rng.choice(sorted(coco.cats))))
    stacked = torch.from_numpy(np.stack(masks).astype(bool))
    boxes = np.array([coco_mask.toBbox(coco_mask.encode(np.asfortranarray(m))) for m in masks])
    boxes = torch.from_numpy(boxes + rng.normal(0, 2, boxes.shape))
    scores = torch.from_numpy(np.round(rng.random(len(masks)), 1))
    order = torch.argsort(scores, descending=True, stable=True)
    return InstancePrediction(
        boxes=boxes[order].float(),
        labels=torch.tensor(labels)[order],
        scores=scores[order].float(),
        masks=stacked[order],
    )


@pytest.fixture(scope="session")
def instance_run(coco_subset, shared: Path, tmp_path_factory) -> Path:
    """A run of an instance "model" whose detections are jittered ground truth, written by
    the workers' code path (mask rows, scorer_for, commit) over two shards."""
    gt_path, coco = coco_subset
    out = tmp_path_factory.mktemp("instance") / "out"
    store = RunStore(str(out), "inst")
    store.prepare({"input": "coco"})
    names = ["N/A"] * (max(coco.cats) + 1)
    for category_id, category in coco.cats.items():
        names[category_id] = category["name"]
    model = SimpleNamespace(name="jitter", classes=tuple(names), task="instance")
    ground_truth = open_ground_truth(f"coco:{gt_path}")
    images_dir = shared / "data" / "coco_val2017_10" / "images"
    uris = [str(images_dir / coco.imgs[i]["file_name"]) for i in sorted(coco.imgs)]
    rng = np.random.default_rng(3)
    for index, shard_uris in enumerate((uris[:6], uris[6:])):
        scorer = scorer_for(ground_truth, model.classes, "instance")
        masks, images = [], []
        for uri in shard_uris:
            image_id = schema.image_id_for(uri)
            target = ground_truth.target(uri)
            prediction = jittered_detections(coco, int(target.source.rsplit("=", 1)[1]), rng)
            rows = mask_rows(prediction, model, run_id="inst", uri=uri)
            figures = scorer.score(image_id, uri, prediction, rows, target)
            masks += rows
            images.append(image_row(uri, prediction, len(rows), figures))
        tables = {"masks": masks, "images": images, "errors": []}
        store.commit_shard(
            Shard(index, index * 6, index * 6 + len(shard_uris)),
            {name: schema.table_from_rows(name, rows) for name, rows in tables.items()}
            | scorer.tables("inst"),
            {
                "shard": index,
                "images": len(images),
                "failed": 0,
                "not_evaluated": 0,
                "masks": len(masks),
            },
        )
    store.write_json(
        "evaluation.json",
        {
            "task": "instance",
            "classes": list(names),
            "gt": f"coco:{gt_path}",
            "ignore_index": None,
            "categories": {str(k): v["name"] for k, v in coco.cats.items()},
        },
    )
    return out


def image_row(uri: str, prediction, num_masks: int, figures: dict) -> dict:
    return {
        "run_id": "inst",
        "image_id": schema.image_id_for(uri),
        "uri": uri,
        "status": "ok",
        "height": prediction.height,
        "width": prediction.width,
        "num_masks": num_masks,
        "read_ms": None,
        "decode_ms": None,
        "infer_ms": None,
        "encode_ms": None,
        "model": "jitter",
        "processed_at": datetime.now(UTC),
        "crs": None,  # plain images: not georeferenced
        "transform": None,
        **figures,
    }
