"""Connecting the driver to Ray, and sizing the actor pool from what the cluster has.

The local Ray that a run starts by default listens on loopback (127.0.0.1) only: its GCS,
raylet, workers, dashboard agent (metrics export included) and runtime-env agent, which
would otherwise answer on every interface, the metrics without authentication. Ray 2.60
turns a node IP of 127.0.0.1 into the machine's LAN address unless it runs as a
single-machine Ray (``ray_constants.ENABLE_RAY_CLUSTER`` false, what it does on macOS and
Windows), which :func:`connect` asks for while it starts the local Ray. The token that
authenticates to it is created readable by its owner only (Ray's own is 0644).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import ray

from segflow.errors import SegflowError
from segflow.job import CPU_ACTORS_PER_GPU, JobError


class ClusterError(SegflowError, ConnectionError):
    """The Ray cluster named by the user cannot be reached."""


def connect(address: str | None, *, probe_timeout: float = 5.0) -> None:
    """``None`` starts a local Ray; ``auto``, ``host:port`` or ``ray://host:port`` joins one.

    Token authentication stays on: Ray 2.60 enables it for ``ray start``, and the head, the
    workers and this driver must all run with ``RAY_AUTH_MODE=token``. Ray reads that
    variable when it is imported, so it has to be in the environment before the process
    imports ray (the ``segflow`` command sets it first thing); this function can only check.
    A named address is also probed first, because ``ray.init`` on an unreachable address
    retries for minutes before failing.
    """
    if ray.is_initialized():
        return
    if address is None:
        # "local": a new Ray of this process's own, even where a `ray start` cluster runs on
        # the machine (ray.init() would join that one, whose workers lack this process's
        # environment, its storage credentials for one).
        _create_private_token()
        with _single_machine():
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=False,
            )
        return
    if os.environ.get("RAY_AUTH_MODE") not in ("token", "disabled"):
        raise ClusterError(
            "connecting to a Ray cluster needs RAY_AUTH_MODE=token in the environment before "
            "Python starts (and the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
        )
    if address != "auto":
        _probe(address, probe_timeout)
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        raise ClusterError(f"cannot connect to Ray at {address!r}: {exc}") from exc


@contextlib.contextmanager
def _single_machine() -> Iterator[None]:
    """While a local Ray starts: its node IP stays 127.0.0.1, and every server it starts
    binds that (see the module docstring)."""
    from ray._private import ray_constants

    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster


def _create_private_token() -> None:
    """Where a new local Ray would create ``~/.ray/auth_token`` (token auth on, and no
    token given by RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or an existing file), create it
    first, with a random token readable by this user only; Ray then uses it."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & os.environ.keys():
        return
    path = Path.home() / ".ray" / "auth_token"
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, exist_ok=True)
    # Written whole under another name, then linked into place: a Ray starting meanwhile in
    # another process never reads a half-written token, and an existing one is kept.
    draft = path.with_name(f".auth_token.{secrets.token_hex(8)}")
    with open(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as Ray's own tokens
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()


def _probe(address: str, timeout: float) -> None:
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError as exc:
        raise ClusterError(f"Ray address {address!r} is not host:port: {exc}") from None
    if not host or not port:
        raise ClusterError(f"Ray address {address!r} is not 'auto', host:port or ray://host:port")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"Ray address {address!r} is unreachable: {exc}") from None


@dataclass(frozen=True)
class ActorPlan:
    """How many segmentation actors to start and what each reserves (a fraction of a GPU
    where actors share one)."""

    actors: int
    num_cpus: float
    num_gpus: float

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def plan_actors(
    shards: int | None,
    *,
    device: str = "auto",
    cpus_per_actor: float | None = None,
    actors_per_gpu: int = 1,
) -> ActorPlan:
    """``actors_per_gpu`` actors per GPU when the cluster has GPUs (and ``device`` allows),
    each holding ``1 / actors_per_gpu`` of a GPU and its node's CPUs divided by the node's
    GPUs and by ``actors_per_gpu``, unless ``cpus_per_actor`` says otherwise (its host work —
    decode, RLE, rows — is what keeps the GPU fed); else one actor per ``cpus_per_actor``
    CPUs (default 1), and ``actors_per_gpu`` above 1 is a :class:`JobError`. Never more
    actors than ``shards``, when given, and then no more on a GPU than the shards need.

    Co-located actors are separate processes, each with its own model on the GPU: a
    process's host work runs in threads, which its GIL stops scaling past a few CPUs, and
    N processes take N GILs. Ray does not split the GPU's memory: N models must fit.

    Actors fetch and decode in their own threads: there are no separate reader tasks that
    actors holding every CPU could starve (the hang seen with Ray Data's read stage).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = resources.get("CPU", 0)
    if device == "cuda" and not gpus:
        raise ClusterError("device 'cuda' was asked for but the Ray cluster has no GPUs")
    if gpus and device != "cpu":
        # Ray gives fractions of a GPU from one GPU before the next: fewer shards than
        # actors, each GPU shares between fewer actors, so that none is left idle.
        needed = actors_per_gpu if shards is None else max(1, -(-shards // gpus))
        sharing = min(actors_per_gpu, needed)
        per_actor = cpus_per_actor or _cpus_per_gpu() / sharing
        return ActorPlan(
            actors=_at_most(gpus * sharing, shards), num_cpus=per_actor, num_gpus=1 / sharing
        )
    if actors_per_gpu > 1:
        why = "--device is cpu" if device == "cpu" else "the Ray cluster has no GPUs"
        raise JobError(CPU_ACTORS_PER_GPU.format(n=actors_per_gpu, why=why))
    per_actor = cpus_per_actor or 1.0
    if cpus < per_actor:
        raise ClusterError(f"the Ray cluster has {cpus} CPUs; an actor needs {per_actor}")
    return ActorPlan(
        actors=_at_most(int(cpus // per_actor), shards), num_cpus=per_actor, num_gpus=0
    )


def _cpus_per_gpu() -> float:
    """A GPU node's CPUs over its GPUs, the fewest of any GPU node's (at least 1): what
    fits beside each GPU on every node. Not the cluster's CPUs over its GPUs: CPU-only
    nodes' CPUs are no GPU actor's, and counted in, they would ask of each GPU node more
    CPUs than it has, leaving actors that never start."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return max(1.0, min((n.get("CPU", 0) // n["GPU"] for n in nodes if n.get("GPU")), default=1))


def _at_most(actors: int, shards: int | None) -> int:
    return max(1, actors if shards is None else min(actors, shards))
