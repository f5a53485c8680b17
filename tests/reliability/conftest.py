"""Fixtures of the reliability suite."""
from pathlib import Path

import pytest
from reliability_helpers import make_cohort


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """The tiny 16^3 cohort of both bundles (read-only for tests)."""
    return make_cohort(tmp_path_factory.mktemp("cohort"))
