"""The search: a real Tune + Optuna + ASHA run over Ray Train trials, resume, TensorBoard, job submit."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fvae import config as fconfig
from fvae.space import load_space
from fvae.train import Config, load_state

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
    # smoke.yaml: 2 epochs, patience 2, so no trial can stop itself; a 1-epoch trial was cut by ASHA
    assert summary["patience_stopped"] == 0
    assert all(t["ended"] == ("completed" if t["epochs"] == 2 else "asha") for t in trials), trials
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


def test_choose_best_follows_the_mode():
    from fvae.tune import best_epoch, choose_best

    trials = [{"trial_id": "a", "value": 0.3, "status": "TERMINATED"},
              {"trial_id": "b", "value": 0.1, "status": "TERMINATED"},
              {"trial_id": "c", "value": math.nan, "status": "TERMINATED"},
              {"trial_id": "d", "value": 0.1, "status": "TERMINATED"},
              {"trial_id": "e", "value": -5.0, "status": "ERROR"},  # a failed trial never wins
              {"trial_id": "f", "value": 0.3, "status": "TERMINATED"}]
    assert choose_best(trials, mode="min")["trial_id"] == "b"  # lowest; the tie with d goes to the lower id
    assert choose_best(trials, mode="max")["trial_id"] == "a"
    assert choose_best(trials[2:3], mode="max") is None
    assert best_epoch([0.5, math.nan, 0.2, 0.4], "min") == 0.2
    assert best_epoch([0.5, None, 0.2, 0.7], "max") == 0.7
    assert math.isnan(best_epoch([math.nan], "max"))


def test_mode_min_search_picks_the_lowest_value(tiny_market, tmp_path, ray_session, capsys):
    """A real 2-trial search on ``metric: nll, mode: min``: every trial's value is the lowest nll of the
    epochs it reported, and the best trial is the one with the lowest value."""
    from fvae.train import load_state
    from fvae.tune import run_search

    space = tmp_path / "min_nll.yaml"
    space.write_text(
        "metric: nll\nmode: min\n"
        "params:\n"
        "  train.lr: {type: categorical, choices: [1.0e-3, 3.0e-3]}\n"
        "  model.num_factors: {type: categorical, choices: [2, 4]}\n"
        "fixed:\n"
        "  model.hidden_size: 8\n  model.attn_heads: 1\n  model.gat_layers: 0\n  model.num_portfolios: 4\n"
        "  train.epochs: 2\n  train.patience: 2\n  data.batch_days: 16\n")
    summary = run_search(data=tiny_market, space_path=space, num_samples=2, exp_dir=tmp_path / "exp", seed=0)
    assert (summary["metric"], summary["mode"]) == ("nll", "min")
    saved = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert (saved["metric"], saved["mode"]) == ("nll", "min")
    trials = saved["trials"]
    assert len(trials) == 2 and all(t["status"] == "TERMINATED" for t in trials), trials
    for t in trials:  # a trial ASHA cut may have finished one more epoch than Tune recorded: compare those Tune saw
        history = load_state(Path(t["run_dir"]) / "checkpoints" / "last")["history"][: t["epochs"]]
        assert t["value"] == pytest.approx(min(h["nll"] for h in history))
    lowest = min(t["value"] for t in trials)
    best = saved["best"]
    assert best["value"] == lowest
    assert best["trial_id"] == min(t["trial_id"] for t in trials if t["value"] == lowest)
    assert "valid_rank_icir" in best  # still recorded, whatever the metric
    assert "(min nll): nll" in capsys.readouterr().out
    assert (tmp_path / "exp" / "trials.png").stat().st_size > 5000


def test_more_concurrent_trials_than_fit_warns():
    from fvae.tune import plan_concurrency

    assert plan_concurrency(cluster={"CPU": 4}, requested=None, workers=1, cpus_per_worker=1,
                            gpus_per_worker=0) == (3, None)
    assert plan_concurrency(cluster={"CPU": 4}, requested=2, workers=1, cpus_per_worker=1,
                            gpus_per_worker=0) == (2, None)
    n, warning = plan_concurrency(cluster={"CPU": 2}, requested=2, workers=1, cpus_per_worker=1, gpus_per_worker=0)
    assert n == 2 and "--max-concurrent 2, but the cluster fits 1 trials" in warning
    n, warning = plan_concurrency(cluster={"CPU": 16}, requested=2, workers=1, cpus_per_worker=1, gpus_per_worker=1)
    assert n == 2 and "fits 0 trials" in warning  # no GPU yet: an autoscaler may add one


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
    env = dict(os.environ)  # conftest set RAY_AUTH_MODE=disabled: the cluster and clients agree
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_resume_after_killing_the_driver(tiny_market, tmp_path, ray_cluster):
    """kill -9 the search's driver mid-search; --resume keeps the trials that had finished."""
    exp = tmp_path / "exp"
    cmd = [sys.executable, "-m", "fvae.tune", "--data", str(tiny_market), "--space", str(SMOKE),
           "--num-samples", "5", "--out", str(exp), "--max-concurrent", "1",
           "--address", ray_cluster["address"]]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    deadline = time.time() + 400
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
    assert state

    def files(tid: str) -> dict[str, tuple[float, str]]:
        run = exp / "trials" / tid
        paths = [run / "checkpoints" / "last" / "state.pt", run / "metrics.json"]
        return {p.name: (p.stat().st_mtime, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths if p.exists()}

    # the trials that had finished all their epochs before the kill, with their files as they were
    epochs = load_space(SMOKE).fixed["train.epochs"]
    finished = {p.parent.parent.parent.name for p in (exp / "trials").glob("*/checkpoints/last/state.pt")
                if load_state(p)["epoch"] + 1 == epochs}
    before = {tid: files(tid) for tid in finished}
    assert before, "no trial had finished before the kill"

    out = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((exp / "summary.json").read_text())
    ids = [t["trial_id"] for t in summary["trials"]]
    assert len(ids) == 5 and len(set(ids)) == 5
    # trials that had finished before the kill were not trained again: their checkpoint is the same
    # file (mtime and content), and their metrics.json says the same (a trial Tune had not yet
    # recorded as done may write it again on restore, from the same weights; the best trial's is
    # rewritten by the summary with its test predictions)
    for tid, was in before.items():
        t = next(t for t in summary["trials"] if t["trial_id"] == tid)
        assert t["status"] == "TERMINATED"
        now = files(tid)
        assert now["state.pt"] == was["state.pt"], tid
        if "metrics.json" in was and tid != summary["best"]["trial_id"]:
            assert now["metrics.json"][1] == was["metrics.json"][1], tid


def test_ray_job_submit_against_a_local_cluster(tiny_market, tmp_path, ray_cluster):
    """`ray job submit -- python -m fvae.tune ...` against the `ray start --head` cluster."""
    exp = tmp_path / "exp"
    submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
              f"--address={ray_cluster['dashboard']}", "--", sys.executable, "-m", "fvae.tune",
              "--data", str(tiny_market), "--space", str(SMOKE), "--num-samples", "4", "--out", str(exp)]
    out = subprocess.run(submit, capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout.lower()
    summary = json.loads((exp / "summary.json").read_text())
    assert len(summary["trials"]) == 4 and summary["best"]["test"]["rank_ic"] is not None


def test_failed_trials_are_recorded_and_the_search_goes_on(tiny_market, tmp_path, ray_session):
    """A trial whose loss blows up (lr 1e6, no clipping: most steps non-finite, so the loop raises)
    is recorded as failed, with its error; the other trials finish and the best is chosen among them."""
    from fvae.tune import run_search

    space = tmp_path / "explode.yaml"
    space.write_text(
        "metric: valid_rank_icir\n"
        "params:\n"
        "  train.lr: {type: categorical, choices: [1.0e-3, 1.0e+6]}\n"
        "fixed:\n"
        "  model.hidden_size: 8\n  model.attn_heads: 1\n  model.gat_layers: 0\n  model.num_factors: 2\n  model.num_portfolios: 4\n"
        "  train.epochs: 1\n  train.grad_clip: 0.0\n  data.batch_days: 16\n")
    summary = run_search(data=tiny_market, space_path=space, num_samples=4, exp_dir=tmp_path / "exp", seed=0)
    status = {t["trial_id"]: (t["status"], t["params"]["train.lr"], t["error"]) for t in summary["trials"]}
    failed = [v for v in status.values() if v[0] == "ERROR"]
    ok = [v for v in status.values() if v[0] == "TERMINATED"]
    assert failed and ok, status
    assert all(v[1] == 1e6 for v in failed) and all(v[1] == 1e-3 for v in ok)
    assert all(v[2] for v in failed)  # the error text is kept
    assert len(status) == 4 and all((tmp_path / "exp" / "trials" / tid).is_dir() for tid in status)
    assert summary["best"]["params"]["train.lr"] == 1e-3
