"""Suite-wide fixtures: where the optional real datasets live.

The real datasets sit in `shared/data` beside the checkout (CI has them); tests that need them
skip with a reason where they are absent. `D3CODEC_SHARED_DATA` overrides the location.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_path() -> Path:
    """`../shared/data` relative to the repository root, or $D3CODEC_SHARED_DATA."""
    return Path(os.environ.get("D3CODEC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared real datasets folder; skips the test where it is absent."""
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"shared datasets ({path}) are not on this machine")
    return path
