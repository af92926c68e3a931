"""Keeping freed memory: the page faults of reusing a freed block, with and without it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from segflow.allocator import MMAP_THRESHOLD

# Each process allocates and touches three blocks of 24 MiB, then frees them (the activations
# of a forward pass, in small), ten times, and reports the minor page faults of the last nine
# cycles (the first faults either way).
_CYCLES = """
import json, resource, sys
import numpy as np
from segflow.allocator import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == "retain" else None
def cycle():
    blocks = [np.empty(24 * 2**20, dtype=np.uint8) for _ in range(3)]
    for block in blocks:
        block.fill(1)
    del blocks
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    cycle()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"retained": retained, "faults": faults}))
"""


def _cycles(mode: str) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True, check=True
    )
    return json.loads(output.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    block_pages = 24 * 2**20 // 4096
    assert MMAP_THRESHOLD > 24 * 2**20
    default = _cycles("default")
    retained = _cycles("retain")
    assert retained["retained"] is True
    # glibc's defaults give the freed heap back to the kernel, and later cycles fault it in.
    assert default["faults"] > block_pages, default
    assert retained["faults"] < block_pages // 100, retained
