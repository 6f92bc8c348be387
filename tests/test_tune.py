"""The search: a real Tune + Optuna + ASHA run over Ray Train trials, resume, TensorBoard, job submit."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
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


def test_trials_map_the_cached_panel_and_record_their_fixed_cost(smoke_search):
    """The driver fills the panel cache before the trials start, so every trial (5, packed on 4
    CPUs) maps the one copy and none parses the Parquet; each records where its time went."""
    _, summary = smoke_search
    for t in summary["trials"]:
        timings = json.loads((Path(t["run_dir"]) / "timings.json").read_text())
        assert timings["data_source"] == "cache", (t["trial_id"], timings)
        assert 0 <= timings["data_load_s"] < 30 and timings["start_s"] >= 0
        if t["ended"] == "completed":  # ASHA kills a stopped trial before it records its end
            assert timings["trial_s"] >= timings["epochs_s"] + timings["data_load_s"] > 0


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


def _study_trials(exp: Path, summary: dict) -> dict:
    """The study in EXP_DIR/optuna.db, opened as a user would, by Tune trial id."""
    import optuna

    from fvae.study import TRIAL_ID_ATTR

    study = optuna.load_study(study_name=summary["study"]["name"], storage=f"sqlite:///{exp / 'optuna.db'}")
    by_id: dict = {}
    for t in study.trials:  # a trial asked just before a kill may not carry its id yet: None (its note says why)
        by_id.setdefault(t.user_attrs.get(TRIAL_ID_ATTR), []).append(t)
    return {"study": study, "by_id": by_id}


def test_the_study_is_kept_in_optuna_db(smoke_search):
    """The search's own Optuna study: one trial per Tune trial, with the summary's params, its value
    (the best epoch's) and one intermediate value per epoch; the best trial is the summary's."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    exp, _ = smoke_search
    saved = json.loads((exp / "summary.json").read_text())
    assert saved["study"]["name"] == "smoke" and saved["study"]["file"] == "optuna.db"
    got = _study_trials(exp, saved)
    study, by_id = got["study"], got["by_id"]
    assert study.direction.name == "MAXIMIZE" and study.user_attrs["metric"] == "valid_rank_icir"
    assert len(study.trials) == 5 and sorted(by_id) == sorted(t["trial_id"] for t in saved["trials"])
    for t in saved["trials"]:
        (ot,) = by_id[t["trial_id"]]
        assert ot.state == TrialState.COMPLETE
        assert ot.value == pytest.approx(t["value"], abs=1e-9)
        assert len(ot.intermediate_values) == t["epochs"]
        searched = {k: v for k, v in t["params"].items() if k not in load_space(SMOKE).fixed}
        assert ot.params.keys() == searched.keys()
        for k, v in searched.items():
            assert ot.params[k] == pytest.approx(v)
    # the real distributions, not ones guessed from the values
    gamma = study.trials[0].distributions["model.gamma"]
    assert isinstance(gamma, FloatDistribution) and gamma.log and (gamma.low, gamma.high) == (0.3, 3.0)
    assert study.best_trial.user_attrs["ray_trial_id"] == saved["best"]["trial_id"]
    assert study.best_value == pytest.approx(saved["best"]["value"])


def test_the_report_ranks_parameters_on_the_study(smoke_search):
    from fvae import report

    exp, _ = smoke_search
    summary = json.loads((exp / "summary.json").read_text())
    imp, method = report.param_importance(summary, exp_dir=exp)
    assert "EXP_DIR/optuna.db" in method and abs(sum(imp.values()) - 1) < 1e-6
    assert set(imp) <= {"model.hidden_size", "model.num_factors", "model.num_portfolios", "model.gat_layers",
                        "model.gamma", "train.lr"}


def test_optuna_dashboard_serves_the_study(smoke_search):
    """What `optuna-dashboard sqlite:///EXP_DIR/optuna.db` serves: its WSGI app's API on the study."""
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install -e '.[dev]')")
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    exp, _ = smoke_search
    app = wsgi(f"sqlite:///{exp / 'optuna.db'}")

    def get(path: str) -> dict:
        env: dict = {"PATH_INFO": path}
        setup_testing_defaults(env)
        status: list = []
        body = b"".join(app(env, lambda s, h, exc_info=None: status.append(s)))
        assert status[0].startswith("200"), (path, status)
        return json.loads(body)

    studies = get("/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["smoke"]
    detail = get(f"/api/studies/{studies[0]['study_id']}")
    assert len(detail["trials"]) == 5 and all(t["state"] == "Complete" for t in detail["trials"])


def test_a_folder_with_a_study_is_not_searched_again(tiny_market, tmp_path, ray_session):
    from fvae.tune import run_search

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "optuna.db").write_bytes(b"")
    with pytest.raises(FileExistsError, match="already holds a search"):
        run_search(data=tiny_market, space_path=SMOKE, num_samples=1, exp_dir=tmp_path / "exp")


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
    study = _study_trials(tmp_path / "exp", saved)
    assert study["study"].direction.name == "MINIMIZE"
    assert {tid: ts[0].value for tid, ts in study["by_id"].items()} == pytest.approx(
        {t["trial_id"]: t["value"] for t in trials})
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


def test_ray_job_submit_against_a_local_cluster(tiny_market, tmp_path, ray_cluster):
    """`ray job submit -- python -m fvae.tune ...` against the `ray start --head` cluster."""
    exp = tmp_path / "exp"
    submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
              f"--address={ray_cluster['dashboard']}", "--", sys.executable, "-m", "fvae.tune",
              "--data", str(tiny_market), "--space", str(SMOKE), "--num-samples", "4", "--out", str(exp)]
    for attempt in range(4):
        out = subprocess.run(submit, capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
        # on a loaded machine the head's job agent can come up after its dashboard; the job
        # server then refuses the submission (nothing has started), and a later one is taken
        if "No available agent to submit job" not in out.stderr:
            break
        time.sleep(15 * (attempt + 1))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout.lower()
    summary = json.loads((exp / "summary.json").read_text())
    assert len(summary["trials"]) == 4 and summary["best"]["test"]["rank_ic"] is not None


def _trial_files(exp: Path, space: Path = SMOKE) -> dict[str, dict[str, tuple[int, str]]]:
    """Per trial that has finished all its epochs: (mtime, sha256) of its checkpoint and metrics.json."""
    epochs = load_space(space).fixed["train.epochs"]
    out = {}
    for state in (exp / "trials").glob("*/checkpoints/last/state.pt") if (exp / "trials").is_dir() else []:
        if load_state(state)["epoch"] + 1 != epochs:
            continue
        run = state.parents[2]
        out[run.name] = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                         for p in (state, run / "metrics.json") if p.is_file()}
    return out


def _checkpoints(exp: Path) -> set[tuple[str, int]]:
    """Every (trial, checkpoint mtime) on disk now: one more means an epoch was trained."""
    found = set()
    for state in (exp / "trials").glob("*/checkpoints/last/state.pt") if (exp / "trials").is_dir() else []:
        try:
            found.add((state.parents[2].name, state.stat().st_mtime_ns))
        except FileNotFoundError:
            pass
    return found


def test_resume_after_killing_the_driver_again_and_again(tiny_market, tmp_path, ray_cluster):
    """One search, its driver killed with kill -9 three times and resumed after each: twice at a
    random moment after an epoch was trained, once while summary.json is being written (the driver
    stops itself there: FVAE_STOP_BEFORE_RENAME). In the end every trial is in summary.json once,
    and no trial that had finished before a kill was trained again: its checkpoint is the same
    file (mtime and content) and its metrics.json says the same."""
    import psutil

    rng = random.Random(15)
    exp = tmp_path / "exp"
    # smoke.yaml with 6 epochs, not 2: on an idle machine the 3 trials of 2 epochs could all finish
    # within the random wait before the first kill, and the resumed search then had nothing left to train
    space = tmp_path / "slower.yaml"
    text = SMOKE.read_text()
    assert "  train.epochs: 2\n  train.patience: 2\n" in text
    space.write_text(text.replace("  train.epochs: 2\n  train.patience: 2\n", "  train.epochs: 6\n  train.patience: 6\n"))
    cmd = [sys.executable, "-m", "fvae.tune", "--data", str(tiny_market), "--space", str(space),
           "--num-samples", "3", "--out", str(exp), "--max-concurrent", "1", "--address", ray_cluster["address"]]
    finished: dict[str, dict[str, tuple[int, str]]] = {}  # as they were when first seen finished

    def launch(n: int, **env: str) -> subprocess.Popen:
        with open(tmp_path / f"run{n}.log", "w") as log:
            return subprocess.Popen(cmd + (["--resume"] if n else []), stdout=log, stderr=subprocess.STDOUT,
                                    env={**_env(), **env}, start_new_session=True)

    def kill(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for tid, files in _trial_files(exp, space).items():
            finished.setdefault(tid, files)

    for n in range(2):  # at a random moment after the next epoch is trained
        before, proc = _checkpoints(exp), launch(n)
        deadline = time.time() + 300
        while not _checkpoints(exp) - before:
            assert proc.poll() is None, (tmp_path / f"run{n}.log").read_text()[-3000:]
            assert time.time() < deadline, f"run {n}: no epoch trained within 300 s"
            time.sleep(0.2)
        time.sleep(rng.uniform(0, 2))
        assert proc.poll() is None, "the search ended before its kill"
        kill(proc)
    proc = launch(2, FVAE_STOP_BEFORE_RENAME="summary.json")  # the last trials, then stop in the summary
    deadline = time.time() + 400
    while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
        assert proc.poll() is None, (tmp_path / "run2.log").read_text()[-3000:]
        assert time.time() < deadline, "the summary was not reached within 400 s"
        time.sleep(0.2)
    assert not (exp / "summary.json").exists() and (exp / f".summary.json.tmp-{proc.pid}").is_file()
    kill(proc)

    out = subprocess.run(cmd + ["--resume"], check=False, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not list(exp.glob(".summary.json.tmp-*"))  # the interrupted write was cleared away
    summary = json.loads((exp / "summary.json").read_text())
    ids = [t["trial_id"] for t in summary["trials"]]
    assert len(ids) == 3 and len(set(ids)) == 3, ids
    assert all(t["status"] == "TERMINATED" for t in summary["trials"]), summary["trials"]
    assert finished, "no trial had finished before a kill"
    # a trial Tune had not yet recorded as done when it was killed may write its metrics.json again on
    # restore, from the same weights; the best trial's is rewritten by the summary with its test predictions
    # each trial's figures are those of its own history, whatever Tune's restarted counts said
    for t in summary["trials"]:
        history = load_state(Path(t["run_dir"]) / "checkpoints" / "last")["history"]
        assert 1 <= t["epochs"] <= len(history), t
        assert t["value"] == max(h["valid_rank_icir"] for h in history[: t["epochs"]]), t
    now = _trial_files(exp, space)
    for tid, was in finished.items():
        assert tid in ids and now[tid]["state.pt"] == was["state.pt"], tid
        if "metrics.json" in was and tid != summary["best"]["trial_id"]:
            assert now[tid]["metrics.json"][1] == was["metrics.json"][1], tid
    # the same Optuna study went on: each trial once, with its value; a trial asked after Tune's
    # last checkpoint (so never run) is marked FAIL with a note, never counted twice
    from optuna.trial import TrialState

    from fvae.study import NOTE_ATTR

    by_id = _study_trials(exp, summary)["by_id"]
    for t in summary["trials"]:
        live = [ot for ot in by_id[t["trial_id"]] if NOTE_ATTR not in ot.user_attrs]
        assert len(live) == 1 and live[0].state == TrialState.COMPLETE, (t, by_id[t["trial_id"]])
        assert live[0].value == pytest.approx(t["value"])
    orphans = [ot for tid, ots in by_id.items() for ot in ots if tid not in ids]
    # an orphan was asked after Tune's last experiment save (FAIL, with the note), or it ended
    # within the last second before a kill, after that save (COMPLETE; Tune re-ran its config)
    assert all((ot.state == TrialState.FAIL and NOTE_ATTR in ot.user_attrs) or ot.state == TrialState.COMPLETE
               for ot in orphans)


def _epoch_of(state: Path) -> int:
    """The epoch of a checkpoint that may be replaced while it is read (-1 then)."""
    try:
        return load_state(state)["epoch"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def _watchdog_dir(driver_pid: int) -> Path | None:
    """The temp dir of the local cluster that ``driver_pid`` started (its fvae.ray_local watchdog's)."""
    import psutil

    # a start that failed on a loaded machine is retried on a fresh temp dir: the newest watchdog's
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = p.info["cmdline"] or []
        if "fvae.ray_local" in cmd and "watch" in cmd and str(driver_pid) in cmd and Path(cmd[-1]).is_dir():
            found.append((p.info["create_time"], Path(cmd[-1])))
    return max(found)[1] if found else None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_stopped_search_leaves_no_ray_process(tiny_market, tmp_path, sig):
    """``fvae.tune`` without --address starts its own cluster. Stopped once a trial has trained an
    epoch, by kill -9 of its process group or by SIGTERM (handled as Ctrl-C), the driver leaves no
    process of that cluster behind within 60 s (every one carries the cluster's temp dir in its
    environment), and what it wrote stays readable: the trials' checkpoints and Tune's state."""
    from ray import tune

    from fvae.ray_local import processes

    exp = tmp_path / "exp"
    env = {k: v for k, v in _env().items() if k not in ("RAY_AUTH_MODE", "RAY_API_SERVER_ADDRESS")}
    env["HOME"] = str(tmp_path)  # Ray's default token authentication keeps its token in ~/.ray
    cmd = [sys.executable, "-m", "fvae.tune", "--data", str(tiny_market), "--space", str(SMOKE),
           "--num-samples", "3", "--out", str(exp), "--num-cpus", "2"]
    log = tmp_path / "tune.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    temp = None
    try:
        deadline = time.time() + 600
        while not _checkpoints(exp):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no epoch trained within 600 s"
            temp = _watchdog_dir(proc.pid) or temp
            time.sleep(0.5)
        assert temp is not None and processes(temp), "no cluster processes found"
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
            assert "interrupted" in log.read_text() and not (exp / "summary.json").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 60
    while (processes(temp) or temp.exists()) and time.time() < deadline:
        time.sleep(0.5)
    assert not processes(temp), [" ".join(p.cmdline())[:200] for p in processes(temp)]
    assert not temp.exists()  # the watchdog deleted the cluster's temp dir too
    assert tune.Tuner.can_restore(str(exp / "tune"))
    for state in (exp / "trials").glob("*/checkpoints/last/state.pt"):
        assert load_state(state)["epoch"] >= 0


def _tune_epochs_done(exp: Path) -> int:
    """The most epochs Tune's driver has taken in (with their checkpoints) for any trial: its result.json."""
    done = 0
    for f in (exp / "tune").glob("_trial_*/result.json"):
        for line in f.read_text().splitlines():
            try:
                done = max(done, int(json.loads(line).get("epochs_done", 0)))
            except ValueError:  # a line being written
                pass
    return done


def test_a_trial_whose_process_is_killed_finishes_from_its_checkpoint(tiny_market, tmp_path, ray_cluster,
                                                                     ray_session):
    """SIGKILL a running trial's process (a 1-worker trial trains in it) once Tune holds a checkpoint
    of it: Tune starts the trial again, which continues from its last checkpoint (Tune's,
    ``tune.get_checkpoint()``, or a later one in the trial's folder); the trial completes every
    epoch, and the summary counts them all."""
    from ray.util.state import list_actors

    from fvae.tune import run_search

    epochs = 6
    space = tmp_path / "one.yaml"
    space.write_text(
        "metric: valid_rank_icir\nparams:\n  train.lr: {type: categorical, choices: [1.0e-3]}\n"
        "fixed:\n  model.hidden_size: 8\n  model.attn_heads: 1\n  model.gat_layers: 0\n  model.num_factors: 2\n"
        f"  model.num_portfolios: 4\n  train.epochs: {epochs}\n  train.patience: 0\n  data.batch_days: 16\n")
    exp, job = tmp_path / "exp", ray_session.get_runtime_context().get_job_id()
    killed: dict[str, int] = {}

    def kill_the_trial() -> None:
        deadline = time.time() + 400
        while time.time() < deadline:
            registered = _tune_epochs_done(exp) - 1
            if registered >= 0:
                pids = [a.pid for a in list_actors(address=ray_cluster["dashboard"], filters=[
                    ("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE"), ("job_id", "=", job)])]
                os.kill(pids[0], signal.SIGKILL)
                killed["registered"] = registered  # the trial's last checkpoint, written by it alone:
                killed["on_disk"] = max(_epoch_of(s) for s in exp.glob("trials/*/checkpoints/last/state.pt"))
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_trial, daemon=True)
    killer.start()
    summary = run_search(data=tiny_market, space_path=space, num_samples=1, exp_dir=exp, seed=0)
    killer.join(timeout=5)
    assert "on_disk" in killed and killed["on_disk"] < epochs - 1, killed
    trial = summary["trials"][0]
    assert (trial["status"], trial["epochs"], trial["ended"]) == ("TERMINATED", epochs, "completed"), trial
    history = load_state(Path(trial["run_dir"]) / "checkpoints" / "last")["history"]
    resumed = history[-1]["start_epoch"]
    assert [h["epoch"] for h in history] == list(range(epochs))
    # the restarted trial began after the last checkpoint written (its own, where Tune had not yet
    # taken it in), which is at least the one Tune held
    assert killed["registered"] <= killed["on_disk"] and resumed == killed["on_disk"] + 1, (killed, resumed)
    assert [h["start_epoch"] for h in history] == [0] * resumed + [resumed] * (epochs - resumed)


def test_failed_trials_are_recorded_and_the_search_goes_on(tiny_market, tmp_path, ray_session):
    """A trial whose training blows up (lr 1e30: after one step the weights are ~1e30 and every loss
    and gradient norm is NaN, clipping or not; the loop skips those steps, then raises once more
    than max_skipped_fraction of an epoch's steps were skipped) is recorded as failed, with its
    reason; it is not trained again (the same checkpoint would fail the same way), the other
    trials finish and the best is chosen among them."""
    from fvae.tune import run_search

    space = tmp_path / "explode.yaml"
    space.write_text(
        "metric: valid_rank_icir\n"
        "params:\n"
        "  train.lr: {type: categorical, choices: [1.0e-3, 1.0e+30]}\n"
        "fixed:\n"
        "  model.hidden_size: 8\n  model.attn_heads: 1\n  model.gat_layers: 0\n  model.num_factors: 2\n  model.num_portfolios: 4\n"
        "  train.epochs: 1\n  data.batch_days: 16\n")
    exp = tmp_path / "exp"
    # max_failures=1, not the default 2: each of Tune's retries of a failed trial starts a trial actor
    # that only raises the recorded failure, which is what this shows, once is enough
    summary = run_search(data=tiny_market, space_path=space, num_samples=4, exp_dir=exp, seed=0, max_failures=1)
    status = {t["trial_id"]: (t["status"], t["params"]["train.lr"], t["error"]) for t in summary["trials"]}
    failed = [v for v in status.values() if v[0] == "ERROR"]
    ok = [v for v in status.values() if v[0] == "TERMINATED"]
    assert failed and ok, status
    assert all(v[1] == 1e30 for v in failed) and all(v[1] == 1e-3 for v in ok)
    for v in failed:  # the reason, in one line: the loop's own error
        assert v[2].startswith("NonFiniteLossError: epoch 0: ") and "non-finite loss or gradient norm" in v[2], v
        assert "\n" not in v[2]
    assert len(status) == 4 and all((exp / "trials" / tid).is_dir() for tid in status)
    # recorded by the trial: Tune's retries of it raise the recorded failure at once instead of training again
    assert all((exp / "trials" / tid / "failed.json").is_file() == (v[0] == "ERROR") for tid, v in status.items())
    assert summary["best"]["params"]["train.lr"] == 1e-3
    from optuna.trial import TrialState

    study = _study_trials(tmp_path / "exp", summary)["by_id"]
    assert {tid: ts[0].state for tid, ts in study.items()} == {
        tid: TrialState.FAIL if v[0] == "ERROR" else TrialState.COMPLETE for tid, v in status.items()}
    saved = json.loads((exp / "summary.json").read_text())
    assert [t["error"] for t in saved["trials"]] == [t["error"] for t in summary["trials"]]
