"""Shared fixtures: tiny synthetic markets and one real Ray cluster for the whole run."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(marker: str) -> None:
    """Stop the processes whose command line holds ``marker``, and their children.

    ``ray stop`` would stop every Ray cluster on the machine, not only the test's.
    """
    import psutil

    victims = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                victims += [p, *p.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in victims:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


START_TRIES = 3  # a loaded machine can make the raylet miss Ray's fixed 30 s registration window


def _start_head() -> tuple[subprocess.CompletedProcess, str, int, int]:
    """``ray start --head`` on fresh ports and a fresh temp dir, retried: on a machine whose load is
    several times its core count, a start can fail with "node timed out during startup" (Ray's
    30 s wait for the raylet is hard-coded), and one failed start must not error every Ray test."""
    errors = []
    for attempt in range(1, START_TRIES + 1):
        temp = tempfile.mkdtemp(prefix="fvray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        gcs, dash, client = _free_port(), _free_port(), _free_port()
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={gcs}",
               "--num-cpus=4", f"--object-store-memory={200 * 1024 * 1024}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
               f"--temp-dir={temp}", "--disable-usage-stats"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            if out.returncode == 0:
                return out, temp, gcs, dash
            errors.append(f"try {attempt}: exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
        except subprocess.TimeoutExpired:
            errors.append(f"try {attempt}: no answer in 240 s")
        kill_tree(temp)
        shutil.rmtree(temp, ignore_errors=True)
        time.sleep(5 * attempt)
    pytest.fail(f"ray start --head failed {START_TRIES} times: {'; '.join(map(str, errors))}")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on this machine, started with ``ray start --head``: 4 logical CPUs,
    a bounded object store, the dashboard (job server and State API) on loopback.

    One cluster serves every test: with two Ray instances on a machine, Ray Train's
    placement-group cleaner cannot tell which to query and stopped trials leak resources.
    """
    pytest.importorskip("ray")
    out, temp, gcs, dash = _start_head()
    import ray

    address = None
    for line in out.stdout.splitlines() + out.stderr.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # ray colours its output
        if "ray start --address=" in line:
            address = line.split("--address=")[1].split()[0].strip("'\"")
    address = address or f"127.0.0.1:{gcs}"
    info = {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "temp": temp}
    # every driver the tests start (and their Ray Train workers) query this cluster's State API
    os.environ["RAY_API_SERVER_ADDRESS"] = info["dashboard"]
    yield info
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    kill_tree(temp)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This test process connected as a driver to the shared cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": ray_cluster["dashboard"]}})
    yield ray
