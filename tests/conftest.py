"""Shared fixtures. Real data and models come from ``../shared`` (override: SEGFLOW_SHARED)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Ray reads its auth mode when imported; the tests, like the segflow command, keep token
# authentication on for every Ray they start or join.
os.environ.setdefault("RAY_AUTH_MODE", "token")


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


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """A real S3 endpoint (moto server) on loopback, and the standard AWS variables that
    point boto/s3fs at it. Tests pass these to subprocesses or set them with monkeypatch."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    finally:
        server.terminate()
        server.wait(timeout=10)


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
