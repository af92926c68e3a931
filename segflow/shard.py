"""Segment one shard of images: fetch, decode, predict, encode, evaluate — into its tables.

This is the whole per-image path of a run. A Ray actor calls it on its shard, and the
in-process runner calls it on the whole corpus; both get the same rows. Fetching and
decoding (and reading the ground truth, when the run has one) run in a thread pool ahead of
the model (the decoders and fsspec release the GIL), so the forward pass does not wait on
I/O. A failure of one image becomes an ``errors`` row and the shard goes on.

The model and the host work after it are pipelined: while one thread runs the forward pass of
batch k+1, another turns batch k's predictions into rows (RLE, areas, boxes, scores), so the
device never waits on the host for more than one batch. Rows keep the order of the serial
path: each batch's host work runs whole, one batch after another. A batch holding a
georeferenced raster runs in the first thread (the raster runs the model itself, window by
window, which must not run beside another forward pass). On CUDA the host work reads the
predictions on a stream of its own, ordered after the forward pass that made them, so its
device-side run finding does not queue behind the next batch's kernels.

A read never holds up the shard for longer than its timeout: each fetch runs in a read
thread (one of the process's, kept from one read to the next), and one that has not returned
after ``read_timeout`` seconds becomes a ``read`` error ("timed out after N s") while the
shard goes on without it (a thread blocked in a read cannot be stopped, so it is left behind
and another reads in its place; it keeps neither the shard nor the process from ending). A
local path that is not a regular file (a FIFO, a device) is a ``read`` error at once, unread
(:mod:`segflow.reading`).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import pyarrow as pa
import torch

from segflow import raster, rle, schema, slicing
from segflow.decode import DEFAULT_MAX_PIXELS, decode_image
from segflow.groundtruth import (
    GroundTruth,
    GroundTruthError,
    InstanceTarget,
    RasterGrid,
    SemanticTarget,
    within_valid,
)
from segflow.metrics.boundary import TRIMAP_WIDTH
from segflow.prediction import InstancePrediction, Prediction, SemanticPrediction
from segflow.reading import read_bytes
from segflow.scoring import (
    IMAGE_COLUMNS,
    METRIC_TABLES,
    InstanceScorer,
    SemanticScorer,
    check_size,
    scorer_for,
)

DEFAULT_READ_TIMEOUT = 60.0
_NO_LOCK = contextlib.nullcontext()  # reusable: it holds nothing


@dataclass
class ShardResult:
    tables: dict[str, pa.Table]  # every table of segflow.schema.TABLES
    seconds: float

    @property
    def num_images(self) -> int:
        return self.tables["images"].num_rows

    @property
    def num_failed(self) -> int:
        """Images that have no masks (their ``images`` row has status ``error``)."""
        return self.tables["images"].column("status").to_pylist().count("error")

    @property
    def num_not_evaluated(self) -> int:
        """Images segmented but not evaluated: their ground truth was missing or unusable."""
        return self.tables["errors"].column("stage").to_pylist().count("gt")


@dataclass
class _Decoded:
    uri: str
    image: torch.Tensor | None = None
    read_ms: float | None = None
    decode_ms: float | None = None
    error: tuple[str, BaseException] | None = None
    target: SemanticTarget | InstanceTarget | None = None
    target_error: BaseException | None = None
    raster: raster.RasterSource | None = None  # a georeferenced raster, read window by window


@dataclass
class _Rows:
    masks: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def _fetch_within(fetch: Callable[[str], bytes], uri: str, seconds: float | None) -> bytes:
    """``fetch(uri)``, or :class:`TimeoutError` once it has run for ``seconds``. It runs in a
    thread of :data:`_readers`, which is abandoned when it overruns."""
    if seconds is None:
        return fetch(uri)
    outcome = _readers.submit(fetch, uri)
    if not wait([outcome], timeout=seconds).done:
        raise TimeoutError(f"reading timed out after {seconds:g} s")
    return outcome.result()


class _ReadThreads:
    """Daemon threads that run timed reads, each kept for the next read when its read ends.
    A thread started a read cost the host's GIL more than anything else around the decode
    (a third of the GIL's held time, py-spy over 480x360 PNGs). A read that never returns
    keeps its thread; a read that finds no thread idle starts one."""

    def __init__(self) -> None:
        self._reads: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0  # threads done with their read and not yet handed another
        self._lock = threading.Lock()

    def submit(self, fetch: Callable[[str], bytes], uri: str) -> Future[bytes]:
        outcome: Future[bytes] = Future()
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._work, name="segflow-read", daemon=True).start()
        self._reads.put((fetch, uri, outcome))
        return outcome

    def _work(self) -> None:
        while True:
            fetch, uri, outcome = self._reads.get()
            try:
                outcome.set_result(fetch(uri))
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome.set_exception(exc)
            del fetch, uri, outcome  # an idle thread holds no bytes
            with self._lock:
                self._idle += 1


_readers = _ReadThreads()


def segment_images(
    model: Any,
    uris: Iterable[str],
    *,
    run_id: str,
    batch_size: int = 8,
    prefetch_threads: int = 4,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    fetch: Callable[[str], bytes] = read_bytes,
    read_timeout: float | None = DEFAULT_READ_TIMEOUT,
    ground_truth: GroundTruth | None = None,
    trimap_width: int = TRIMAP_WIDTH,
    on_progress: Callable[[], None] | None = None,
    raster_options: raster.RasterOptions | None = None,
    forward_lock: contextlib.AbstractContextManager = _NO_LOCK,
    slicing: slicing.Slicing | None = None,
    decode_device: torch.device | None = None,
) -> ShardResult:
    """Run ``model`` (a :class:`segflow.models.SegmentationModel`) over ``uris``; ``fetch``
    reads one URI's bytes, and one that takes longer than ``read_timeout`` seconds (``None``:
    no limit) fails that image. With ``ground_truth``, every segmented image is also
    evaluated (Trimap IoU's band ``trimap_width`` pixels wide). ``on_progress`` is called
    each time images are done (a batch, or images that failed before the model).
    Georeferenced TIFFs are read window by window (:mod:`segflow.raster`, with
    ``raster_options``) instead of fetched and decoded; an instance model sees them slice by
    slice (:mod:`segflow.slicing`, ``slicing`` or its defaults). ``forward_lock`` is held
    around each forward pass (a raster's windows and slices included), so that calls sharing
    a model in threads (an actor's shards) take turns on the device while their other work
    overlaps. ``decode_device`` (CUDA) decodes JPEGs there with nvjpeg, whose pixels differ
    from the CPU decoder's (:mod:`segflow.decode`); other formats, and JPEGs nvjpeg cannot
    read, are decoded on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if read_timeout is not None and not read_timeout > 0:
        raise ValueError(f"read_timeout must be positive seconds or None, got {read_timeout}")
    started = time.perf_counter()
    rows = _Rows()
    model_name = str(model.name)
    scorer = (
        None
        if ground_truth is None
        else scorer_for(ground_truth, model.classes, model.task, trimap_width=trimap_width)
    )

    card_bands = getattr(getattr(model, "card", None), "bands", None)
    geo_rasters = raster.rasterio_available()

    def load(uri: str) -> _Decoded:
        item = _Decoded(uri)
        t0 = time.perf_counter()
        if geo_rasters and raster.is_raster_uri(uri):
            try:
                item.raster = raster.open_raster(
                    uri, raster_options or raster.RasterOptions(), card_bands
                )
            except Exception as exc:
                item.error = ("read", exc)
                return item
            if item.raster is not None:
                item.read_ms = (time.perf_counter() - t0) * 1e3
                return item
        try:
            data = _fetch_within(fetch, uri, read_timeout)
        except Exception as exc:  # any fetch failure is this image's error, not the shard's
            item.error = ("read", exc)
            return item
        t1 = time.perf_counter()
        item.read_ms = (t1 - t0) * 1e3
        try:
            if not geo_rasters and raster.is_raster_uri(uri):
                raster.refuse_geotiff_without_rasterio(data, uri)
            item.image = decode_image(data, name=uri, max_pixels=max_pixels, device=decode_device)
        except Exception as exc:
            item.error = ("decode", exc)
            return item
        item.decode_ms = (time.perf_counter() - t1) * 1e3
        if ground_truth is not None:
            try:
                item.target = ground_truth.target(uri)
            except Exception as exc:  # the image is still segmented, just not evaluated
                item.target_error = exc
        return item

    def host_work(batch: list[_Decoded], outcomes: list[_Outcome], ready: Any) -> None:
        for item in batch:
            if item.error is not None:
                _record_failure(rows, run_id, model_name, item, *item.error)
            elif item.raster is not None:
                with forward_lock:
                    _segment_raster(
                        model,
                        model_name,
                        run_id,
                        item,
                        rows,
                        ground_truth,
                        scorer,
                        on_progress,
                        slicing,
                        batch_size,
                    )
        with _after(ready):
            for outcome in outcomes:
                _rows_of(model, model_name, run_id, outcome, rows, scorer)
        if on_progress is not None:
            on_progress()

    with (
        ThreadPoolExecutor(max_workers=max(1, prefetch_threads)) as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="segflow-host") as host,
    ):
        pending: Future[None] | None = None
        for batch in _batched(_prefetched(pool, load, uris, batch_size * 2), batch_size):
            good = [item for item in batch if item.error is None and item.raster is None]
            with forward_lock:
                outcomes = _forward(model, good)
                ready = _forward_done(model)
            if pending is not None:
                pending.result()  # at most one batch's host work behind the model
                pending = None
            if any(item.raster is not None for item in batch):
                host_work(batch, outcomes, ready)
            else:
                pending = host.submit(host_work, batch, outcomes, ready)
        if pending is not None:
            pending.result()

    tables = {name: schema.table_from_rows(name, getattr(rows, name)) for name in _ROW_TABLES}
    if scorer is None:
        tables |= {name: schema.TABLES[name].empty_table() for name in METRIC_TABLES}
    else:
        tables |= scorer.tables(run_id)
    return ShardResult(tables=tables, seconds=time.perf_counter() - started)


_ROW_TABLES = ("masks", "images", "errors")


@dataclass
class _Outcome:
    """An image after the forward pass: its prediction, or why the model gave none."""

    item: _Decoded
    prediction: Prediction | None = None
    error: BaseException | None = None
    infer_ms: float | None = None


def _forward(model: Any, batch: list[_Decoded]) -> list[_Outcome]:
    """The model's predictions of ``batch``, in order; a batch the model fails on is retried
    image by image, so that one bad image does not fail its batch-mates."""
    if not batch:
        return []
    t0 = time.perf_counter()
    try:
        predictions = model.predict([item.image for item in batch])
    except Exception as exc:
        if len(batch) == 1:
            return [_Outcome(batch[0], error=exc)]
        return [outcome for item in batch for outcome in _forward(model, [item])]
    infer_ms = (time.perf_counter() - t0) * 1e3 / len(batch)
    return [
        _Outcome(item, prediction, infer_ms=infer_ms)
        for item, prediction in zip(batch, predictions, strict=True)
    ]


def _forward_done(model: Any) -> Any:
    """On CUDA, an event marking the end of the forward pass just queued; else None."""
    device = getattr(model, "device", None)
    if not isinstance(device, torch.device) or device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


@contextlib.contextmanager
def _after(ready: Any) -> Iterator[None]:
    """Run the block's device work on this thread's own CUDA stream, after ``ready``."""
    if ready is None:
        yield
        return
    stream = getattr(_host_streams, "stream", None)
    if stream is None:
        stream = _host_streams.stream = torch.cuda.Stream()
    stream.wait_event(ready)
    with torch.cuda.stream(stream):
        yield


_host_streams = threading.local()


def _rows_of(
    model: Any,
    model_name: str,
    run_id: str,
    outcome: _Outcome,
    rows: _Rows,
    scorer: SemanticScorer | InstanceScorer | None,
) -> None:
    """One image's rows from its outcome: masks, evaluation and its ``images`` row, or the
    error that stopped it."""
    item, prediction = outcome.item, outcome.prediction
    if prediction is None:
        _record_failure(rows, run_id, model_name, item, "infer", outcome.error)
        return
    t1 = time.perf_counter()
    try:
        masks = mask_rows(prediction, model, run_id=run_id, uri=item.uri)
    except Exception as exc:
        _record_failure(rows, run_id, model_name, item, "encode", exc)
        return
    encode_ms = (time.perf_counter() - t1) * 1e3
    rows.masks.extend(masks)
    figures = _evaluate(scorer, item, prediction, masks)
    if isinstance(figures, BaseException):
        _record_error(rows, run_id, item, "gt", figures)
        figures = {}
    rows.images.append(
        _image_row(
            run_id,
            model_name,
            item,
            status="ok",
            num_masks=len(masks),
            height=prediction.height,
            width=prediction.width,
            infer_ms=outcome.infer_ms,
            encode_ms=encode_ms,
            **figures,
        )
    )


def _evaluate(
    scorer: SemanticScorer | InstanceScorer | None,
    item: _Decoded,
    prediction: Prediction,
    masks: list[dict],
) -> dict[str, Any] | BaseException:
    """The image's evaluation columns, or why it could not be evaluated."""
    if scorer is None:
        return {}
    if item.target_error is not None:
        return item.target_error
    try:
        return scorer.score(schema.image_id_for(item.uri), item.uri, prediction, masks, item.target)
    except Exception as exc:
        return exc


def mask_rows(prediction: Prediction, model: Any, *, run_id: str, uri: str) -> list[dict]:
    """The ``masks`` rows of one prediction."""
    if isinstance(prediction, SemanticPrediction):
        class_ids, encoded = rle.encode_label_map_measured(prediction.labels)
        return _semantic_rows(
            class_ids, encoded, model, run_id, uri, prediction.height, prediction.width
        )
    if isinstance(prediction, InstancePrediction):
        return _instance_rows(
            model,
            run_id,
            uri,
            (prediction.height, prediction.width),
            prediction.labels.tolist(),
            prediction.scores.tolist(),
            prediction.boxes.to(torch.float64).cpu().numpy(),
            rle.encode_masks_measured(prediction.masks),
        )
    raise TypeError(f"unknown prediction type {type(prediction).__name__}")


def _instance_rows(model, run_id, uri, size, class_ids, scores, boxes, encoded: rle.Measured):
    instance_ids = list(range(len(class_ids)))
    return _rows(model, run_id, uri, size, instance_ids, class_ids, scores, boxes, encoded)


def _semantic_rows(class_ids, encoded: rle.Measured, model, run_id, uri, height, width):
    nulls = [None] * len(class_ids)
    return _rows(
        model, run_id, uri, (height, width), nulls, class_ids, nulls, encoded.boxes, encoded
    )


def _rows(model, run_id, uri, size, instance_ids, class_ids, scores, boxes, encoded) -> list[dict]:
    classes: Sequence[str] = model.classes
    common = {
        "run_id": run_id,
        "image_id": schema.image_id_for(uri),
        "uri": uri,
        "height": size[0],
        "width": size[1],
        "model": str(model.name),
    }
    return [
        {
            **common,
            "instance": instance,
            "class_id": int(class_id),
            "class_name": _class_name(classes, int(class_id)),
            "score": score,
            "bbox": box,
            "area": area,
            "counts": mask["counts"].decode("ascii"),
        }
        for instance, class_id, score, box, area, mask in zip(
            instance_ids,
            class_ids,
            scores,
            boxes.tolist(),
            encoded.areas.tolist(),
            encoded.rles,
            strict=True,
        )
    ]


def _segment_raster(
    model: Any,
    model_name: str,
    run_id: str,
    item: _Decoded,
    rows: _Rows,
    ground_truth: GroundTruth | None,
    scorer: SemanticScorer | InstanceScorer | None,
    on_progress: Callable[[], None] | None,
    slices: slicing.Slicing | None,
    batch_size: int,
) -> None:
    """One georeferenced raster, window by window (an instance model's, slice by slice),
    into its rows, ``batch_size`` slices to a forward pass; ``on_progress`` is called after
    each band of windows or batch of slices (a large raster is hours of them on a CPU, and
    the stall watchdog must see them). With ground truth, the raster is then evaluated:
    its target made on its grid, invalid pixels ignored, against a semantic model's label
    map decoded from its masks (one raster's planes at a time, after its inference) or an
    instance model's mask rows."""
    source = item.raster
    t0 = time.perf_counter()
    size = (source.height, source.width)
    try:
        if model.task == "instance":
            read = slicing.raster_reader(source)
            found = slicing.segment_sliced(
                model, read, *size, slices or slicing.Slicing(), on_progress, batch_size
            )
            masks = _instance_rows(
                model,
                run_id,
                item.uri,
                size,
                found.labels,
                found.scores.tolist(),
                found.boxes,
                found.encoded,
            )
            prediction = None
        else:
            class_ids, encoded = raster.segment_raster(model, source, on_progress)
            masks = _semantic_rows(class_ids, encoded, model, run_id, item.uri, *size)
            prediction = functools.partial(_label_map, class_ids, encoded, *size)
        infer_ms = (time.perf_counter() - t0) * 1e3
        figures = (
            {}
            if scorer is None or ground_truth is None
            else _evaluate_raster(ground_truth, scorer, item, prediction, masks)
        )
    except Exception as exc:
        _record_failure(rows, run_id, model_name, item, "infer", exc)
        return
    finally:
        source.close()
    rows.masks.extend(masks)
    if isinstance(figures, BaseException):
        _record_error(rows, run_id, item, "gt", figures)
        figures = {}
    rows.images.append(
        _image_row(
            run_id,
            model_name,
            item,
            status="ok",
            num_masks=len(masks),
            height=source.height,
            width=source.width,
            infer_ms=infer_ms,
            crs=source.georeference.crs,
            transform=None
            if source.georeference.transform is None
            else list(source.georeference.transform),
            **figures,
        )
    )


def _evaluate_raster(
    ground_truth: GroundTruth,
    scorer: SemanticScorer | InstanceScorer,
    item: _Decoded,
    prediction: Callable[[], SemanticPrediction] | None,
    masks: list[dict],
) -> dict[str, Any] | BaseException:
    """:func:`_evaluate` of a raster: its target made on its grid, invalid pixels ignored,
    against the label map its masks hold (``prediction``, made only when the target is), or,
    for an instance model (``None``), its mask rows: COCO's evaluation reads nothing else,
    and full-size planes of its detections would not fit in memory."""
    source = item.raster
    size = (source.height, source.width)
    try:
        valid = source.valid((0, source.height, 0, source.width))
        grid = RasterGrid(*size, source.georeference.crs, source.georeference.transform, valid)
        target = within_valid(ground_truth.target(item.uri, grid), valid)
    except Exception as exc:  # the raster is still segmented, just not evaluated
        return exc
    if prediction is not None:
        item.target = target
        return _evaluate(scorer, item, prediction(), masks)
    if not isinstance(scorer, InstanceScorer) or not isinstance(target, InstanceTarget):
        return GroundTruthError(f"{item.uri}: a {type(target).__name__} cannot score detections")
    try:
        check_size(target, item.uri, size)
        scorer.update(schema.image_id_for(item.uri), masks, target)
    except Exception as exc:
        return exc
    return dict.fromkeys(IMAGE_COLUMNS) | {"gt_uri": target.source}


def _label_map(
    class_ids: Sequence[int], encoded: rle.Measured, height: int, width: int
) -> SemanticPrediction:
    """The prediction a raster's masks hold, as one label map; pixels in no mask (invalid)
    are 0 there, and are ignored in its ground truth."""
    labels = torch.zeros((height, width), dtype=torch.int64)
    for class_id, mask in zip(class_ids, encoded.rles, strict=True):
        labels[torch.from_numpy(rle.decode(mask).astype(bool))] = int(class_id)
    return SemanticPrediction(labels=labels)


def _class_name(classes: Sequence[str], class_id: int) -> str:
    if not 0 <= class_id < len(classes):
        raise ValueError(f"model returned class id {class_id}; it has {len(classes)} classes")
    return classes[class_id]


def _record_failure(
    rows: _Rows, run_id: str, model_name: str, item: _Decoded, stage: str, exc: BaseException
):
    _record_error(rows, run_id, item, stage, exc)
    rows.images.append(_image_row(run_id, model_name, item, status="error", num_masks=0))


def _record_error(rows: _Rows, run_id: str, item: _Decoded, stage: str, exc: BaseException):
    now = datetime.now(UTC)
    rows.errors.append(
        {
            "run_id": run_id,
            "image_id": schema.image_id_for(item.uri),
            "uri": item.uri,
            "stage": stage,
            "error_type": type(exc).__name__,
            "message": str(exc) or repr(exc),
            "occurred_at": now,
        }
    )


def _image_row(run_id: str, model_name: str, item: _Decoded, **values: Any) -> dict[str, Any]:
    row = {
        "run_id": run_id,
        "image_id": schema.image_id_for(item.uri),
        "uri": item.uri,
        "height": None,
        "width": None,
        "read_ms": item.read_ms,
        "decode_ms": item.decode_ms,
        "infer_ms": None,
        "encode_ms": None,
        "model": model_name,
        "processed_at": datetime.now(UTC),
        "crs": None,
        "transform": None,
        **dict.fromkeys(IMAGE_COLUMNS),
    }
    row.update(values)
    return row


def _prefetched(
    pool: ThreadPoolExecutor, load: Callable[[str], _Decoded], uris: Iterable[str], depth: int
) -> Iterator[_Decoded]:
    """Yield ``load(uri)`` in order, keeping ``depth`` loads in flight ahead of the consumer."""
    it = iter(uris)
    pending: deque[Future[_Decoded]] = deque(pool.submit(load, uri) for uri in islice(it, depth))
    while pending:
        head = pending.popleft()
        next_uri = next(it, None)
        if next_uri is not None:
            pending.append(pool.submit(load, next_uri))
        yield head.result()


def _batched(items: Iterable[_Decoded], size: int) -> Iterator[list[_Decoded]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch
