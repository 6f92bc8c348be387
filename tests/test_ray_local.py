"""fvae.ray_local: a local cluster's start-up that fails is retried, then said in one line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fvae import ray_local

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_a_start_that_fails_is_retried_then_said_in_one_line(monkeypatch):
    """A real `ray start --head` that cannot start (its GCS port is taken): each try is cleaned up
    (no temp dir, no watchdog left), and the error is one line that says what to do."""
    spawn, watchdogs = ray_local._spawn_watchdog, []

    def watched(owner: int, temp: Path):  # the real watchdog, remembered
        watchdogs.append(spawn(owner, temp))
        return watchdogs[-1]

    monkeypatch.setattr(ray_local, "_spawn_watchdog", watched)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        monkeypatch.setattr(ray_local, "_free_port", lambda: taken.getsockname()[1])
        with pytest.raises(ray_local.RayStartError) as e:
            ray_local.start(num_cpus=1, tries=2)
    msg = str(e.value)
    assert "\n" not in msg and "try 1" in msg and "try 2" in msg and "--address HOST:PORT" in msg, msg
    assert len(watchdogs) == 2 and all(w.poll() is not None for w in watchdogs)
    assert not [w.args[-1] for w in watchdogs if Path(w.args[-1]).exists()]  # each try's temp dir is gone


def test_the_cluster_outlasts_a_starved_raylet(ray_cluster, monkeypatch):
    """Every process of a started cluster (its GCS included, which runs the health checks) has Ray's
    liveness checks stretched: the GCS marks a raylet dead only after minutes without an answer,
    not Ray's ~1 min, which a loaded machine can exceed (the raylet then exits and takes the
    connected drivers with it). A setting the user has made is kept."""
    gcs = [p for p in ray_local.processes(Path(ray_cluster["temp"])) if "gcs_server" in p.name()]
    assert gcs, "no GCS process found for the test cluster"
    env = gcs[0].environ()
    for key, value in ray_local._LIVENESS.items():
        assert env.get(key) == value, (key, env.get(key))
    # Ray's defaults: 10 s per check, 5 misses; stretched to at least 5 minutes in all
    assert int(env["RAY_health_check_timeout_ms"]) * int(env["RAY_health_check_failure_threshold"]) >= 300_000
    monkeypatch.setenv("RAY_health_check_failure_threshold", "99")
    assert ray_local._start_env(Path("/tmp/x"), 60)["RAY_health_check_failure_threshold"] == "99"


def test_stop_leaves_no_process_of_the_cluster():
    """``stop`` ends every process of a cluster, also Ray's agents, whose renamed command line
    (``ray::DashboardAgent``) can hide the marker in their environment: they are found as the
    raylet's descendants, and stay on the list once their raylet is gone."""
    import time

    import psutil

    cluster = ray_local.start(num_cpus=1, object_store_mb=100)
    try:
        deadline = time.monotonic() + 120
        while True:  # the raylet starts its agents after `ray start` has returned
            names = {p.pid: p.name() for p in ray_local.processes(cluster.temp_dir)}
            agents = [pid for pid, n in names.items() if "Agent" in n]
            if len(agents) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len(agents) >= 2, names  # the DashboardAgent and the RuntimeEnvAgent
        seen = [psutil.Process(pid) for pid in names]
    finally:
        ray_local.stop(cluster)
    time.sleep(1)
    left = [(p.pid, names[p.pid]) for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left
    assert not cluster.temp_dir.exists()
