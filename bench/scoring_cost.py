"""What the workers' per-image evaluation state costs, measured side by side.

The library call an actor makes (:func:`segflow.shard.segment_images`) segments the 101
CamVid val frames with the ESPNet CamVid export, in four configurations, each its own
process, run in turn A B C D A B C D ... so that a drifting machine shifts them alike:

* ``now, no gt``: this checkout, segmentation only;
* ``now, gt``: this checkout with ``masks:`` ground truth and ``--soft-metrics`` (every
  per-image state the workers store: confusion counts, Boundary and Trimap IoU counts, both
  soft forms);
* ``baseline, no gt`` and ``baseline, gt``: the same at ``--baseline`` (default: the commit
  before Trimap IoU and the squared soft forms were added), in a temporary git worktree.

Each process loads the model, segments 8 frames to warm up, then times the 101 frames and
prints its images per second. The figures printed are medians over ``--rounds``; the cost
of the state is the ratio of ``gt`` to ``no gt`` within one checkout, and the new state's
cost is ``now, gt`` against ``baseline, gt``.

Usage: .venv/bin/python bench/scoring_cost.py [--rounds 3] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "642a276^"

CHILD = r"""
import json, os, sys, time
from pathlib import Path
shared = Path(os.environ["SEGFLOW_SHARED"])
from segflow.groundtruth import open_ground_truth
from segflow.models import load_model
from segflow.shard import segment_images
frames = sorted(str(p) for p in (shared / "data/camvid_val/images").glob("*.png"))
with_gt = sys.argv[1] == "gt"
model = load_model(str(shared / "models/espnet_camvid.pt2"), device="cpu",
                   **({"return_probabilities": True} if with_gt else {}))
labels = "masks:" + str(shared / "data/camvid_val/labels")
truth = open_ground_truth(labels, ignore_index=11) if with_gt else None  # 11: unlabelled
def run(uris):
    result = segment_images(model, uris, run_id="bench", read_timeout=None,
                            ground_truth=truth)
    assert not result.tables["errors"].num_rows, result.tables["errors"].to_pylist()
run(frames[:8])
start = time.perf_counter()
run(frames)
print(json.dumps({"images_per_s": len(frames) / (time.perf_counter() - start)}))
"""


def rate(checkout: Path, mode: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.setdefault("SEGFLOW_SHARED", str(REPO_ROOT.parent / "shared"))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{checkout} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        baseline = Path(folder) / "baseline"
        git = ["git", "-C", str(REPO_ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", str(baseline), args.baseline], check=True)
        try:
            checkouts = {"now": REPO_ROOT, "baseline": baseline}
            rates: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for name, checkout in checkouts.items():
                    for mode in ("no-gt", "gt"):
                        rates.setdefault((name, mode), []).append(rate(checkout, mode))
        finally:
            subprocess.run([*git, "remove", "--force", str(baseline)], check=True)
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"101 CamVid val frames, ESPNet, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'checkout':<10}{'no gt img/s':>14}{'gt img/s':>12}{'gt / no gt':>12}")
    for name in ("baseline", "now"):
        no_gt, gt = median[(name, "no-gt")], median[(name, "gt")]
        print(f"{name:<10}{no_gt:>14.1f}{gt:>12.1f}{gt / no_gt:>12.2f}")
    print(f"now gt / baseline gt: {median[('now', 'gt')] / median[('baseline', 'gt')]:.2f}")


if __name__ == "__main__":
    main()
