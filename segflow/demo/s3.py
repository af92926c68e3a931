"""An S3-compatible endpoint on loopback (moto's server), for the demo and the tests: the
same ``s3://`` code paths as production, with nothing leaving the machine."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def local_s3(startup_timeout: float = 30.0) -> Iterator[dict[str, str]]:
    """Start a moto S3 server on 127.0.0.1 and yield the standard AWS variables that point
    boto and s3fs at it (give them to ``os.environ`` or to subprocesses); stop it on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError as exc:
        raise RuntimeError(f"cannot start moto's S3 server: {exc}") from exc
    try:
        wait_for_port(port, startup_timeout, server)
        yield {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    finally:
        server.terminate()
        server.wait(timeout=10)


def wait_for_port(
    port: int, timeout: float = 30.0, process: subprocess.Popen | None = None
) -> None:
    """Until something listens on 127.0.0.1:``port``; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} ... exited with status {process.returncode} before "
                f"listening on 127.0.0.1:{port} (moto's server needs moto[server]: "
                "pip install 'segflow[demo]')"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
