"""Shared pytest fixtures: the real-data folder ../shared/data and a session-wide phantom cache."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real slides and annotations in ../shared/data; tests that need them skip when the folder is absent."""
    if not (SHARED_DATA / "CMU-1-Small-Region.svs").exists():
        pytest.skip(f"real test data not found at {SHARED_DATA} (only present beside the project checkout)")
    return SHARED_DATA
