"""Shared fixtures: tiny synthetic markets and one Ray session for the whole run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fvae.data.synthetic import SyntheticConfig, write_synthetic

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory) -> Path:
    """60 stocks x 300 days, T = 20: trains in seconds."""
    out = tmp_path_factory.mktemp("tiny_market")
    write_synthetic(out, SyntheticConfig(stocks=60, days=300, seed=1))
    return out


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster, started once: explicit CPUs and a bounded object store."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, object_store_memory=200 * 1024 * 1024,
                 include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()
