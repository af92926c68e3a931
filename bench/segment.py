"""End-to-end throughput of ``segflow segment`` against its baselines, measured side by side.

Two regimes on the same images (CamVid frames replicated to --images files, on local disk
and on a moto S3 server on 127.0.0.1):

* compute-bound, ``espnet_camvid.pt2``: (a) the model's forward pass alone on pre-decoded,
  warmed-up batches; (d) ``segflow segment`` end to end. Goal d/a >= 0.9.
* feed-rate, a near-free model exported here (11 logits ``-|grey - k/10|``), the regime of a
  GPU node where the CPU side decides whether the GPU is fed: (b) a plain single-process loop
  (PIL decode, forward, pycocotools encode per class, pyarrow write); (c) the canonical Ray
  Data recipe (read_images, map_batches with a model actor, write_parquet); (d) ``segflow
  segment``. Goals d/b >= 1.2, d/c >= 2.5.

Both (c) and (d) run twice: cold, where each command starts its own Ray and Prefect server
(the README's embedded default, seconds of fixed start-up), and warm, against a Ray cluster
(``ray start``) and a Prefect server already running, as in production. Each (d) also
prints the rate of the flow alone (after the process's imports and Prefect's start) and of
the actors at work (first shard start to last shard end).

The driver's memory planning millions of URIs: bench/scale.py --only planning.

The machine's speed drifts by tens of percent over minutes (a shared host), so (a) and (b)
are measured first and last, and their means are the ratios' denominators. This
process keeps freed memory for reuse as segflow's workers do (:mod:`segflow.allocator`),
which made (a) about 1.6x faster than with glibc's defaults: the baselines get the same
allocator as segflow, not a slower one.

Usage: .venv/bin/python bench/segment.py [--images 1000] [--skip-s3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from itertools import cycle, islice
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from segflow.allocator import retain_freed_memory
from segflow.demo.s3 import local_s3, wait_for_port
from segflow.models.card import card_fields
from segflow.store import RunStore

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGFLOW_SHARED", REPO.parent / "shared")).resolve()
SEGFLOW = str(Path(sys.executable).with_name("segflow"))
PREDECODED = 1000


class GreyLevels(torch.nn.Module):
    """11 class logits -|grey - k/10|: label maps follow image brightness, blobby like real
    ones, for almost no compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1, keepdim=True)
        levels = torch.arange(11, dtype=x.dtype, device=x.device).view(1, 11, 1, 1) / 10
        return -(grey - levels).abs()


def export_grey_model(folder: Path) -> Path:
    path = folder / "grey_levels.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=8, max=8192)
    width = torch.export.Dim("width", min=8, max=8192)
    program = torch.export.export(
        GreyLevels(),
        (torch.rand(2, 3, 64, 64),),
        dynamic_shapes={"x": {0: batch, 2: height, 3: width}},
    )
    torch.export.save(program, path)
    card = card_fields(name="grey-levels", task="semantic", classes=[f"grey{k}" for k in range(11)])
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def replicate_corpus(folder: Path, count: int) -> list[Path]:
    frames = sorted((SHARED / "data" / "camvid_val" / "images").glob("*.png"))
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        target = folder / f"{i:06d}_{frames[i % len(frames)].name}"
        shutil.copy(frames[i % len(frames)], target)
        paths.append(target)
    return paths


def _processes() -> list[tuple[int, float, int]]:
    """(pid, start time in seconds since boot, RSS bytes) of every process (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                resident_pages = int(f.read().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # ended while we looked
        found.append((int(entry), int(stat[19]) / ticks, resident_pages * page))
    return found


class PeakRss:
    """Peak memory of one measurement: the summed RSS of every process started since it
    began (Ray's workers, Prefect's server, the CLI), plus what this process grew by. What
    this process held before (the pre-decoded images of (a)) is not counted. Sampled every
    0.25 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._since = time.clock_gettime(time.CLOCK_BOOTTIME) - 1
        self._me = os.getpid()
        self._my_start = self._my_rss()

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _my_rss(self) -> int:
        return next(rss for pid, _, rss in _processes() if pid == self._me)

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            processes = _processes()
            started = sum(
                rss for pid, at, rss in processes if at >= self._since and pid != self._me
            )
            grown = sum(rss for pid, _, rss in processes if pid == self._me) - self._my_start
            self.peak = max(self.peak, started + max(0, grown))


def timed(label: str, images: int, fn) -> dict:
    with PeakRss() as rss:
        started = time.perf_counter()
        fn()
        seconds = time.perf_counter() - started
    result = {"label": label, "img_s": images / seconds, "seconds": seconds, "rss": rss.peak}
    print(
        f"  {label:<52} {result['img_s']:8.1f} img/s  {seconds:7.1f} s  "
        f"peak RSS {rss.peak / 2**30:5.2f} GiB",
        flush=True,
    )
    return result


def decoded_batches(paths: list[Path], batch_size: int) -> list[torch.Tensor]:
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    # NCHW-contiguous: the layout segflow feeds on CPU, so both sides run the same kernels.
    batches = [
        torch.from_numpy(np.stack(images[i : i + batch_size])).permute(0, 3, 1, 2).contiguous()
        for i in range(0, len(images), batch_size)
    ]
    return [batch.float() / 255 for batch in batches]


def forward_only(label: str, model_path: Path, batches: list[torch.Tensor], count: int) -> dict:
    """(a): the exported graph's forward pass alone on ``count`` images, from batches already
    decoded and converted to float (cycled through), after a warm-up: what the model costs
    with nothing around it."""
    program = torch.export.load(model_path).module()
    with torch.inference_mode():
        program(batches[0])

        def run() -> None:
            for batch in islice(cycle(batches), math.ceil(count / len(batches[0]))):
                program(batch)

        return timed(label, count, run)


def plain_loop(model_path: Path, paths: list[Path], out: Path) -> dict:
    """(b): the obvious single-process script."""
    program = torch.export.load(model_path).module()

    def run() -> None:
        rows = []
        with torch.inference_mode():
            for path in paths:
                image = np.asarray(Image.open(path).convert("RGB"))
                x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
                labels = program(x)[0].argmax(0).numpy()
                for class_id in np.unique(labels):
                    rle = coco_mask.encode(np.asfortranarray((labels == class_id).astype(np.uint8)))
                    rows.append(
                        {"uri": str(path), "class_id": int(class_id), "counts": rle["counts"]}
                    )
        pq.write_table(pa.Table.from_pylist(rows), out / "plain.parquet")

    return timed("(b) plain loop: PIL, forward, pycocotools, pyarrow", len(paths), run)


def ray_data_recipe(
    label: str, model_path: Path, folder: Path, count: int, out: Path, address: str | None
) -> dict:
    """(c): read_images -> map_batches(actor) -> write_parquet, CPUs split so the read
    tasks are not starved by the actor. ``address``: a running cluster, else a local Ray
    started (and its start-up timed) here."""
    import ray

    class Segmenter:
        def __init__(self) -> None:
            self.program = torch.export.load(model_path).module()

        def __call__(self, batch: dict) -> dict:
            uris, classes, counts = [], [], []
            with torch.inference_mode():
                for path, image in zip(batch["path"], batch["image"], strict=True):
                    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
                    labels = self.program(x.float() / 255)[0].argmax(0).numpy()
                    for class_id in np.unique(labels):
                        mask = np.asfortranarray((labels == class_id).astype(np.uint8))
                        uris.append(path)
                        classes.append(int(class_id))
                        counts.append(coco_mask.encode(mask)["counts"])
            return {"uri": uris, "class_id": classes, "counts": counts}

    def run() -> None:
        if address is None:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
        try:
            dataset = ray.data.read_images(str(folder), mode="RGB", include_paths=True)
            dataset = dataset.map_batches(Segmenter, concurrency=1, num_cpus=1, batch_size=8)
            dataset.write_parquet(str(out))
        finally:
            ray.shutdown()

    return timed(label, count, run)


def segflow_cli(
    label: str, source: str, model: Path, out: str, count: int, env=None, ray_address=None
) -> dict:
    """(d): the real command, from process start to exit."""
    command = [SEGFLOW, "segment", source, "--model", str(model), "--out", out]
    command += ["--shard-size", "64"]
    if ray_address is not None:
        command += ["--ray-address", ray_address]

    def run() -> None:
        completed = subprocess.run(
            command,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
        )
        if completed.returncode != 0:
            raise RuntimeError(completed.stdout[-3000:] + completed.stderr[-3000:])

    result = timed(label, count, run)
    fs, root = fsspec.core.url_to_fs(out)
    [run_dir] = fs.glob(f"{root}/run=*")
    summary = json.loads(fs.cat_file(f"{run_dir}/summary.json"))
    shards = RunStore(out, run_dir.rsplit("run=", 1)[1]).shard_summaries()
    busy = max(s["finished_at"] for s in shards) - min(s["started_at"] for s in shards)
    result["flow_img_s"] = summary["images_per_second"]
    result["steady_img_s"] = count / busy
    print(
        f"      the flow alone (after the process's imports and Prefect's start): "
        f"{result['flow_img_s']:.1f} "
        f"img/s; actors at work (first shard start to last shard end): "
        f"{result['steady_img_s']:.1f} img/s"
    )
    return result


@contextlib.contextmanager
def running_services(folder: Path) -> Iterator[dict[str, str]]:
    """A Ray head started with ``ray start`` (token auth) and a Prefect server, already up as
    on a production cluster, so that runs against them skip Ray's and Prefect's start-up.
    Yields the Ray address and the environment that points Prefect at the server."""
    ray_port, prefect_port = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PREFECT_HOME": str(folder / "prefect")}
    env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host=127.0.0.1", f"--port={prefect_port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        subprocess.run(
            [
                *(str(bin_dir / "ray"), "start", "--head", f"--port={ray_port}"),
                *("--node-ip-address=127.0.0.1", "--include-dashboard=false"),
                *("--disable-usage-stats", f"--num-cpus={os.cpu_count()}"),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        wait_for_port(prefect_port, 120, prefect)
        yield {
            "ray_address": f"127.0.0.1:{ray_port}",
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "PREFECT_HOME": env["PREFECT_HOME"],
        }
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True)
        prefect.terminate()
        prefect.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upload(folder: Path, env: dict[str, str]) -> None:
    import fsspec

    os.environ.update(env)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(str(folder), "bench/images", recursive=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()
    retain_freed_memory()
    print(f"machine: {os.cpu_count()} CPUs; {args.images} images (CamVid 480x360 PNG, replicated)")
    with (
        tempfile.TemporaryDirectory(prefix="segflow-bench-") as tmp,
        contextlib.ExitStack() as on_exit,
    ):
        tmp = Path(tmp)
        count = args.images
        corpus = tmp / "corpus"
        paths = replicate_corpus(corpus, count)
        espnet = SHARED / "models" / "espnet_camvid.pt2"
        grey = export_grey_model(tmp)
        s3_env = None if args.skip_s3 else on_exit.enter_context(local_s3())
        if s3_env:
            upload(corpus, s3_env)
        # Float copies of every image would not fit in memory for a large --images.
        batches = decoded_batches(paths[:PREDECODED], batch_size=8)

        print("cold: every command starts its own Ray and Prefect server (the README's default)")
        a_runs = [
            forward_only("(a) espnet forward alone, pre-decoded, warmed up", espnet, batches, count)
        ]
        b_runs = [plain_loop(grey, paths, tmp)]
        d = {
            "cold": segflow_cli(
                "(d) espnet: segflow segment", str(corpus), espnet, str(tmp / "o1"), count
            )
        }
        c = {
            "cold": ray_data_recipe(
                "(c) grey: Ray Data read_images, map_batches, write_parquet",
                grey,
                corpus,
                count,
                tmp / "c1",
                None,
            )
        }
        feed = {
            "cold": segflow_cli(
                "(d) grey: segflow segment", str(corpus), grey, str(tmp / "o2"), count
            )
        }
        if s3_env:
            d["S3"] = segflow_cli(
                "(d) espnet: segflow segment, moto S3 in and out",
                "s3://bench/images",
                espnet,
                "s3://bench/o1",
                count,
                s3_env,
            )
            feed["S3"] = segflow_cli(
                "(d) grey: segflow segment, moto S3 in and out",
                "s3://bench/images",
                grey,
                "s3://bench/o2",
                count,
                s3_env,
            )

        print(
            "warm: a Ray cluster (ray start) and a Prefect server already running, as in production"
        )
        with running_services(tmp) as services:
            env = {name: services[name] for name in ("PREFECT_API_URL", "PREFECT_HOME")}
            address = services["ray_address"]
            d["warm"] = segflow_cli(
                "(d) espnet: segflow segment --ray-address",
                str(corpus),
                espnet,
                str(tmp / "o3"),
                count,
                env,
                address,
            )
            c["warm"] = ray_data_recipe(
                "(c) grey: Ray Data on the running cluster",
                grey,
                corpus,
                count,
                tmp / "c2",
                address,
            )
            feed["warm"] = segflow_cli(
                "(d) grey: segflow segment --ray-address",
                str(corpus),
                grey,
                str(tmp / "o4"),
                count,
                env,
                address,
            )

        print("baselines again, for the machine's drift")
        a_runs.append(forward_only("(a) espnet forward alone, again", espnet, batches, count))
        b_runs.append(plain_loop(grey, paths, tmp))
        a = sum(run["img_s"] for run in a_runs) / 2
        b = sum(run["img_s"] for run in b_runs) / 2
        print(f"  (a) mean {a:.1f} img/s; (b) mean {b:.1f} img/s")

        print("ratios (whole command / the flow alone / actors at work)")
        for name, run in d.items():
            print(f"  compute-bound d/a, {name:<5} {ratios(run, a)}   goal >= 0.9")
        for name, run in feed.items():
            print(f"  feed-rate d/b, {name:<5}     {ratios(run, b)}   goal >= 1.2")
        for name in ("cold", "warm"):
            versus_c = ratios(feed[name], c[name]["img_s"])
            print(f"  feed-rate d/c, {name:<5}     {versus_c}   goal >= 2.5")


def ratios(run: dict, baseline: float) -> str:
    return " / ".join(
        f"{run[key] / baseline:4.2f}" for key in ("img_s", "flow_img_s", "steady_img_s")
    )


if __name__ == "__main__":
    main()
