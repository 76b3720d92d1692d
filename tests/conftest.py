"""Test set-up: one persistent JAX compilation cache for the whole run (and for the CLI
subprocesses the tests start; one per xdist worker), so each grid shape compiles once; every
test seeded."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

CACHE = Path(__file__).resolve().parent.parent / ".jax_cache"
os.environ.setdefault("VBSEG_JAX_CACHE", str(CACHE))
# Under pytest-xdist (`pytest -n 2`) every worker keeps its own cache folder: JAX writes a
# cache entry in place, so a worker could otherwise read another's half-written entry.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["VBSEG_JAX_CACHE"] = str(Path(os.environ["VBSEG_JAX_CACHE"]) / WORKER)

from vbseg.runtime import enable_compilation_cache  # noqa: E402

enable_compilation_cache(os.environ["VBSEG_JAX_CACHE"])

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data when present; skips (with the reason) when absent."""
    if not (SHARED_DATA / "cases.json").exists():
        pytest.skip(f"real scans not found at {SHARED_DATA} "
                    "(the shared data folder beside the checkout; see README, Tests)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data_optional():
    """../shared/data when present, else None (for tests that only narrow what they check)."""
    return SHARED_DATA if (SHARED_DATA / "cases.json").exists() else None
