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
# Ray schedules by declared resources, so the plan is that of a 16-CPU, 2-GPU cluster. The
# co-located actors are started with their plan's reservations, and say which GPU Ray gave
# each (Ray's own assignment: CUDA_VISIBLE_DEVICES of a real GPU node).
_PLAN_ON_A_GPU_CLUSTER = """
import dataclasses, json
import ray
from segflow.job import JobError
from workers.cluster import plan_actors
ray.init(num_cpus=16, num_gpus=2, include_dashboard=False)
plans = [plan_actors(None), plan_actors(1), plan_actors(None, cpus_per_actor=3),
         plan_actors(None, device="cpu"), plan_actors(None, actors_per_gpu=2),
         plan_actors(3, actors_per_gpu=2), plan_actors(2, actors_per_gpu=2),
         plan_actors(None, actors_per_gpu=4, cpus_per_actor=1)]
colocated = plans[4]
class Where:
    def gpus(self):
        return ray.get_gpu_ids(), ray.get_runtime_context().get_assigned_resources()
actor = ray.remote(Where).options(num_cpus=colocated.num_cpus, num_gpus=colocated.num_gpus)
actors = [actor.remote() for _ in range(colocated.actors)]
where = ray.get([a.gpus.remote() for a in actors], timeout=120)
try:
    plan_actors(None, device="cpu", actors_per_gpu=2)
    refused = None
except JobError as exc:
    refused = str(exc)
print(json.dumps({"plans": [dataclasses.asdict(plan) for plan in plans], "where": where,
                  "refused": refused}))
"""


def _run_on_ray(code: str, home: Path) -> dict:
    """What ``code``, run in a process of its own, prints last (JSON)."""
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    completed = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_a_gpu_actor_holds_its_share_of_the_cpus(tmp_path):
    result = _run_on_ray(_PLAN_ON_A_GPU_CLUSTER, tmp_path)
    assert result["plans"] == [
        {"actors": 2, "num_cpus": 8.0, "num_gpus": 1},  # the node's 16 CPUs over its 2 GPUs
        {"actors": 1, "num_cpus": 8.0, "num_gpus": 1},  # one shard: one actor
        {"actors": 2, "num_cpus": 3.0, "num_gpus": 1},  # --cpus-per-actor
        {"actors": 16, "num_cpus": 1.0, "num_gpus": 0},  # --device cpu
        {"actors": 4, "num_cpus": 4.0, "num_gpus": 0.5},  # --actors-per-gpu 2: 16 / 2 / 2
        {"actors": 3, "num_cpus": 4.0, "num_gpus": 0.5},  # three shards: three actors
        {"actors": 2, "num_cpus": 8.0, "num_gpus": 1},  # two: one per GPU, not two on one
        {"actors": 8, "num_cpus": 1.0, "num_gpus": 0.25},  # and --cpus-per-actor
    ]
    # Every co-located actor got half of one GPU and its 4 CPUs, two actors on each GPU.
    gpu_ids = sorted(tuple(ids) for ids, _ in result["where"])
    assert len(gpu_ids) == 4 and all(len(ids) == 1 for ids in gpu_ids)
    assert sorted({ids: gpu_ids.count(ids) for ids in gpu_ids}.values()) == [2, 2]
    assert all(held == {"CPU": 4.0, "GPU": 0.5} for _, held in result["where"])
    assert result["refused"].startswith("--actors-per-gpu 2 shares a GPU between actors")


# Two nodes in one process's Ray (ray.cluster_utils): a CPU-only node of 6 CPUs (the head)
# and a GPU node of 8 CPUs and 2 GPUs.
_PLAN_BESIDE_A_CPU_NODE = """
import dataclasses, json
import ray
from ray.cluster_utils import Cluster
from workers.cluster import _create_private_token, _single_machine, plan_actors
_create_private_token()  # ray.init would make one; a Cluster's nodes only read it
with _single_machine():  # on loopback, as segflow's own local Ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6,
                                                            "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=8, num_gpus=2, node_ip_address="127.0.0.1")
    ray.init(address="127.0.0.1:" + cluster.address.rsplit(":", 1)[1])  # its port, on loopback
plans = [plan_actors(None), plan_actors(None, actors_per_gpu=2)]
started = []
for plan in plans:
    actor = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(
        type("Actor", (), {"ready": lambda self: True}))
    actors = [actor.remote() for _ in range(plan.actors)]
    ready, pending = ray.wait([a.ready.remote() for a in actors], num_returns=len(actors),
                              timeout=60)
    started.append(len(ready))
    for a in actors:
        ray.kill(a)
print(json.dumps({"plans": [dataclasses.asdict(plan) for plan in plans], "started": started}))
ray.shutdown()
cluster.shutdown()
"""


def test_gpu_actors_hold_their_nodes_cpus_not_the_clusters(tmp_path):
    result = _run_on_ray(_PLAN_BESIDE_A_CPU_NODE, tmp_path)
    # The GPU node's 8 CPUs over its 2 GPUs: 4 each (the cluster's 14 / 2 = 7 would not fit
    # two actors on that node, and the second would never start).
    assert result["plans"] == [
        {"actors": 2, "num_cpus": 4.0, "num_gpus": 1},
        {"actors": 4, "num_cpus": 2.0, "num_gpus": 0.5},
    ]
    assert result["started"] == [2, 4]
