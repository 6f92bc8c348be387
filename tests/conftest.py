"""Shared fixtures: tiny synthetic markets and one real Ray cluster for the whole run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fvae.data.synthetic import SyntheticConfig, write_synthetic

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Ray 2.60 turns token authentication on for clusters that ray.init() starts; the test
# cluster, its drivers and `ray job submit` must agree, so every process here runs without it.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory) -> Path:
    """60 stocks x 300 days, T = 20: trains in seconds."""
    out = tmp_path_factory.mktemp("tiny_market")
    write_synthetic(out, SyntheticConfig(stocks=60, days=300, seed=1))
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on this machine, started with ``ray start --head`` by ``fvae.ray_local``
    (what fvae.train and fvae.tune start without --address): 4 logical CPUs, a bounded object
    store, the dashboard (job server and State API) on loopback; start-up is retried and given
    time on a loaded machine, and a watchdog stops the cluster if pytest is killed.

    One cluster serves every test: with two Ray instances on a machine, Ray Train's
    placement-group cleaner cannot tell which to query and stopped trials leak resources.
    """
    pytest.importorskip("ray")
    from fvae import ray_local

    try:
        cluster = ray_local.start(num_cpus=4, object_store_mb=200)
    except ray_local.RayStartError as e:
        pytest.fail(str(e))
    import ray

    info = {"address": cluster.address, "dashboard": cluster.dashboard, "temp": str(cluster.temp_dir)}
    # every driver the tests start (and their Ray Train workers) query this cluster's State API
    os.environ["RAY_API_SERVER_ADDRESS"] = info["dashboard"]
    yield info
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    ray_local.stop(cluster)


def _registered_epoch(storage: Path) -> int:
    """The last epoch whose checkpoint Ray Train has registered for the run stored in ``storage``
    (-1: none yet), from the snapshot its controller keeps there. The controller takes a worker's
    report some time after the worker wrote the checkpoint (it polls every 2 s); a worker killed
    before then loses the report, so tests that kill a worker wait for this first."""
    import json

    try:
        latest = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, ValueError, KeyError):
        return -1
    return int(latest["metrics"]["epoch"]) if latest else -1


@pytest.fixture(scope="session")
def registered_epoch():
    """``registered_epoch(storage)``: the last epoch Ray Train has registered a checkpoint of."""
    return _registered_epoch


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This test process connected as a driver to the shared cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": ray_cluster["dashboard"]}})
    yield ray
