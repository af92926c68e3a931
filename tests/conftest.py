"""Shared fixtures. Real data and models come from ``../shared`` (override: SEGFLOW_SHARED)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    return Path(os.environ.get("SEGFLOW_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    root = shared_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"shared data not found at {root} (set SEGFLOW_SHARED)")
    return root
