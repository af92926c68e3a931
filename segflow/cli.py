"""The ``segflow`` command line."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from segflow.errors import IMAGES_FAILED, NOT_STARTED

app = typer.Typer(help="Segment large image corpora into COCO RLE masks in Parquet.")
console = Console(stderr=True)

# The bootstrap's options (segflow.bootstrap), alike wherever figures are shown.
CiLevel = Annotated[
    float | None,
    typer.Option(help="Also a bootstrap interval of each figure at this level, e.g. 0.95."),
]
Replicates = Annotated[int, typer.Option(help="With --ci: bootstrap replicates.")]
Seed = Annotated[int, typer.Option(help="With --ci: the resamples' seed.")]

_verbose = False


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print the traceback of an error too.")
    ] = False,
) -> None:
    """Exit status: 0 all images done; 1 some images failed (rows in the run's errors table);
    2 the job could not start (nothing written); 3 the job started and could not finish
    (committed shards are kept: rerun to resume)."""
    global _verbose
    _verbose = verbose


@contextlib.contextmanager
def _reported(started: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Turn any error into one line on stderr and the exit status it means (see
    :mod:`segflow.errors`); ``started`` tells whether the job had begun writing."""
    from segflow.errors import INCOMPLETE, exit_status

    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        status = exit_status(exc, started=started())
        if _verbose:
            console.print_exception(show_locals=False)
        line = f"[red]error:[/] {escape(_reason(exc))}"
        if status == INCOMPLETE:
            line += "\n[yellow]committed shards are kept: rerun the same command to resume[/]"
        console.print(line, soft_wrap=True)
        raise typer.Exit(code=status) from None


def _reason(exc: BaseException) -> str:
    """The error's message; for errors from elsewhere (torch, Ray, the store), its kind and
    the first line, without the remote traceback Ray's wrappers carry."""
    from segflow.errors import SegflowError

    while isinstance(getattr(exc, "cause", None), BaseException):  # Ray's task errors
        exc = exc.cause
    if isinstance(exc, SegflowError):
        return str(exc)
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@app.command()
def segment(
    input: Annotated[str, typer.Argument(help="Folder, glob, s3:// prefix or manifest file.")],
    model: Annotated[
        str,
        typer.Option(help="Registry name, path to a .pt2/.onnx model, or module.path:callable."),
    ],
    out: Annotated[str, typer.Option(help="Output folder (local path or s3://).")],
    gt: Annotated[
        str | None,
        typer.Option(
            help="Ground truth to evaluate against: coco:FILE, masks:DIR[?id_map=F|cityscapes"
            "&palette=F&suffix=S&image_suffix=S&instances=S], coco-semantic:FILE?categories=voc"
            " or vector:FILE?class=NAME|class_field=PROPERTY[&background=NAME] (polygons"
            " rasterized onto each GeoTIFF)."
        ),
    ] = None,
    ignore_index: Annotated[int | None, typer.Option(help="Ground-truth label to ignore.")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 8,
    ray_address: Annotated[
        str | None, typer.Option(help="auto, host:port or ray://host:port; default: local Ray.")
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(help="Run id; default: derived from the command, so reruns resume."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    decode: Annotated[
        str,
        typer.Option(
            help="cpu or gpu: gpu decodes JPEGs with nvjpeg on each actor's GPU, whose pixels "
            "(and so masks) differ slightly from the CPU decoder's; other formats stay on the "
            "CPU. Recorded in the run's configuration."
        ),
    ] = "cpu",
    tile_size: Annotated[
        int | None,
        typer.Option(min=1, help="Semantic models: larger images run in tiles (default 1024)."),
    ] = None,
    tile_overlap: Annotated[
        int | None, typer.Option(min=0, help="Pixels neighbouring tiles share (default 128).")
    ] = None,
    soft_metrics: Annotated[
        bool,
        typer.Option(help="Semantic models with --gt: also soft IoU/Dice from probabilities."),
    ] = False,
    trimap_width: Annotated[
        int,
        typer.Option(
            min=0, help="Semantic models with --gt: Trimap IoU's band around boundaries, pixels."
        ),
    ] = 5,
    read_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Seconds a read may take before its image fails (stage read; default 60).",
        ),
    ] = None,
    stall_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Seconds without an image done after which a shard is retried; one that "
            "stalls on every attempt stops the run (default 600).",
        ),
    ] = None,
    model_sha256: Annotated[
        str | None,
        typer.Option(
            help="Expected sha256 of the model file (.pt2/.onnx, or the weights file); "
            "default: the file's hash when the run starts, which every worker checks."
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="auto, fp32, bf16 or fp16: auto is fp32 on the CPU and reduced precision on "
            "CUDA; bf16 runs on the CPU too, fp16 on CUDA only."
        ),
    ] = "auto",
    score_threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Instance models: keep detections above it."),
    ] = None,
    mask_threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Instance models: mask pixels above it are set."),
    ] = None,
    max_detections: Annotated[
        int | None, typer.Option(min=1, help="Instance models: best detections kept per image.")
    ] = None,
    model_option: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE for the model's loader or factory, VALUE read as JSON where it "
            "parses: smp:* models need classes=N (or a JSON list of names) and "
            "weights=FILE (or none); repeat for more."
        ),
    ] = None,
    prefetch_threads: Annotated[
        int, typer.Option(min=1, help="Threads per actor that read and decode images.")
    ] = 4,
    cpus_per_actor: Annotated[
        float | None,
        typer.Option(min=0.01, help="CPUs each actor reserves (default: 1, GPU actors more)."),
    ] = None,
    actors_per_gpu: Annotated[
        int,
        typer.Option(
            min=1,
            help="Actor processes sharing each GPU, each with its own model and the node's "
            "CPUs / GPUs / N: host work (decode, encode) past one process's GIL. GPUs only.",
        ),
    ] = 1,
    compact: Annotated[
        bool,
        typer.Option(
            "--compact", help="Once every shard is committed, compact the run (segflow compact)."
        ),
    ] = False,
    bands: Annotated[
        str | None,
        typer.Option(
            help="GeoTIFF inputs: the 1-based bands that feed the model's RGB, e.g. 1,2,3 or "
            "1,1,1 (default: the model card's input.bands, else 1,2,3)."
        ),
    ] = None,
    rescale: Annotated[
        str | None,
        typer.Option(
            help="GeoTIFF inputs that are not 8-bit: LOW,HIGH values or pLOW,pHIGH "
            "percentiles per image (e.g. p2,p98) mapped to 0..255."
        ),
    ] = None,
    slice_size: Annotated[
        int | None,
        typer.Option(
            help="Instance models on GeoTIFF inputs: the model sees slices this many pixels "
            "a side (default 1024)."
        ),
    ] = None,
    slice_overlap: Annotated[
        int | None,
        typer.Option(help="Instance models: pixels neighbouring slices share (default 128)."),
    ] = None,
    slice_merge: Annotated[
        str | None,
        typer.Option(
            help="Instance models: how detections of overlapping slices become one, mask-iou "
            "(the default: matching masks are united, objects cut by slice edges come out "
            "whole) or nms (the best-scoring box is kept)."
        ),
    ] = None,
    slice_match: Annotated[
        float | None,
        typer.Option(
            help="Instance models: the overlap, within the slices' common pixels, at which two "
            "detections are one object (mask IoU, or box intersection over the smaller; "
            "default 0.5)."
        ),
    ] = None,
) -> None:
    """Segment every image of INPUT on Ray and write masks, images and errors tables to OUT.

    Rerunning the same command resumes: shards already committed are skipped.
    --model is a registry name (segflow models), a .pt2/.onnx path, or module.path:callable,
    a factory of your own (see segflow.models.user).
    """
    _set_environment_defaults()
    started = time.perf_counter()
    planned = threading.Event()  # from then on, a failure leaves a run to resume
    with _reported(started=planned.is_set):
        from segflow.job import Job
        from segflow.job import model_option as parsed_option

        job = Job(
            input=input,
            model=model,
            out=out,
            run_id=run_id,
            gt=gt,
            ignore_index=ignore_index,
            shard_size=shard_size,
            model_sha256=model_sha256,
            batch_size=batch_size,
            precision=precision,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            soft_metrics=soft_metrics,
            score_threshold=score_threshold,
            mask_threshold=mask_threshold,
            max_detections=max_detections,
            trimap_width=trimap_width,
            bands=None if bands is None else _bands(bands),
            rescale=rescale,
            slice_size=slice_size,
            slice_overlap=slice_overlap,
            slice_merge=slice_merge,
            slice_match=slice_match,
            model_options=tuple(parsed_option(o) for o in model_option or ()),
            ray_address=ray_address,
            device=device,
            decode=decode,
            prefetch_threads=prefetch_threads,
            cpus_per_actor=cpus_per_actor,
            actors_per_gpu=actors_per_gpu,
            # Left at the job's defaults when not given.
            **{
                name: value
                for name, value in (
                    ("read_timeout", read_timeout),
                    ("stall_timeout", stall_timeout),
                )
                if value is not None
            },
        )
        # A job that cannot run fails here, before Ray and Prefect take seconds to start.
        from segflow.preflight import check_job

        checked = check_job(job)
        # Registered before Ray and Prefect are imported, so it runs after their exit handlers.
        atexit.register(_freeze_for_exit)
        # Start-up is seconds of imports, Prefect's temporary server and Ray's processes:
        # let them overlap. Ray starts on this thread, because its processes die with the
        # thread that started them.
        prefect_api = _in_background(_reach_prefect_api)
        flow_modules = _in_background(importlib.import_module, "pipelines.segment")
        import ray

        from workers.cluster import connect

        _stop_promptly_on_interrupt()
        connect(ray_address)
        flow_modules.join()
        from pipelines.segment import prestart_segment, segment_job
        from segflow.progress import segment_progress  # rich.progress: segment's alone

        if not _verbose:
            _without_prefect_tracebacks()
        prestart_segment(checked.job)
        prefect_api.join()
        with segment_progress(console) as hooks:

            def on_plan(plan: object) -> None:
                planned.set()
                hooks["on_plan"](plan)

            summary = segment_job(checked, on_plan=on_plan, on_shard=hooks["on_shard"])

    table = Table(title=f"run {summary['run_id']}")
    columns = (
        "images ok",
        "failed",
        "not evaluated",
        "masks",
        "shards run now",
        "seconds",
        "img/s",
    )
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(
        str(summary["images"] - summary["failed"]),
        str(summary["failed"]),
        str(summary["not_evaluated"]),
        str(summary["masks"]),
        f"{summary['shards_run_now']}/{summary['shards']}",
        f"{time.perf_counter() - started:.1f}",
        f"{summary['images_per_second']:.2f}",
    )
    console.print(table)
    console.print(f"output: {summary['output']}")
    # Now rather than at exit, where Ray first sleeps half a second for late log lines.
    ray.shutdown()
    if compact:
        with _reported():
            from segflow.store import RunStore

            _print_compacted(RunStore(checked.out, checked.run_id).compact())
    problems = [
        f"{summary['failed']} image(s) failed" if summary["failed"] else "",
        f"{summary['not_evaluated']} image(s) not evaluated (ground truth missing or unusable)"
        if summary["not_evaluated"]
        else "",
    ]
    if any(problems):
        described = "; ".join(p for p in problems if p)
        # Not the errors/ folder: a Delta table's folder can hold files no commit added.
        errors = f'segflow query {summary["output"]} "SELECT * FROM errors"'
        console.print(f"[red]{described}[/]: see {errors}", soft_wrap=True)
        raise typer.Exit(code=IMAGES_FAILED)


def _bands(text: str) -> tuple[int, ...]:
    from segflow.raster import parse_bands  # torch: only for a job that reads rasters

    return parse_bands(text)


def _set_environment_defaults() -> None:
    """Settings of Ray and Prefect for the commands that start them, unless the user set
    them."""
    # Ray reads its auth mode at import: set it before anything imports ray. Token auth is
    # what `ray start` clusters use (Ray 2.60), and it is kept on.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # The ephemeral Prefect server would otherwise phone home (and log an error offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its 20 s default is too short on a busy 2-core machine (seen here), and Prefect then
    # starts a second server on the same port, which fails with a traceback.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _freeze_for_exit() -> None:
    """The interpreter's last garbage collections would walk every object torch, Ray and
    Prefect created (0.4-0.6 s of the exit with this, 1.5-1.8 s without, measured); frozen
    objects are skipped, and the process is ending. DuckDB's modules (the run's planning
    loads them) are emptied, not frozen: their objects in cycles would stay uncollected, and
    DuckDB's bindings print each one as a leak at exit (27 lines)."""
    gc.freeze()
    for name in [name for name in sys.modules if name.split(".")[0] in ("duckdb", "_duckdb")]:
        vars(sys.modules.pop(name)).clear()


def _in_background(function: Callable[..., object], *args: object) -> threading.Thread:
    thread = threading.Thread(target=function, args=args, daemon=True)
    thread.start()
    return thread


def _without_prefect_tracebacks() -> None:
    """Prefect logs a failed flow or task run with its traceback, before the command's own
    one-line error; keep its lines and drop the tracebacks (``--verbose`` prints the one)."""
    import logging

    def drop_traceback(record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        # A failed state's message quotes the exception, Ray's remote traceback included.
        message = record.getMessage()
        for newline in ("\n", "\\n"):
            if newline in message:
                message = message.split(newline, 1)[0] + " ..."
        record.msg, record.args = message, ()
        return True

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(drop_traceback)


def _reach_prefect_api() -> None:
    """Without a Prefect server configured, Prefect starts a temporary one on the first
    call to its API, which takes seconds. A failure here is left for the flow to meet and
    report."""
    from prefect import get_client

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        client.hello()


def _stop_promptly_on_interrupt() -> None:
    """Ctrl-C reaches the whole process group, Prefect's ephemeral server included; the flow
    engine would then retry reporting to a dead server for minutes. Nothing needs saving
    (committed shards are durable, uncommitted ones rerun), so stop Ray and leave now."""

    def stop(signum: int, _frame) -> None:
        console.print(
            f"\n[yellow]interrupted ({signal.Signals(signum).name})[/]: committed shards are "
            "kept; rerun the same command to resume"
        )
        import ray

        ray.shutdown()
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


@app.command("compact")
def compact_run(
    run: Annotated[str, typer.Argument(help="A finished run: OUT/run=<id>, or OUT holding one.")],
    target_size: Annotated[
        str, typer.Option(help="Size of the files to write, e.g. 256MB or 1GB.")
    ] = "256MB",
    retain_hours: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Delete replaced files older than this (0: at once, which fails readers "
            "still reading them); default: the tables' retention, 7 days.",
        ),
    ] = None,
) -> None:
    """Rewrite a finished run's tables into few large files sorted by image_id, atomically,
    then delete the files no reader needs any more."""
    with _reported():
        from segflow.evaluation import open_run
        from segflow.store import parse_size

        size = parse_size(target_size)
        _print_compacted(open_run(run).store.compact(size, retain_hours))


def _print_compacted(compacted: list) -> None:
    table = Table(title="compacted")
    for column in ("table", "files before", "files after", "files deleted", "seconds"):
        table.add_column(column, justify="left" if column == "table" else "right")
    for done in compacted:
        table.add_row(
            done.table,
            str(done.files_before),
            str(done.files_after),
            str(done.files_removed),
            f"{done.seconds:.1f}",
        )
    console.print(table)


@app.command()
def evaluate(
    run: Annotated[
        str | None, typer.Argument(help="A run folder (OUT/run=<id>), or OUT holding one run.")
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="SQL predicate over the run's images table, e.g. \"uri LIKE '%night%'\": "
            "one expression, whose subqueries read only the run's tables."
        ),
    ] = None,
    gt: Annotated[
        str | None, typer.Option(help="With --predictions: the ground truth, coco:FILE.")
    ] = None,
    predictions: Annotated[
        str | None, typer.Option(help="A COCO results JSON to evaluate instead of a run.")
    ] = None,
    iou_type: Annotated[str, typer.Option(help="With --predictions: segm or bbox.")] = "segm",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    ci: CiLevel = None,
    bootstrap: Replicates = 1000,
    seed: Seed = 0,
) -> None:
    """Dataset figures of a run (mIoU, COCO mAP, ...) from its Parquet, for all its images or
    the slice --where selects; or of a COCO results file against COCO ground truth."""
    from segflow.bootstrap import Bootstrap
    from segflow.evaluation import EvaluationError, evaluate_run

    with _reported():
        resampling = None if ci is None else Bootstrap(ci, bootstrap, seed)
        if predictions is not None:
            result = _evaluate_coco_results(run, gt, predictions, iou_type, where)
        elif run is None:
            raise EvaluationError("give a RUN, or --gt coco:FILE with --predictions RESULTS.json")
        else:
            result = evaluate_run(run, where=where, bootstrap=resampling)
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    _print_evaluation(result)


def _evaluate_coco_results(
    run: str | None, gt: str | None, predictions: str, iou_type: str, where: str | None
) -> dict:
    from segflow.coco_results import evaluate_coco_results
    from segflow.evaluation import EvaluationError
    from segflow.metrics.instance import STAT_NAMES

    if run is not None or where is not None:
        raise EvaluationError("--predictions evaluates a results file: give no RUN or --where")
    if gt is None or not gt.startswith("coco:"):
        raise EvaluationError(f"--predictions needs --gt coco:FILE, got {gt!r}")
    if iou_type not in ("segm", "bbox"):
        raise EvaluationError(f"--iou-type must be segm or bbox, got {iou_type!r}")
    scores = evaluate_coco_results(gt.removeprefix("coco:"), predictions, iou_type)
    return {
        "instance": {
            iou_type: {
                "stats": [float(v) for v in scores.stats],
                "stat_names": list(STAT_NAMES),
                "per_class_ap": {
                    str(c): None if ap == -1 else float(ap)
                    for c, ap in zip(scores.categories, scores.per_class_ap, strict=True)
                },
            }
        }
    }


def _print_evaluation(result: dict) -> None:
    out = Console()
    if "images" in result:
        images = result["images"]
        out.print(
            f"{result['run']}: {images['evaluated']} image(s) evaluated of {images['selected']} "
            + (f"where {result['where']}" if result.get("where") else "selected")
        )
    if "semantic" in result:
        from segflow.metrics.figures import figures_in

        semantic = result["semantic"]
        figures = figures_in(semantic)
        per_class = [figure for figure in figures if figure.per_class]
        table = Table(title="semantic")
        for column in ("class", *(f.class_label for f in per_class), "GT pixels"):
            table.add_column(column, justify="right")
        for i, name in enumerate(semantic["classes"]):
            values = (_figure(semantic[f.per_class][i]) for f in per_class)
            table.add_row(name, *values, str(semantic["gt_pixels"][i]))
        out.print(table)
        for figure in figures:
            out.print(f"{figure.name:>18}: {_figure(semantic[figure.name])}")
    for iou_type, scores in result.get("instance", {}).items():
        table = Table(title=f"instance ({iou_type})")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for name, value in zip(scores["stat_names"], scores["stats"], strict=True):
            table.add_row(name, _figure(None if value == -1 else value))
        out.print(table)
    if "intervals" in result:
        level = result["bootstrap"]["level"]
        out.print(
            f"{level:.0%} bootstrap intervals ({result['bootstrap']['replicates']} replicates):"
        )
        for name, (low, high) in result["intervals"].items():
            out.print(f"{name:>25}: [{_figure(low)}, {_figure(high)}]")


def _figure(value: float | None) -> str:
    from segflow.metrics.figures import format_figure

    return format_figure(value, 6)


@app.command("export-coco")
def export_coco(
    run: Annotated[str, typer.Argument(help="A run of an instance model.")],
    out: Annotated[str, typer.Argument(help="Where to write the COCO results JSON.")],
) -> None:
    """Write a run's detections as COCO results (what pycocotools' loadRes reads)."""
    from segflow.evaluation import write_coco_results

    with _reported():
        written = write_coco_results(run, out)
    console.print(f"{written} detections written to {out}")


@app.command("export-vector")
def export_vector(
    run: Annotated[str, typer.Argument(help="A run over georeferenced rasters (GeoTIFF).")],
    out: Annotated[str, typer.Argument(help="Where to write the polygons (.parquet, .geojson).")],
    crs: Annotated[
        str | None,
        typer.Option(help="Reproject to this CRS, e.g. EPSG:4326 (default: the rasters' own)."),
    ] = None,
    simplify: Annotated[
        float, typer.Option(min=0, help="Simplify polygons to this tolerance, CRS units.")
    ] = 0.0,
    min_area: Annotated[
        float, typer.Option(min=0, help="Drop polygons smaller than this, CRS units².")
    ] = 0.0,
    format: Annotated[str, typer.Option(help="geoparquet or geojson.")] = "geoparquet",
    classes: Annotated[
        str | None, typer.Option(help="Only these classes, e.g. building,road (default: all).")
    ] = None,
) -> None:
    """Write a run's masks as polygons in the rasters' CRS: GeoParquet 1.1 or GeoJSON."""
    with _reported():
        from segflow.vector import VectorExport, export_vector

        options = VectorExport(
            crs=crs,
            simplify=simplify,
            min_area=min_area,
            format=format,
            classes=tuple(classes.split(",")) if classes else (),
        )
        summary = export_vector(run, out, options)
    console.print(
        f"{summary.polygons} polygons of {summary.masks} masks ({summary.images} rasters, "
        f"{summary.crs}) written to {out}"
    )


@app.command("export-raster")
def export_raster(
    run: Annotated[str, typer.Argument(help="A semantic run over georeferenced rasters.")],
    out: Annotated[str, typer.Argument(help="The folder (or s3:// prefix) to write into.")],
) -> None:
    """Write a label COG per raster of a semantic run: class ids on the raster's grid,
    nodata where the input was invalid, the class colours as its colour table."""
    with _reported():
        from segflow.label_raster import export_raster

        summary = export_raster(run, out)
    label = summary.format
    console.print(
        f"{summary.rasters} label rasters ({label.dtype}, {len(label.classes)} classes, "
        f"nodata {label.nodata}) written to {out}"
    )


@app.command()
def query(
    run: Annotated[
        str, typer.Argument(help="A run folder (OUT/run=<id>), or OUT holding one run.")
    ],
    sql: Annotated[
        str,
        typer.Argument(
            help="DuckDB SQL over the run's tables (masks, images, errors, class_stats, ...) "
            "and the rle_* mask functions; see docs/analytics.md."
        ),
    ],
    output_format: Annotated[
        str, typer.Option("--format", help="table, csv, or json (an array of row objects).")
    ] = "table",
    allow_external: Annotated[
        bool,
        typer.Option(
            "--allow-external",
            help="Let trusted SQL also read and write the machine's files and load "
            "extensions; without it the SQL reads the run's tables only.",
        ),
    ] = False,
) -> None:
    """Run SQL over a run's tables: each is a view of its name over the committed shards.
    The SQL reads those tables and nothing else, unless --allow-external."""
    import duckdb

    from segflow import schema
    from segflow.analytics import AnalyticsError, connect
    from segflow.sql import only_selects, tables_named

    if output_format not in ("table", "csv", "json"):
        console.print(f"[red]error:[/] --format must be table, csv or json, not {output_format!r}")
        raise typer.Exit(code=NOT_STARTED)
    tables = tables_named(sql, schema.TABLES)
    reads = only_selects(sql)
    with (
        _reported(),
        connect(run, allow_external=allow_external, tables=tables, only_selects=reads) as db,
    ):
        try:
            result = db.sql(sql)
            names, rows = result.columns, result.fetchall()
        except duckdb.PermissionException:
            raise AnalyticsError(
                "the query failed: it reaches outside the run's tables (files or extensions); "
                "--allow-external allows that for trusted SQL"
            ) from None
        except duckdb.Error as exc:
            raise AnalyticsError(f"the query failed: {exc}") from None
    if output_format == "json":
        json.dump([dict(zip(names, row, strict=True)) for row in rows], sys.stdout, default=_json)
        sys.stdout.write("\n")
    elif output_format == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([_cell(value, null="") for value in row] for row in rows)
    else:
        table = Table(*names)
        for row in rows:
            table.add_row(*(_cell(value, null="NULL") for value in row))
        Console().print(table)


def _json(value: object) -> object:
    """JSON for what DuckDB returns beyond JSON's types: timestamps and dates in ISO 8601,
    blobs (rle_png) in base64, decimals as numbers, anything else (intervals, UUIDs) as text."""
    import base64
    import numbers

    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, numbers.Number):
        return float(value)
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if isoformat is not None else str(value)


def _cell(value: object, null: str) -> str:
    if value is None:
        return null
    if isinstance(value, list | dict):
        return json.dumps(value, default=_json)
    if isinstance(value, str | int | float):
        return str(value)
    return str(_json(value))


@app.command()
def show(
    run: Annotated[
        str, typer.Argument(help="A run folder (OUT/run=<id>), or OUT holding one run.")
    ],
    image_id: Annotated[int, typer.Argument(help="The image's id (images.image_id).")],
    out: Annotated[str, typer.Option(help="Where to write the PNG (local path or s3://).")] = (
        "overlay.png"
    ),
    alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Opacity of the masks over the image.")
    ] = 0.5,
    legend: Annotated[
        bool, typer.Option(help="Semantic runs: list the classes in the top-left corner.")
    ] = True,
) -> None:
    """Draw one image of a run with its masks over it: a colour per class (semantic), or per
    detection with its box and label (instance)."""
    import fsspec

    from segflow.analytics import overlay

    with _reported():
        picture = overlay(run, image_id, alpha=alpha, legend=legend)
        with fsspec.open(out, "wb") as f:
            # zlib's fastest level: 480x360, 57 -> 16 ms for a file 7 % larger.
            picture.save(f, format="PNG", compress_level=1)
    console.print(f"image {image_id} with its masks written to {out}")


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Local folder for the runs and reports.")] = "out/demo",
    images: Annotated[int, typer.Option(min=1, help="Corpus images (512x512).")] = 24,
    large: Annotated[int, typer.Option(min=0, help="Images larger than a tile.")] = 2,
    broken: Annotated[int, typer.Option(min=0, help="Deliberately broken files.")] = 3,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard.")] = 8,
    real: Annotated[
        bool, typer.Option(help="Also segment and evaluate ../shared's CamVid frames.")
    ] = False,
) -> None:
    """The main job end to end on an embedded default: an S3 endpoint on loopback, a local
    Ray, Prefect's ephemeral server; the demo corpus segmented and evaluated with the demo
    models, figures, queries and HTML reports. Stops what it started."""
    _set_environment_defaults()
    from pathlib import Path

    import ray

    from pipelines.demo import run_demo, shared_folder
    from segflow.demo.s3 import local_s3

    _stop_promptly_on_interrupt()
    shared = shared_folder() if real else None
    if real and shared is None:
        console.print("[red]error:[/] --real needs ../shared (or SEGFLOW_SHARED)")
        raise typer.Exit(code=NOT_STARTED)
    started = time.perf_counter()
    with _reported(), local_s3() as endpoint:
        os.environ.update(endpoint)  # before Ray starts: its workers inherit the environment
        try:
            run_demo(
                Path(out),
                images=images,
                large=large,
                broken=broken,
                shard_size=shard_size,
                console=Console(),
                shared=shared,
            )
        finally:
            ray.shutdown()
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")


@app.command("models")
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the models the registry knows."""
    from segflow.models import available_models

    rows = [
        {
            "name": info.name,
            "task": info.task or "(its own)",
            "source": info.source,
            "needs": f"segflow[{info.extra}]" if info.extra else "",
        }
        for info in available_models()
    ]
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        return
    table = Table()
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    Console().print(table)


@app.command()
def report(
    run: Annotated[
        str, typer.Argument(help="A run folder (OUT/run=<id>), or OUT holding one run.")
    ],
    out: Annotated[str, typer.Option(help="Where to write the HTML (local path or s3://).")] = (
        "report.html"
    ),
    worst: Annotated[int, typer.Option(min=0, help="Lowest-scoring images to draw.")] = 12,
    ci: CiLevel = None,
    bootstrap: Replicates = 1000,
    seed: Seed = 0,
) -> None:
    """Write one self-contained HTML page about a run: summary, figures, charts, the worst
    images with prediction and ground truth overlaid, and the errors."""
    import fsspec

    from segflow.bootstrap import Bootstrap
    from segflow.report import render_report

    with _reported():
        resampling = None if ci is None else Bootstrap(ci, bootstrap, seed)
        page = render_report(run, worst=worst, bootstrap=resampling)
        with fsspec.open(out, "w", encoding="utf-8") as f:
            f.write(page)
    console.print(f"report written to {out}")


if __name__ == "__main__":
    app()
