"""A real two-node Ray cluster made with ``ray start`` (token auth on), driven by the CLI.

Its own module: ``ray stop`` ends every Ray process on the machine, so no in-process Ray
may be running when it does.
"""

from __future__ import annotations

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
