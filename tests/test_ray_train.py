"""Data-parallel correctness: Ray Train with 2 CPU workers (gloo) against one process, and a worker
killed mid-run that Ray Train replaces, the run continuing from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fvae.data.loader import load_panel
from fvae.train import DEBUG_PRESET, load_config, load_state, run_ray, run_standalone

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

EPOCHS = 6
OVERRIDES = [*DEBUG_PRESET, f"train.epochs={EPOCHS}", "train.patience=0"]


@pytest.fixture(scope="module")
def ddp_run(tiny_market, tmp_path_factory, ray_session):
    """An uninterrupted run on 2 Ray Train workers: the reference of both tests."""
    out = tmp_path_factory.mktemp("ddp")
    run_ray(load_config(None, OVERRIDES), data=tiny_market, out=out, workers=2, gpu=False)
    return out, json.loads((out / "metrics.json").read_text())


def test_two_workers_match_one(tiny_market, tmp_path, ddp_run):
    single = run_standalone(load_config(None, OVERRIDES), data=tiny_market, out=tmp_path / "single")
    _, ddp = ddp_run
    n_valid = load_panel(tiny_market, "valid").num_days
    assert len(ddp["history"]) == len(single["history"]) == EPOCHS
    for a, b in zip(single["history"], ddp["history"]):
        # same global batches, the gradient of the same mean over days: equal up to float reduction order
        assert b["train_days"] == a["train_days"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-3)
        assert b["rank_steps_min"] == b["rank_steps_max"] == a["steps"]
        # validation metrics are all-reduced over every validation day, not rank 0's share
        assert b["valid_days_covered"] == n_valid
        assert b["valid_rank_ic"] == pytest.approx(a["valid_rank_ic"], abs=2e-3)
    assert ddp["test"]["rank_ic"] == pytest.approx(single["test"]["rank_ic"], abs=5e-3)


def _train_workers(dashboard: str, driver_pid: int) -> list[int]:
    """PIDs of the live Ray Train workers of the job whose driver is ``driver_pid`` (State API)."""
    from ray.util.state import list_actors, list_jobs

    jobs = {j.job_id for j in list_jobs(address=dashboard)
            if j.driver_info is not None and str(j.driver_info.pid) == str(driver_pid)}
    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         limit=1000)
    return sorted(a.pid for a in actors if a.job_id in jobs and a.pid)


def _checkpointed_epoch(out: Path) -> int:
    """The last epoch in ``out``'s checkpoint (-1: none yet)."""
    f = out / "checkpoints" / "last" / "state.pt"
    try:
        return load_state(f)["epoch"] if f.is_file() else -1
    except (EOFError, RuntimeError):  # replaced while being read
        return -1


def test_a_killed_worker_is_replaced_and_the_run_resumes(tiny_market, tmp_path, ray_cluster, ddp_run,
                                                         registered_epoch):
    """SIGKILL one of the two workers of ``fvae.train --workers 2`` once Ray Train holds a checkpoint:
    Ray Train starts a new worker group, which continues from the last checkpoint. The run ends with
    every epoch, its history says where it resumed (not at 0), and it matches the run that was
    never interrupted bit for bit."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fvae.train", "--data", str(tiny_market), "--out", str(out),
           *[a for o in OVERRIDES for a in ("--set", o)], "--workers", "2", "--max-failures", "1",
           "--address", ray_cluster["address"]]
    log_path = tmp_path / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 400
        workers: list[int] = []
        while len(workers) < 2 or registered_epoch(out / "ray" / "train") < 0:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 400 s"
            if len(workers) < 2:
                workers = _train_workers(ray_cluster["dashboard"], proc.pid)
            time.sleep(0.1)
        registered = registered_epoch(out / "ray" / "train")
        os.kill(workers[-1], signal.SIGKILL)
        on_disk = _checkpointed_epoch(out)  # the other rank may still write one more before it fails
        assert on_disk < EPOCHS - 1, "the run had finished before the kill"
        assert proc.wait(timeout=400) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    # the new group began after the last checkpoint written (the run folder's, when Ray Train had not
    # yet taken it in): not before the one on disk at the kill, at most one later
    resumed = history[-1]["start_epoch"]
    assert registered + 1 <= on_disk + 1 <= resumed <= on_disk + 2, (registered, on_disk, resumed)
    assert [h["start_epoch"] for h in history] == [0] * resumed + [resumed] * (EPOCHS - resumed)
    assert "resuming from the checkpoint after epoch" in log_path.read_text()
    # bit-identical to the uninterrupted run: every rank's RNG state is in the checkpoint
    ref_dir, ref = ddp_run
    for key in ("loss", "nll", "kl", "valid_rank_ic", "valid_rank_icir"):
        assert [h[key] for h in history] == [h[key] for h in ref["history"]], key
    best, ref_best = torch.load(out / "best.pt")["model"], torch.load(ref_dir / "best.pt")["model"]
    assert all(torch.equal(best[k], ref_best[k]) for k in ref_best)
