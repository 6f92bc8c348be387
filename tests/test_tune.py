"""The search: a real Tune + Optuna + ASHA run over Ray Train trials, resume, TensorBoard, job submit."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fvae import config as fconfig
from fvae.train import Config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def smoke_search(tiny_market, tmp_path_factory, ray_session):
    from fvae.tune import run_search

    exp = tmp_path_factory.mktemp("smoke_search")
    summary = run_search(data=tiny_market, space_path=SMOKE, num_samples=5, exp_dir=exp, seed=0)
    return exp, summary


def test_smoke_search_runs_trials_and_asha_stops_some(smoke_search):
    exp, summary = smoke_search
    trials = summary["trials"]
    assert len(trials) == 5 and all(t["status"] == "TERMINATED" for t in trials), trials
    assert all(1 <= t["epochs"] <= 2 for t in trials)
    assert summary["asha_stopped"] >= 1  # ASHA cut at least one trial after its first epoch
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials}) == 5  # TPE proposed 5 configs


def test_best_trial_has_the_highest_valid_rank_icir(smoke_search, tiny_market):
    exp, summary = smoke_search
    saved = json.loads((exp / "summary.json").read_text())
    best = saved["best"]
    finished = [t for t in saved["trials"] if t["valid_rank_icir"] is not None]
    top = max(t["valid_rank_icir"] for t in finished)
    assert best["valid_rank_icir"] == top
    assert best["trial_id"] == min(t["trial_id"] for t in finished if t["valid_rank_icir"] == top)
    assert set(best["test"]) >= {"ic", "icir", "rank_ic", "rank_icir"} and math.isfinite(best["test"]["rank_ic"])
    assert Path(best["checkpoint"]).is_file()
    # the best config re-runs with python -m fvae.train --config, and is the best trial's config
    cfg = fconfig.load(Config, path=exp / "best_config.yaml")
    for key, value in best["params"].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
    # the evaluation on test wrote predictions and metrics for the best trial
    metrics = json.loads((Path(exp) / "trials" / best["trial_id"] / "metrics.json").read_text())
    assert metrics["test"]["rank_ic"] == pytest.approx(best["test"]["rank_ic"])
    assert (exp / "trials.png").stat().st_size > 5000


def test_tensorboard_has_every_trial_with_hparams(smoke_search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    exp, summary = smoke_search
    for t in summary["trials"]:
        acc = EventAccumulator(str(exp / "trials" / t["trial_id"] / "tb"))
        acc.Reload()
        assert "valid/rank_icir" in acc.Tags()["scalars"], t["trial_id"]
        hp = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"])
        values = start.session_start_info.hparams
        assert values["model.hidden_size"].number_value == t["params"]["model.hidden_size"]
        assert values["model.gamma"].number_value == pytest.approx(t["params"]["model.gamma"])


def test_max_concurrent_from_resources():
    from fvae.tune import max_concurrent

    assert max_concurrent(cluster={"CPU": 4}, workers=1, cpus_per_worker=1, gpus_per_worker=0) == 3
    assert max_concurrent(cluster={"CPU": 16, "GPU": 1}, workers=1, cpus_per_worker=1, gpus_per_worker=0.25) == 4
    assert max_concurrent(cluster={"CPU": 16, "GPU": 8}, workers=2, cpus_per_worker=1, gpus_per_worker=1) == 4
    with pytest.raises(ValueError, match="fractional GPUs only for 1-worker trials"):
        max_concurrent(cluster={"GPU": 2}, workers=2, cpus_per_worker=1, gpus_per_worker=0.5)
    with pytest.raises(ValueError, match="one trial needs"):
        max_concurrent(cluster={"CPU": 1}, workers=2, cpus_per_worker=1, gpus_per_worker=0)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["RAY_AUTH_MODE"] = "disabled"  # the test cluster and its clients must agree
    env.pop("RAY_ADDRESS", None)
    return env


def test_resume_after_killing_the_driver(tiny_market, tmp_path):
    """kill -9 the driver (and its local cluster) mid-search; --resume keeps finished trials."""
    exp = tmp_path / "exp"
    cmd = [sys.executable, "-m", "fvae.tune", "--data", str(tiny_market), "--space", str(SMOKE),
           "--num-samples", "5", "--out", str(exp), "--num-cpus", "2", "--max-concurrent", "1"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    deadline = time.time() + 400
    finished: dict[str, float] = {}
    try:
        while time.time() < deadline:
            done = sorted((exp / "trials").glob("*/checkpoints/last/state.pt")) if (exp / "trials").exists() else []
            if len(done) >= 2 and proc.poll() is None:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("no trial finished within 400 s")
        time.sleep(3)  # let Tune persist the finished trials' results
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = json.loads(sorted((exp / "tune").glob("experiment_state-*.json"))[-1].read_text())
    before = {p.parent.parent.parent.name: p.stat().st_mtime
              for p in (exp / "trials").glob("*/checkpoints/last/state.pt")}
    assert before and state

    out = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((exp / "summary.json").read_text())
    ids = [t["trial_id"] for t in summary["trials"]]
    assert len(ids) == 5 and len(set(ids)) == 5
    # trials that had finished before the kill were not run again
    for tid, mtime in before.items():
        t = next(t for t in summary["trials"] if t["trial_id"] == tid)
        assert t["status"] == "TERMINATED"
        hist = json.loads((exp / "trials" / tid / "metrics.json").read_text())["history"] \
            if (exp / "trials" / tid / "metrics.json").exists() else None
        if hist is not None:
            assert len(hist) <= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_local_cluster(tiny_market, tmp_path):
    env = _env()
    gcs, dash = _free_port(), _free_port()
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={gcs}",
             "--node-ip-address=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--object-store-memory={200 * 1024 * 1024}", f"--temp-dir={tmp_path / 'ray'}"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
    try:
        exp = tmp_path / "exp"
        submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
                  f"--address=http://127.0.0.1:{dash}", "--", sys.executable, "-m", "fvae.tune",
                  "--data", str(tiny_market), "--space", str(SMOKE), "--num-samples", "4", "--out", str(exp)]
        out = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout.lower()
        summary = json.loads((exp / "summary.json").read_text())
        assert len(summary["trials"]) == 4 and summary["best"]["test"]["rank_ic"] is not None
    finally:
        _kill_matching(str(tmp_path / "ray"))


def _kill_matching(marker: str) -> None:
    """Stop only this test's Ray processes (``ray stop`` would stop every cluster on the machine)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
