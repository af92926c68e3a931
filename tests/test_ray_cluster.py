"""A real two-node Ray cluster made with ``ray start`` (token auth on), driven by the CLI.

Its own module: ``ray stop`` ends every Ray process on the machine, so no in-process Ray
may be running when it does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segflow.demo.s3 import wait_for_port
from tests.conftest import free_port
from tests.test_segment_flow import Cli, assert_exactly_once, make_corpus, store_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def shard_nodes(run: Path) -> set[str]:
    return {summary["node"] for summary in store_of(run).shard_summaries()}


def test_two_node_cluster_with_token_auth(shared, frames, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    port = free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
            env=env,
            check=True,
            capture_output=True,
        )
        wait_for_port(port)
        subprocess.run(
            [ray_bin, "start", f"--address=127.0.0.1:{port}", *common],
            env=env,
            check=True,
            capture_output=True,
        )
        corpus = make_corpus(tmp_path / "in", frames, good=8, bad=False)
        out = tmp_path / "out"
        job = [str(corpus), "--model", str(shared / "models" / "espnet_camvid.pt2")]
        job += ["--out", str(out), "--shard-size", "2"]
        returncode, output = Cli(
            *job,
            "--run-id",
            "cluster",
            "--ray-address",
            f"127.0.0.1:{port}",
            log=tmp_path / "cli.log",
            env={"RAY_AUTH_MODE": "token"},
        ).wait()
        assert returncode == 0, output
        assert_exactly_once(out / "run=cluster", 8)
        nodes = shard_nodes(out / "run=cluster")
        assert len(nodes) == 2, "both nodes should have run shards"

        # Without --ray-address the command starts a Ray of its own, not joining this one.
        returncode, output = Cli(
            *job,
            "--run-id",
            "own",
            log=tmp_path / "own.log",
            env={"RAY_AUTH_MODE": "token"},
        ).wait()
        assert returncode == 0, output
        assert not shard_nodes(out / "run=own") & nodes
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)


# A process of its own (Ray keeps the first token a process reads) declaring GPUs to Ray:
# Ray schedules by declared resources, so the plan is that of a 16-CPU, 2-GPU cluster.
_PLAN_ON_A_GPU_CLUSTER = """
import dataclasses, json
import ray
from workers.cluster import plan_actors
ray.init(num_cpus=16, num_gpus=2, include_dashboard=False)
plans = [plan_actors(None), plan_actors(1), plan_actors(None, cpus_per_actor=3),
         plan_actors(None, device="cpu")]
print(json.dumps([dataclasses.asdict(plan) for plan in plans]))
"""


def test_a_gpu_actor_holds_its_share_of_the_cpus(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    completed = subprocess.run(
        [sys.executable, "-c", _PLAN_ON_A_GPU_CLUSTER],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    plans = json.loads(completed.stdout.strip().splitlines()[-1])
    assert plans == [
        {"actors": 2, "num_cpus": 8.0, "num_gpus": 1},  # the node's 16 CPUs over its 2 GPUs
        {"actors": 1, "num_cpus": 8.0, "num_gpus": 1},  # one shard: one actor
        {"actors": 2, "num_cpus": 3.0, "num_gpus": 1},  # --cpus-per-actor
        {"actors": 16, "num_cpus": 1.0, "num_gpus": 0},  # --device cpu
    ]
