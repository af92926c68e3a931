"""The local Ray that ``segflow segment`` starts by default (``workers.cluster.connect(None)``)
listens on loopback only, and the token it authenticates with is its user's alone.

Real Ray, started as the command starts it in a process of its own under a temporary HOME;
the listening sockets are read from /proc (``/proc/net/tcp``, ``/proc/net/tcp6``) and mapped
to Ray's processes (that process and its descendants) through their file descriptors.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LISTEN = "0A"
# Ray's processes that serve something; each must be seen listening before the check.
SERVERS = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::Probe")


# Run in a process of its own: Ray keeps the first token it reads for the life of the
# process, so one started here after other tests' Rays would present theirs.
_LOCAL_RAY = """
import json, sys, time
import ray
from tests import test_listen as t
from workers.cluster import connect
connect(None)
actor = t.probe_pid()
deadline = time.monotonic() + 120
while True:  # the agents start in the background: wait until every server listens
    listening = t.listening_sockets(t.ray_processes())
    missing = [s for s in t.SERVERS if s not in {name for name, _ in listening.values()}]
    if not missing or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"actor": actor, "missing": missing, "listening": listening}))
ray.shutdown()
"""


@pytest.fixture(scope="module")
def fresh_ray(tmp_path_factory) -> tuple[Path, dict]:
    """A local Ray started by ``connect(None)`` with HOME in a temporary folder: the HOME,
    and the Probe actor's pid, the servers not seen listening and who listens where."""
    home = tmp_path_factory.mktemp("home")
    done = subprocess.run(
        [sys.executable, "-c", _LOCAL_RAY],
        env={**os.environ, "HOME": str(home)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return home, json.loads(done.stdout.splitlines()[-1])


def probe_pid() -> int:
    """Start an actor (its process is ``ray::Probe``); its pid."""
    import ray

    class Probe:
        def pid(self) -> int:
            return os.getpid()

    return ray.get(ray.remote(Probe).remote().pid.remote())


def test_the_token_it_creates_is_readable_by_its_user_only(fresh_ray):
    home, seen = fresh_ray
    token = home / ".ray" / "auth_token"
    assert seen["actor"]  # the cluster authenticates with it
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) & 0o077 == 0
    assert len(token.read_text()) == 64
    assert [path.name for path in token.parent.iterdir()] == ["auth_token"]  # no draft left


def test_every_socket_of_the_local_ray_listens_on_loopback_only(fresh_ray):
    _, seen = fresh_ray
    assert seen["missing"] == [], f"not seen listening: {seen['missing']}"
    assert str(seen["actor"]) in seen["listening"]
    exposed = [
        f"{name} (pid {pid}) on {address}"
        for pid, (name, addresses) in seen["listening"].items()
        for address in addresses
        if not is_loopback(address)
    ]
    assert exposed == []


def ray_processes() -> set[int]:
    """This process (Ray's driver) and its descendants: GCS, raylet, agents, workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            parent = int(stat_line.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def listening_sockets(pids: set[int]) -> dict[int, tuple[str, list[str]]]:
    """``pid -> (process name, addresses it listens on)`` for the ``pids`` that listen."""
    listeners: dict[str, str] = {}  # socket inode -> "address:port"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN:
                address, port = local.split(":")
                listeners[inode] = f"{decode_address(address)}:{int(port, 16)}"
    result = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
        except OSError:
            continue
        addresses = []
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listeners:
                addresses.append(listeners[target[8:-1]])
        if addresses:
            result[pid] = (Path(name).name, addresses)
    return result


def decode_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6} write an address as 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_the_proc_decoding_reads_loopback_and_wildcard_addresses():
    assert str(decode_address("0100007F")) == "127.0.0.1"
    mapped = decode_address("0000000000000000FFFF00000100007F")
    assert mapped == ipaddress.ip_address("::ffff:127.0.0.1")
    assert is_loopback("::ffff:127.0.0.1:80") and is_loopback("::1:80")
    assert not is_loopback(f"{decode_address('00000000')}:80")
    assert not is_loopback(f"{decode_address('0' * 32)}:80")
