"""Does segflow keep an accelerator fed? The emulated device, through the real command.

``bench/emulated_device.py`` is a user model whose forward pass costs X ms per image of wall
time with the GIL released, as a GPU's would, and returns real label maps. Each measurement
is a real ``segflow segment`` (its own Ray and Prefect, one actor holding both CPUs:
``--cpus-per-actor 2``) over CamVid frames as 480×360 PNG or upscaled to 1080p JPEG, for X in
{0, 2, 5, 10, 20} ms. For each it prints:

- img/s at work: images over first shard start to last shard end (the shard summaries), so
  the command's fixed start-up is left out;
- the bound: min(1000 / X, host capacity), host capacity being the rate at X = 0;
- their ratio. Goals: >= 0.95 at every X >= 5 ms, >= 0.85 at the crossover (the X nearest
  to where 1000 / X meets the host capacity).

Then host capacity (X = 0) with one CPU (the whole command under ``taskset -c 0``,
``--cpus-per-actor 1``) against two: goal >= 1.8x.

Then (``layouts``) the host work in threads or in processes, at X in {0, 2, 5, 10}: one
actor of 2 CPUs (A) against two actors of 1 CPU each (B) whose models share one emulated
device (``device_lock``): B is what ``--actors-per-gpu 2`` makes of a node of 2 CPUs and
one GPU. Runs alternate A B A B; B/A is each pair's ratio. Where other load shares the
CPUs, B's twice as many threads get more of them: ``--b-prefetch-threads 2`` gives both
layouts as many threads.

Then (``gil``) the share of the host work during which a thread holds the GIL, sampled by
py-spy, and what it caps: one process's host work runs at most 1 / g times as fast as on
one CPU, however many CPUs it has. And (``transfer``) what a process pool decoding for the
actor would cost its process: a decoded image received through a pipe.

Usage: .venv/bin/python bench/device_feed.py [--parts feed,layouts,gil,transfer]
       [--formats png,jpeg] [--ms 0,2,5,10,20] [--layout-ms 0,2,5,10] [--repeats 2]
       [--seconds 12]   (each run holds about that many seconds of work)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGFLOW_SHARED", ROOT.parent / "shared"))
SEGFLOW = str(Path(sys.executable).with_name("segflow"))
SIZES = {"png": None, "jpeg": (1920, 1080)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="feed,layouts,gil,transfer")
    parser.add_argument("--formats", default="png,jpeg")
    parser.add_argument("--ms", default="0,2,5,10,20")
    parser.add_argument("--layout-ms", default="0,2,5,10")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prefetch-threads", type=int, default=4)
    # B's actors' own, to give both layouts as many threads where other load shares the CPUs
    parser.add_argument("--b-prefetch-threads", type=int, default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    sys.path.insert(0, str(ROOT))
    from bench.emulated_device import espnet_predictions

    espnet_predictions()  # computed once here, not inside the first timed run
    print(
        f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1 and 5 min), "
        f"{os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for fmt in args.formats.split(","):
            frames = originals(work / f"{fmt}-frames", fmt)
            print(f"\n{fmt}: {Image.open(frames[0]).size[0]}x{Image.open(frames[0]).size[1]}")
            if "feed" in parts:
                feed(fmt, frames, work, args)
            if "layouts" in parts:
                layouts(fmt, frames, work, args)
            if "gil" in parts:
                gil_bound(frames, work, args)
            if "transfer" in parts:
                transfer(frames)


def feed(fmt: str, frames: list[Path], work: Path, args: argparse.Namespace) -> None:
    """The rate against its bound at each X, then host capacity with 1 CPU against 2."""
    costs = [float(x) for x in args.ms.split(",")]
    # Host capacity first: it sizes the other runs and is the bound's second term.
    rough = at_work(fmt, frames, work, 0.0, 2, args, images=512)
    capacity = at_work(fmt, frames, work, 0.0, 2, args, images=_count(rough, 0, args))
    print(f"{'X ms/img':>9} {'img/s at work':>14} {'bound':>8} {'ratio':>6}")
    crossover = min(costs, key=lambda x: abs(1000 / x - capacity) if x else float("inf"))
    for x in costs:
        count = _count(capacity, x, args)
        rate = capacity if x == 0 else at_work(fmt, frames, work, x, 2, args, images=count)
        bound = capacity if x == 0 else min(1000 / x, capacity)
        goal = 0.85 if x == crossover else 0.95 if x >= 5 else None
        met = goal is not None and rate / bound >= goal
        verdict = "" if goal is None else "  ok" if met else f"  below {goal}"
        mark = " (crossover)" if x == crossover else ""
        print(f"{x:>9g} {rate:>14.1f} {bound:>8.1f} {rate / bound:>6.2f}{verdict}{mark}")
    one = at_work(fmt, frames, work, 0.0, 1, args, images=_count(capacity / 2, 0, args))
    print(
        f"host capacity: 1 CPU {one:.1f} img/s, 2 CPUs {capacity:.1f} img/s: "
        f"{capacity / one:.2f}x (goal >= 1.8)"
    )


def _count(rate: float, ms: float, args: argparse.Namespace, *, step: int = 64) -> int:
    bound = rate if ms == 0 else min(rate, 1000 / ms)
    return max(256, step, int(bound * args.seconds) // step * step)


def layouts(fmt: str, frames: list[Path], work: Path, args: argparse.Namespace) -> None:
    """Threads against processes for the host work, side by side: one actor holding both
    CPUs (its shards' host work in threads of one process) against two actors of one CPU
    each, both layouts' models sharing one emulated device (``device_lock``), so that the
    second is two co-located actors on one GPU (``--actors-per-gpu 2`` on a node of 2 CPUs
    and 1 GPU) laid out on this CPU-only machine (``--cpus-per-actor 1``: the same two
    processes, one CPU each, one device). Runs alternate A B A B at each X."""
    lock = work / "device.lock"
    costs = [float(x) for x in args.layout_ms.split(",")]
    # Shards of 128, at least 8 and a multiple of 8: an actor's second shard waits while
    # another actor has none (workers.pool), so that with few shards B's last ones run one
    # an actor while A's run two at a time.
    step = 8 * 128
    rough = at_work(fmt, frames, work, 0.0, 2, args, images=512, device_lock=lock)
    b_threads = args.b_prefetch_threads or args.prefetch_threads
    print(
        f"\n{fmt}: host work in threads (A: 1 actor x 2 CPUs) or processes (B: 2 actors x 1 CPU,"
        f" {b_threads} prefetch threads each), one shared emulated device; img/s at work"
    )
    pairs_header = " ".join(f"{'A':>7} {'B':>7}" for _ in range(args.repeats))
    print(f"{'X ms/img':>9} {pairs_header} {'B/A':>14} {'A/bound':>8} {'B/bound':>8}  load")
    capacity: dict[str, float] = {}
    for x in costs:
        count = _count(capacity.get("A", rough), x, args, step=step)
        runs = {"A": [], "B": []}
        for _ in range(args.repeats):
            a = at_work(
                fmt, frames, work, x, 2, args, images=count, device_lock=lock, shard_size=128
            )
            runs["A"].append(a)
            b = at_work(
                fmt,
                frames,
                work,
                x,
                1,
                args,
                images=count,
                pinned=False,
                device_lock=lock,
                prefetch_threads=b_threads,
                shard_size=128,
            )
            runs["B"].append(b)
        mean = {name: sum(rates) / len(rates) for name, rates in runs.items()}
        if x == 0:
            capacity = mean
        bound = {name: min(1000 / x, capacity[name]) if x else capacity[name] for name in mean}
        pairs = " ".join(f"{a:>7.1f} {b:>7.1f}" for a, b in zip(runs["A"], runs["B"], strict=True))
        ratios = ",".join(f"{b / a:.2f}" for a, b in zip(runs["A"], runs["B"], strict=True))
        print(
            f"{x:>9g} {pairs} {ratios:>14} {mean['A'] / bound['A']:>8.2f} "
            f"{mean['B'] / bound['B']:>8.2f}  {os.getloadavg()[1]:.1f}"
        )


def originals(folder: Path, fmt: str) -> list[Path]:
    """The CamVid frames, as PNG at their own size or as 1080p JPEG."""
    folder.mkdir(parents=True)
    frames = sorted((SHARED / "data" / "camvid_val" / "images").glob("*.png"))
    if SIZES[fmt] is None:
        return frames
    written = []
    for frame in frames:
        target = folder / f"{frame.stem}.jpg"
        Image.open(frame).convert("RGB").resize(SIZES[fmt], Image.BICUBIC).save(target, quality=90)
        written.append(target)
    return written


def corpus_of(frames: list[Path], tmp: Path, images: int) -> Path:
    """A folder of ``images`` hard links to ``frames``: distinct URIs, the same bytes."""
    corpus = tmp / f"{frames[0].suffix[1:]}-{images}"
    if not corpus.exists():
        corpus.mkdir()
        for i in range(images):
            os.link(frames[i % len(frames)], corpus / f"{i:06d}{frames[0].suffix}")
    return corpus


def at_work(
    fmt: str,
    frames: list[Path],
    tmp: Path,
    ms: float,
    cpus: int,
    args,
    *,
    images: int,
    pinned: bool = True,
    device_lock: Path | None = None,
    prefetch_threads: int | None = None,
    shard_size: int = 256,
) -> float:
    """img/s of one real ``segflow segment`` over ``images`` links to ``frames``, from the
    first shard's start to the last shard's end, its actors holding ``cpus`` CPUs each (one
    CPU: the whole command on CPU 0 unless not ``pinned``), their models sharing one
    emulated device through ``device_lock`` when given."""
    from segflow.store import RunStore

    corpus = corpus_of(frames, tmp, images)
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    command = [SEGFLOW, "segment", str(corpus), "--out", str(out), "--run-id", "feed"]
    width, height = Image.open(frames[0]).size
    command += ["--model", "bench.emulated_device:model", "--model-option", f"ms_per_image={ms}"]
    command += ["--model-option", f"size={width}x{height}"]
    if device_lock is not None:
        command += ["--model-option", f"device_lock={device_lock}"]
    command += ["--shard-size", str(shard_size), "--batch-size", str(args.batch_size)]
    prefetch = prefetch_threads or args.prefetch_threads
    command += ["--prefetch-threads", str(prefetch), "--cpus-per-actor", str(cpus)]
    if cpus == 1 and pinned:
        command = ["taskset", "-c", "0", *command]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(completed.stdout[-3000:] + completed.stderr[-3000:])
    shards = RunStore(str(out), "feed").shard_summaries()
    actors = len({s["worker"] for s in shards})
    if actors != min(2 // cpus, len(shards)):  # Ray counts 2 CPUs under taskset too
        raise SystemExit(
            f"{actors} actor(s) of {cpus} CPU(s) ran the shards: this benchmark expects 2 CPUs"
        )
    busy = max(s["finished_at"] for s in shards) - min(s["started_at"] for s in shards)
    return sum(s["images"] for s in shards) / busy


def gil_bound(frames: list[Path], work: Path, args: argparse.Namespace) -> None:
    """The share of the host work that holds the GIL, which caps what threads give: the host
    path (:func:`host_work`, an actor's shard without Ray) on one CPU, then on all, sampled
    by two py-spy samplers at once (``--nonblocking``: neither stops the process), one
    counting every sample of the work (the main thread's, inside ``segment_images``), one
    only the samples where a thread holds the GIL. Held a share g of the time at r img/s,
    the GIL costs g / r seconds an image: one process's host work runs at most r / g img/s
    however many CPUs it has, and N processes take N GILs. On one CPU g is an upper bound: a
    thread holding the GIL can be waiting for the CPU that a GIL-free decode has."""
    corpus = corpus_of(frames, work, 1024)
    print(f"\nGIL-bound share of the host work ({len(os.listdir(corpus))} images):")
    one_cpu = None
    for cpus in ("0", f"0-{os.cpu_count() - 1}"):
        rate, held, total = _sampled(corpus, cpus, work, args)
        g = sum(held.values()) / total
        one_cpu = one_cpu or rate
        print(
            f"  CPUs {cpus}: {rate:.1f} img/s, GIL held g = {g:.2f} of the time "
            f"({sum(held.values())} of {total} samples): {1e3 * g / rate:.2f} ms an image, "
            f"so one process <= {rate / g:.0f} img/s = {rate / g / one_cpu:.1f}x one CPU's"
        )
    print("  where the GIL is held (share of the work's samples; innermost frame < segflow's):")
    where = Counter()
    for stack, n in held.items():
        where[_innermost(stack)] += n
    for frame, n in where.most_common(10):
        print(f"    {n / total:>5.3f}  {frame}")


def _sampled(corpus: Path, cpus: str, work: Path, args) -> tuple[float, Counter, int]:
    """:func:`host_work` over ``corpus`` on ``cpus`` (taskset's list): its img/s, the stacks
    of the samples holding the GIL, and the number of samples of the work."""
    py_spy = Path(sys.executable).with_name("py-spy")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "import sys; from bench.device_feed import host_work; host_work(*sys.argv[1:])"
    sizes = [str(args.batch_size), str(args.prefetch_threads)]
    worker = subprocess.Popen(
        ["taskset", "-c", cpus, sys.executable, "-c", code, str(corpus), *sizes],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout.readline().strip() == "ready"  # imports and a warm-up are done
    samplers = {}
    for name, only_gil in (("all", []), ("gil", ["--gil"])):
        raw = work / f"{name}.raw"
        command = [str(py_spy), "record", "--pid", str(worker.pid), "--nonblocking", "--threads"]
        command += ["--rate", "200", "--format", "raw", "--output", str(raw), "--idle", *only_gil]
        sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samplers[name] = (raw, sampler)
    time.sleep(2)  # both attached
    worker.stdin.write("go\n")
    worker.stdin.flush()
    rate = float(worker.stdout.readline())
    counts = {}
    for name, (raw, sampler) in samplers.items():
        sampler.send_signal(signal.SIGINT)  # py-spy writes its file and ends
        sampler.wait(timeout=60)
        counts[name] = _stacks(raw)
    worker.stdin.close()
    worker.wait()
    main = next(thread for thread in counts["all"] if thread.endswith("MainThread"))
    total = sum(n for stack, n in counts["all"][main].items() if "segment_images" in stack)
    held = Counter()
    for stacks in counts["gil"].values():
        held.update(stacks)
    return rate, held, total


def host_work(corpus: str, batch_size: str, prefetch_threads: str) -> None:
    """An actor's host path without Ray (:func:`segflow.shard.segment_images` with the
    emulated device at 0 ms) over ``corpus``, between a line read from stdin and its img/s
    printed; it ends at the next line."""
    from bench.emulated_device import model
    from segflow.shard import segment_images

    device = model()
    uris = sorted(str(path) for path in Path(corpus).iterdir())
    options = {"run_id": "gil", "batch_size": int(batch_size)}
    options["prefetch_threads"] = int(prefetch_threads)
    segment_images(device, uris[:64], **options)  # lazy imports and first-call costs
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    segment_images(device, uris, **options)
    print(len(uris) / (time.perf_counter() - started), flush=True)
    sys.stdin.readline()


def transfer(frames: list[Path]) -> None:
    """What a process pool decoding for the actor would cost the actor's process: each
    decoded image received through a pipe (pickled, as multiprocessing sends it), in CPU
    time of the receiving thread and in GIL-held time (unpickling, a copy), against the
    decode it takes off the actor (CPU time, mostly GIL-free)."""
    import multiprocessing
    import pickle

    from segflow.decode import decode_image

    sample = frames[:16]
    started = time.thread_time()
    arrays = [decode_image(path.read_bytes()).numpy() for path in sample]
    decode_ms = (time.thread_time() - started) * 1e3 / len(sample)
    pickled = [pickle.dumps(array, protocol=pickle.HIGHEST_PROTOCOL) for array in arrays]
    started = time.perf_counter()
    for blob in pickled:
        pickle.loads(blob)
    unpickle_ms = (time.perf_counter() - started) * 1e3 / len(sample)
    receiving, sending = multiprocessing.Pipe(duplex=False)
    rounds = 8
    sender = multiprocessing.get_context("spawn").Process(
        target=_send_decoded, args=(sending, [str(p) for p in sample], rounds)
    )
    sender.start()
    receiving.recv()  # the sender has decoded: from now on it only sends
    started = time.thread_time()
    for _ in range(rounds * len(sample)):
        receiving.recv()
    receive_ms = (time.thread_time() - started) * 1e3 / (rounds * len(sample))
    sender.join()
    size = arrays[0].nbytes / 2**20
    print(
        f"\nprocess pool prototype ({arrays[0].shape[1]}x{arrays[0].shape[0]}, {size:.1f} MiB "
        f"decoded): decode {decode_ms:.2f} ms CPU an image; received from a decoding process "
        f"{receive_ms:.2f} ms CPU, of which unpickling (GIL held) {unpickle_ms:.2f} ms"
    )


def _send_decoded(connection, paths: list[str], rounds: int) -> None:
    from segflow.decode import decode_image

    arrays = [decode_image(Path(path).read_bytes()).numpy() for path in paths]
    connection.send("decoded")
    for _ in range(rounds):
        for array in arrays:
            connection.send(array)


def _stacks(raw: Path) -> dict[str, Counter]:
    """py-spy's raw output (``thread (id): name;frame;...;frame count`` lines) by thread."""
    threads: dict[str, Counter] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, _, frames = stack.partition(";")
        threads.setdefault(thread, Counter())[frames] += int(count)
    return threads


def _innermost(stack: str) -> str:
    """A stack's innermost frame, and the innermost of segflow's below it."""
    frames = [frame for frame in stack.split(";") if frame]
    if not frames:
        return "(no Python frame)"
    ours = [frame for frame in frames if "segflow/" in frame]
    caller = f" < {ours[-1]}" if ours and ours[-1] != frames[-1] else ""
    return frames[-1] + caller


if __name__ == "__main__":
    main()
