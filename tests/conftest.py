"""Shared fixtures: paths to the repository and to the real IXI sample beside it."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IXI_SAMPLE = REPO.parent / "shared" / "data" / "ixi_sample"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ixi_sample() -> Path:
    if not IXI_SAMPLE.is_dir():
        pytest.skip(f"real IXI sample not found at {IXI_SAMPLE}")
    return IXI_SAMPLE
