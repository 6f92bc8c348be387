"""Distributed hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over Ray Train trials.

    python -m fvae.tune [--data DIR] --space search_spaces/NAME.yaml --num-samples N --out EXP_DIR
                        [--resume] [--workers-per-trial W] [--gpus-per-trial G] [--ray-train] [--no-fast-path]

Runs the same locally and as ``ray job submit -- python -m fvae.tune ...``. Without
``--data`` it searches the embedded default: a synthetic market generated into
EXP_DIR/data. Each trial is a Tune function (``_trial``). A 1-worker trial runs ``fit`` in
its own process and reports through ``tune.report``; a multi-worker (data-parallel) trial
builds a Ray Train TorchTrainer (Ray Train V2) whose metrics flow back through
TuneReportCallback (``--ray-train`` sends 1-worker trials that way too). Before the first
trial, the driver fills the shards' panel cache, so no trial parses the Parquet. The space
file's ``metric:`` and ``mode:`` drive everything: TPE and ASHA (which stops weak trials
on the per-epoch value) optimise them, and the best trial is the one whose best epoch
has the highest value for ``mode: max``, the lowest for ``mode: min`` (ties: the lower
trial id; see :func:`choose_best`).

EXP_DIR receives:
    trials/<trial_id>/        each trial's run directory (config.yaml, tb/, checkpoints/, ...)
    tune/                     Ray Tune's experiment state (what --resume restores)
    optuna.db                 the Optuna study (SQLite): ``optuna-dashboard sqlite:///EXP_DIR/optuna.db``,
                              ``optuna.load_study(study_name=..., storage=...)``; see fvae.study
    summary.json              metric, mode, best trial (config, value, test metrics, checkpoint) and all trials
    best_config.yaml          the best config, re-runnable with ``python -m fvae.train --config``
    trials.png                the metric of every trial, per epoch

Multi-node runs need EXP_DIR (and --data) on storage every node sees: rank 0 of each
trial writes its run directory there, and Tune keeps its state there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fvae import config as fconfig
from fvae.data.shards import DataError, check_shards, read_meta
from fvae.io import atomic_write_json, pyplot
from fvae.ray_local import RayStartError, sigterm_as_sigint
from fvae.space import SearchSpace, SpaceError, load_space
from fvae.study import STUDY_FILE, storage_url
from fvae.train import (
    FAILED_FILE,
    Config,
    NonFiniteLossError,
    init_ray,
    load_config,
    load_state,
    raise_if_failed,
)

DRIVER_CPUS = 0.1  # a trial's driver only waits on its Train workers


def resolve_trial_config(space: SearchSpace, params: dict[str, Any], *, base: Path | None,
                         first: list[str] | None = None) -> Config:
    """The full Config a trial trains with: base YAML, then ``first`` (the GPU fast path), then
    the space's fixed values and params."""
    keys = {k: v for k, v in params.items() if "." in k}
    return load_config(base, [*(first or []), *space.to_overrides(keys)])


# --------------------------------------------------------------------------- Ray (the only Ray calls)


def _trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: ``fit`` in the trial's own process (1-worker trials, unless
    ``setup["ray_train"]``), or a Ray Train run of ``fvae.train.train_loop_per_worker``."""
    from ray import tune

    started = time.time()
    space = load_space(setup["space"])
    gpu = setup["gpus_per_worker"] > 0
    fast = fast_path(gpu=gpu, workers=setup["workers"]) if setup["fast_path"] else []
    cfg = resolve_trial_config(space, params, base=Path(setup["base_config"]) if setup["base_config"] else None,
                               first=fast)
    trial_id = tune.get_context().get_trial_id()
    out = Path(setup["exp_dir"]) / "trials" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    # a failure recorded by an earlier attempt of this trial is final: Tune's retries are for a trial
    # whose process died (a lost node, an OOM kill), not for what a retry would repeat or Ray Train
    # has already retried
    raise_if_failed(out)
    if in_trial(setup):
        _fit_in_trial(cfg, data=Path(setup["data"]), out=out, gpu=gpu, started=started)
    else:
        _fit_on_ray_train(cfg, data=Path(setup["data"]), out=out, gpu=gpu, setup=setup, name=trial_id,
                          started=started)


def in_trial(setup: dict[str, Any]) -> bool:
    """Whether a trial trains in its own process: 1-worker trials do, since Ray Train's controller
    and worker group would add their start-up (``python -m fvae.bench tune`` measures it) for
    nothing a single process needs; multi-worker (data-parallel) trials run on Ray Train."""
    return setup["workers"] == 1 and not setup["ray_train"]


def _fit_in_trial(cfg: Config, *, data: Path, out: Path, gpu: bool, started: float) -> None:
    """``fit`` in the Tune trial's process; a retried trial (Tune restarts a failed one up to
    ``max_failures`` times) resumes from its last checkpoint, ``tune.get_checkpoint()``."""
    import torch
    from ray import tune

    from fvae.train import (
        DETERMINISTIC,
        Dist,
        fit,
        hold_last_report,
        latest_state,
        record_failure,
        record_trial_time,
        scalar_metrics,
    )

    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as path:
            resume = load_state(Path(path))
    told = resume["epoch"] if resume is not None else -1  # the last epoch Tune has heard of
    # the run folder's own last checkpoint can be newer than the one Tune recorded (Tune's experiment
    # state can predate the trial's last epochs when the driver was killed; the last report waits
    # for the outputs): the later one
    resume = latest_state(resume, out)
    if resume is not None:
        print(f"[fvae] resuming from the checkpoint after epoch {resume['epoch'] + 1}", flush=True)
    reported: set[int] = set()

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if metrics.get("epoch") in reported:  # fit reports a finished run's last epoch again: replayed below
            return
        reported.add(metrics.get("epoch"))
        c = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(scalar_metrics(metrics), checkpoint=c)

    # Ray shows the trial only its own GPU share, as device 0
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    report, flush = hold_last_report(report, epochs=cfg.train.epochs)
    # epochs trained after the checkpoint Tune holds, whose reports a kill cut off: Tune, the scheduler
    # and the study hear of them now, the last with its checkpoint, as if they had arrived in time
    missed = [h for h in (resume or {}).get("history", []) if h["epoch"] > told]
    for h in missed:
        report(h, out / "checkpoints" / "last" if h is missed[-1] else None)
    try:
        fit(cfg, data=data, out=out, d=Dist(device=device), report=report, resume=resume, started=started)
    except DETERMINISTIC as e:  # the same checkpoint would fail the same way: recorded as final
        record_failure(out, e)
        raise
    record_trial_time(out, started=started)  # before the last report, after which Tune may stop the trial
    flush()


def _fit_on_ray_train(cfg: Config, *, data: Path, out: Path, gpu: bool, setup: dict[str, Any], name: str,
                      started: float) -> None:
    """A Ray Train run, which restarts a failed worker group up to ``max_failures`` times from its
    last checkpoint; a trial Tune restarts continues from it too (same name and storage)."""
    from ray.train import TrainingFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError
    from ray.tune.integration.ray_train import TuneReportCallback

    from fvae.train import make_trainer, record_failure

    resources = {"CPU": setup["cpus_per_worker"]}
    if gpu:
        resources["GPU"] = setup["gpus_per_worker"]
    trainer = make_trainer(cfg, data=data, out=out, workers=setup["workers"], gpu=gpu,
                           storage_path=str(Path(setup["exp_dir"]) / "train"), name=name,
                           callbacks=[TuneReportCallback()], resources_per_worker=resources, started=started,
                           max_failures=setup["max_failures"])
    try:
        trainer.fit()
    except TrainingFailedError as e:  # Ray Train's retries are spent: final for this trial too
        failures = e.worker_failures if isinstance(e, WorkerGroupError) else {}
        record_failure(out, failures[min(failures)] if failures else e)
        raise
    raise_if_failed(out)  # what the workers recorded as a failure a retry would repeat


def fast_path(*, gpu: bool, workers: int) -> list[str]:
    """Overrides for GPU trials unless turned off: bf16, and CUDA graphs where one process has
    the device (1-worker trials). The space's own values come later, so they win."""
    if not gpu:
        return []
    return ["train.bf16=true"] + (["train.cuda_graph=true"] if workers == 1 else [])


PACKING_FILE = Path("~/.cache/fvae/packing.json").expanduser()  # written by python -m fvae.bench tune --gpu


def default_gpus_per_trial(cluster: dict[str, float], *, workers: int, packing_file: Path) -> tuple[float, str]:
    """GPUs per trial when --gpus-per-trial is not given, and why: none without GPUs; one per worker
    for data-parallel trials; for 1-worker trials the packing that ``bench tune --gpu`` measured
    fastest (trials per hour) on this kind of GPU, or a whole GPU each until it has been measured."""
    if cluster.get("GPU", 0) < 1:
        return 0.0, "the cluster has no GPU, so trials run on CPUs"
    if workers > 1:
        return float(workers), f"{workers}-worker trials take one GPU per worker (NCCL: one rank per GPU)"
    try:
        measured = json.loads(packing_file.read_text())
        per_gpu = int(measured["best_trials_per_gpu"])
    except FileNotFoundError:
        return 1.0, (f"one trial per GPU, since no packing has been measured ({packing_file} is absent; "
                     "python -m fvae.bench tune --gpu measures it)")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{packing_file}: not a packing measurement of fvae.bench tune --gpu ({e})") from None
    return 1.0 / per_gpu, (f"{per_gpu} trials per GPU, the fastest packing measured on {measured.get('device')} "
                           f"({measured.get('trials_per_hour')} trials/h by trials per GPU, {packing_file})")


def prepare_panels(data: Path, *, handler: str | None) -> None:
    """Fill the shards' panel cache once, before any trial starts, so that no trial parses the
    Parquet (fvae.data.loader: trials on one node then map one copy of each panel)."""
    from fvae.data.loader import load_panel

    t0 = time.perf_counter()
    sources = [load_panel(data, seg, handler=handler).source for seg in ("train", "valid")]
    if "built" in sources:
        print(f"[fvae.tune] cached the train and valid panels next to the shards in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)


def max_concurrent(*, cluster: dict[str, float], workers: int, cpus_per_worker: float,
                   gpus_per_worker: float, driver_cpus: float = DRIVER_CPUS) -> int:
    """How many trials fit at once, from the cluster's resources and one trial's request
    (``driver_cpus`` is 0 for trials that train in their own process)."""
    need = workers * cpus_per_worker + driver_cpus
    by_cpu = int(cluster.get("CPU", 0) // need)
    if gpus_per_worker > 0:
        if workers > 1 and gpus_per_worker < 1:
            raise ValueError("--gpus-per-trial: fractional GPUs only for 1-worker trials "
                             "(NCCL refuses two ranks on one GPU)")
        by_gpu = int(cluster.get("GPU", 0) // (workers * gpus_per_worker) + 1e-9)
        if by_gpu < 1:
            raise ValueError(f"--gpus-per-trial: the cluster has {cluster.get('GPU', 0)} GPUs, "
                             f"one trial needs {workers * gpus_per_worker}")
        return max(1, min(by_gpu, by_cpu))  # GPU trials still need their CPUs
    if by_cpu < 1:
        raise ValueError(f"--workers-per-trial: the cluster has {cluster.get('CPU', 0)} CPUs, one trial needs {need}")
    return by_cpu


def plan_concurrency(*, cluster: dict[str, float], requested: int | None, workers: int, cpus_per_worker: float,
                     gpus_per_worker: float, driver_cpus: float = DRIVER_CPUS) -> tuple[int, str | None]:
    """Trials to run at once: ``requested`` if given, else what fits; plus a warning when more are
    requested than fit now (those wait, and a trial that cannot start its workers fails once Ray
    Train's worker-group start times out)."""
    try:
        fits = max_concurrent(cluster=cluster, workers=workers, cpus_per_worker=cpus_per_worker,
                              gpus_per_worker=gpus_per_worker, driver_cpus=driver_cpus)
    except ValueError:
        if not requested:
            raise
        fits = 0  # an autoscaler may still add what is missing
    if not requested:
        return fits, None
    if requested <= fits:
        return requested, None
    return requested, (f"--max-concurrent {requested}, but the cluster fits {fits} trials at once now "
                       f"({workers} x {cpus_per_worker:g} CPUs + {driver_cpus:g} for the driver each); the others "
                       "wait for resources and fail after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) "
                       "unless an autoscaler adds them")


def check_options(*, num_samples: int, workers: int, gpus_per_trial: float | None = None, cpus_per_worker: float = 1.0,
                  max_concurrent_trials: int | None = None, grace_period: int = 1,
                  time_budget_s: float | None = None, num_cpus: int | None = None, out: Path | None = None,
                  max_failures: int = 2) -> None:
    """The search's options, checked before Ray starts (or a synthetic market is written)."""
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; expected an experiment directory")

    def need(ok: bool, flag: str, expected: str, got: object) -> None:
        if not ok:
            raise ValueError(f"{flag}: expected {expected}, got {got}")

    need(num_samples >= 1, "--num-samples", "at least 1 trial", num_samples)
    need(workers >= 1, "--workers-per-trial", "at least 1 Ray Train worker", workers)
    need(gpus_per_trial is None or (math.isfinite(gpus_per_trial) and gpus_per_trial >= 0), "--gpus-per-trial",
         "a number >= 0", gpus_per_trial)
    need(math.isfinite(cpus_per_worker) and cpus_per_worker > 0, "--cpus-per-worker", "a number > 0",
         cpus_per_worker)
    need(max_concurrent_trials is None or max_concurrent_trials >= 1, "--max-concurrent", "at least 1",
         max_concurrent_trials)
    need(grace_period >= 1, "--grace-period", "at least 1 epoch", grace_period)
    need(time_budget_s is None or (math.isfinite(time_budget_s) and time_budget_s > 0), "--time-budget-s",
         "a number of seconds > 0", time_budget_s)
    need(num_cpus is None or num_cpus >= 1, "--num-cpus", "at least 1", num_cpus)
    need(max_failures >= 0, "--max-failures", "a number of restarts >= 0", max_failures)


def run_search(*, data: Path, space_path: Path, num_samples: int, exp_dir: Path, resume: bool = False,
               workers: int = 1, gpus_per_trial: float | None = None, cpus_per_worker: float = 1.0, seed: int = 0,
               base_config: Path | None = None, grace_period: int = 1, reduction_factor: int = 2,
               max_concurrent_trials: int | None = None, time_budget_s: float | None = None,
               address: str | None = None, num_cpus: int | None = None, ray_train: bool = False,
               fast_path: bool = True, packing_file: Path | None = None, max_failures: int = 2) -> dict[str, Any]:
    """Run (or resume) the search and write summary.json; returns the summary.

    A trial whose process dies is restarted by Tune, and a Ray Train trial's failed worker group by
    Ray Train, each up to ``max_failures`` times, from the trial's last checkpoint; a failure that a
    retry would repeat (fvae.train.DETERMINISTIC) is not retried. A search stopped by SIGINT (or
    SIGTERM through ``main``) raises :class:`SearchInterrupted` and writes no summary.

    ``gpus_per_trial`` None chooses the packing (:func:`default_gpus_per_trial`). ``ray_train``
    runs 1-worker trials on Ray Train too; ``fast_path`` gives GPU trials bf16 and CUDA graphs."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from fvae.searcher import KeptOptunaSearch

    check_options(num_samples=num_samples, workers=workers, gpus_per_trial=gpus_per_trial,
                  cpus_per_worker=cpus_per_worker, max_concurrent_trials=max_concurrent_trials,
                  grace_period=grace_period, time_budget_s=time_budget_s, num_cpus=num_cpus, out=exp_dir)
    space = load_space(space_path, base=base_config)
    meta = read_meta(data)  # fail fast on bad data, before any trial starts
    check_shards(data, meta)
    base_cfg = resolve_trial_config(space, {}, base=base_config)
    exp_dir = exp_dir.resolve()
    tune_dir = exp_dir / "tune"
    if resume and not tune.Tuner.can_restore(str(tune_dir)):
        raise FileNotFoundError(f"--resume: no search to resume in {tune_dir}")
    if not resume and (tune_dir.exists() or (exp_dir / STUDY_FILE).exists()):
        raise FileExistsError(f"{exp_dir} already holds a search; pass --resume to continue it "
                              "or choose another --out")

    init_ray(address=address, num_cpus=num_cpus)
    cluster = ray.cluster_resources()
    if gpus_per_trial is None:
        gpus_per_trial, why = default_gpus_per_trial(cluster, workers=workers,
                                                     packing_file=packing_file or PACKING_FILE)
        print(f"[fvae.tune] --gpus-per-trial {gpus_per_trial:g}: {why}", flush=True)
    gpus_per_worker = gpus_per_trial / workers if workers else 0.0
    setup = {"space": str(Path(space_path).resolve()), "data": str(Path(data).resolve()),
             "exp_dir": str(exp_dir), "workers": workers, "cpus_per_worker": cpus_per_worker,
             "gpus_per_worker": gpus_per_worker, "ray_train": ray_train, "fast_path": fast_path,
             "max_failures": max_failures,
             "base_config": str(Path(base_config).resolve()) if base_config else None}
    driver_cpus = 0.0 if in_trial(setup) else DRIVER_CPUS
    concurrent, warning = plan_concurrency(cluster=cluster, requested=max_concurrent_trials, workers=workers,
                                           cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                           driver_cpus=driver_cpus)
    if warning:
        print(f"[fvae] warning: {warning}", flush=True)
    # a trial that trains in its own process asks for its worker's resources; one that starts a
    # Ray Train worker group asks for a little CPU for itself, and the group asks for the rest
    request = ({"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
               if in_trial(setup) else {"CPU": DRIVER_CPUS})
    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup), request)
    prepare_panels(data, handler=base_cfg.data.handler)

    # Tune saves its experiment state (what --resume restores) every 10 s or more by default; a
    # trial that ends between two saves is run again on resume. Trials here end seconds apart.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if resume:
        print(f"[fvae.tune] resuming the search in {tune_dir}", flush=True)
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        # the study lives in EXP_DIR/optuna.db; Tune's searcher checkpoint keeps the sampler and
        # which trial is which, so --resume continues the same study
        searcher = KeptOptunaSearch(space=space.suggest, metric=space.metric, mode=space.mode,
                                    sampler=optuna.samplers.TPESampler(seed=seed), exp_dir=exp_dir,
                                    study_name=space.name)
        study = optuna.load_study(study_name=space.name, storage=storage_url(exp_dir))
        for key, value in (("metric", space.metric), ("mode", space.mode), ("space", str(space.path))):
            study.set_user_attr(key, value)
        # ASHA takes metric and mode from the TuneConfig (Tune refuses them in both places)
        # epochs_done, not training_iteration, which restarts at 1 when a resumed search restarts a Ray Train trial
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=base_cfg.train.epochs,
                                  grace_period=min(grace_period, base_cfg.train.epochs),
                                  reduction_factor=reduction_factor)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=searcher,
                                        scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=concurrent, time_budget_s=time_budget_s,
                                        # a trial process trains the next trial when its last one ran to the end:
                                        # no new process, and torch, its optimiser and matplotlib stay imported
                                        reuse_actors=in_trial(setup)),
            run_config=tune.RunConfig(name="tune", storage_path=str(exp_dir),
                                      failure_config=tune.FailureConfig(max_failures=max_failures)),
        )
        print(f"[fvae.tune] {num_samples} trials of space '{space.name}' on {data} "
              f"({meta.handler}, {meta.instruments} stocks); {concurrent} at a time, "
              f"{workers} worker(s) per trial ({'in the trial' if in_trial(setup) else 'on Ray Train'}"
              f"{', bf16 + CUDA graphs' if gpus_per_worker and fast_path else ''}); "
              f"TPE and ASHA on {space.metric} ({space.mode})", flush=True)
    for leftover in exp_dir.glob(".*.tmp-*"):  # a summary write that a kill interrupted (fvae.io)
        leftover.unlink()
    t0 = time.time()
    results, interrupted = _fit(tuner)
    unfinished = len(results) - results.num_terminated - results.num_errors
    if interrupted or unfinished:
        raise SearchInterrupted(f"{unfinished} of the {len(results)} trials started so far unfinished; the search's "
                                f"state is in {tune_dir}: continue it with --resume")
    summary = summarize_search(results, space=space, exp_dir=exp_dir, data=data, base_config=base_config,
                               seconds=time.time() - t0)
    return summary


def _fit(tuner: Any) -> tuple[Any, bool]:
    """``tuner.fit()``, and whether SIGINT stopped it. Tune stops gracefully (it stops the trials and
    saves its state) on SIGINT or SIGUSR1 but does not say which happened; so SIGINT is caught here
    and passed on to Tune as SIGUSR1. A second SIGINT stops at once (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False  # signals reach the main thread only
    count = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        if count > 1:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGUSR1)

    previous, env = signal.signal(signal.SIGINT, on_sigint), os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune would take SIGINT over; it always listens to SIGUSR1
    try:
        return tuner.fit(), count > 0
    finally:
        signal.signal(signal.SIGINT, previous)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER")
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


class SearchInterrupted(Exception):
    """The search stopped before its trials did (SIGINT); its state is saved for --resume."""


def failure_reason(run_dir: Path, error: Any) -> str:
    """Why a trial failed, in one line: what its run recorded (FAILED_FILE), else the last line of the
    error Tune holds (a Ray task error's text ends with the original exception)."""
    f = run_dir / FAILED_FILE
    if f.is_file():
        info = json.loads(f.read_text())
        return f"{info['error']}: {info['message']}"
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def seen_epochs(run_dir: Path, df: Any) -> list[dict[str, Any]]:
    """The epochs of a trial that Tune saw, as rows of the trial's own history (its checkpoint).

    Tune's results cannot say this alone: a Ray Train trial that a resumed search restarts begins Tune's
    count (training_iteration) again, and its earlier results may be missing; a trial ASHA
    stopped may have trained one epoch more than Tune saw. ``epochs_done`` (reported with every
    epoch) says how many epochs Tune saw (training_iteration in a search begun before it was);
    the checkpoint holds each one's figures."""
    count = "epochs_done" if df is not None and "epochs_done" in df else "training_iteration"
    if df is None or count not in df or not df[count].notna().any():
        return []
    state = run_dir / "checkpoints" / "last" / "state.pt"
    if not state.is_file():  # checkpoints precede reports: a run folder deleted since
        return df.sort_values(count).drop_duplicates(count).to_dict("records")
    return load_state(state)["history"][: int(df[count].max())]


def best_epoch(values: Any, mode: str) -> float:
    """A trial's value: the best of its per-epoch ``values`` in the mode's direction (NaN if none is finite)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return (max if mode == "max" else min)(finite) if finite else math.nan


def choose_best(trials: list[dict[str, Any]], *, mode: str) -> dict[str, Any] | None:
    """The trial with the highest ``value`` for mode max, the lowest for mode min, ties broken by
    the lower ``trial_id``; failed trials and those without a finite value never win (None if none is left)."""
    finished = [t for t in trials if t.get("status") != "ERROR" and isinstance(t.get("value"), (int, float))
                and math.isfinite(t["value"])]
    sign = -1.0 if mode == "max" else 1.0
    return min(finished, key=lambda t: (sign * t["value"], t["trial_id"]), default=None)


def summarize_search(results: Any, *, space: SearchSpace, exp_dir: Path, data: Path,
                     base_config: Path | None, seconds: float) -> dict[str, Any]:
    """Collect every trial, pick the best by the space's metric and mode, evaluate it on test.

    Each trial records ``value`` (its best epoch's ``space.metric`` in the mode's direction) and
    ``valid_rank_icir`` (its highest validation Rank ICIR, whatever the metric)."""
    metric, mode = space.metric, space.mode
    trials = []
    for r in results:
        # Tune names a trial's folder "_trial_<id>_<n>_<params>_<date>" (truncated); an errored
        # trial may have reported no metrics, so the folder name is the reliable source
        match = re.match(r"_trial_([0-9a-f]+)_", Path(r.path).name) if r.path else None
        trial_id = match.group(1) if match else "?"
        params = {k: v for k, v in (r.config or {}).items() if "." in k}
        tid = trial_id if match else (r.metrics or {}).get("trial_id", "?")
        history = seen_epochs(exp_dir / "trials" / tid, r.metrics_dataframe)
        value = best_epoch([h.get(metric) for h in history], mode)
        best_icir = best_epoch([h.get("valid_rank_icir") for h in history], "max")
        epochs, bad_epochs = len(history), (history[-1].get("bad_epochs", 0) if history else 0)
        status = "ERROR" if r.error else "TERMINATED"
        trial_cfg = resolve_trial_config(space, params, base=base_config).train
        ended = ("failed" if r.error else "completed" if epochs >= trial_cfg.epochs
                 else "patience" if trial_cfg.patience and bad_epochs >= trial_cfg.patience else "asha")
        trials.append({"trial_id": tid, "params": params, "value": value, "valid_rank_icir": best_icir,
                       "epochs": epochs, "ended": ended, "status": status,
                       "error": failure_reason(exp_dir / "trials" / tid, r.error) if r.error else None,
                       "run_dir": str(exp_dir / "trials" / tid)})
    trials.sort(key=lambda t: t["trial_id"])
    summary: dict[str, Any] = {"space": space.name, "metric": metric, "mode": mode, "seconds": seconds,
                               "data": str(data), "trials": trials, "best": None}
    if (exp_dir / STUDY_FILE).is_file():  # searches from before the study was kept have none
        summary["study"] = {"file": STUDY_FILE, "name": space.name, "storage": storage_url(exp_dir)}
    best = choose_best(trials, mode=mode)
    if best is not None:
        cfg = resolve_trial_config(space, best["params"], base=base_config)
        run_dir = Path(best["run_dir"])
        test = evaluate_best(cfg, data=data, run_dir=run_dir)
        fconfig.dump(cfg, exp_dir / "best_config.yaml")
        summary["best"] = {"trial_id": best["trial_id"], "params": best["params"], "config": fconfig.to_dict(cfg),
                           "value": best["value"], "valid_rank_icir": best["valid_rank_icir"], "test": test,
                           "checkpoint": str(run_dir / "checkpoints" / "last" / "state.pt")}
    # a trial that ended before its last epoch was either cut by ASHA or stopped itself (patience)
    summary["asha_stopped"] = sum(1 for t in trials if t["ended"] == "asha")
    summary["patience_stopped"] = sum(1 for t in trials if t["ended"] == "patience")
    atomic_write_json(exp_dir / "summary.json", summary)
    _plot_trials(exp_dir, trials, metric=metric, mode=mode)
    if summary["best"]:
        b = summary["best"]
        print(f"[fvae.tune] best trial {b['trial_id']} ({mode} {metric}): {metric} {b['value']:.4g}, "
              f"test Rank IC {b['test']['rank_ic']:.4f} Rank ICIR {b['test']['rank_icir']:.3f} "
              f"-> {exp_dir / 'summary.json'}", flush=True)
    return summary


def evaluate_best(cfg: Config, *, data: Path, run_dir: Path) -> dict[str, float]:
    """Best-epoch weights from the trial's last checkpoint -> predictions and test metrics."""
    import torch

    from fvae.train import build_model, write_run_outputs

    state = load_state(run_dir / "checkpoints" / "last")
    meta = read_meta(data)
    model = build_model(cfg, meta.channels)
    model.load_state_dict(state["best_model"] or state["model"])
    out = write_run_outputs(model, cfg, meta, data=Path(data), out=run_dir, history=state["history"],
                            best=state["best"], device=torch.device("cpu"))
    return out["test"]


def _plot_trials(exp_dir: Path, trials: list[dict[str, Any]], *, metric: str, mode: str) -> None:
    import json

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        mfile = Path(t["run_dir"]) / "metrics.json"
        hist = json.loads(mfile.read_text())["history"] if mfile.is_file() else None
        if hist is None:
            state_file = Path(t["run_dir"]) / "checkpoints" / "last" / "state.pt"
            if not state_file.is_file():
                continue
            hist = load_state(state_file)["history"]
        ax.plot([h["epoch"] + 1 for h in hist], [h.get(metric, math.nan) for h in hist], marker="o",
                label=t["trial_id"], alpha=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"trials: {metric} per epoch, {mode} is best (ASHA stops the weak ones early)")
    ax.grid(alpha=0.3)
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(exp_dir / "trials.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvae.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None,
                   help="shard folder; default: a synthetic market generated into EXP_DIR/data")
    p.add_argument("--space", type=Path, default=Path("search_spaces/default.yaml"))
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("experiments/default"), help="experiment directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial; fractions pack several 1-worker trials on one GPU (default: none "
                        "without GPUs, else the packing that `python -m fvae.bench tune --gpu` measured fastest)")
    p.add_argument("--ray-train", action="store_true",
                   help="run 1-worker trials on Ray Train too (default: they train in the trial's own process, "
                        "which saves Ray Train's start-up; multi-worker trials always use Ray Train)")
    p.add_argument("--packing", type=Path, default=None,
                   help=f"packing measurement that chooses --gpus-per-trial when it is not given (default {PACKING_FILE})")
    p.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                   help="GPU trials without the default train.bf16 and train.cuda_graph")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--config", type=Path, default=None, help="base training config YAML")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--max-concurrent", type=int, default=None, help="default: from cluster resources")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop the whole search after this long")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray cluster")
    p.add_argument("--max-failures", type=int, default=2,
                   help="times a trial is restarted from its last checkpoint after its process or a worker died")
    p.add_argument("--synthetic-stocks", type=int, default=200)
    p.add_argument("--synthetic-days", type=int, default=600)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sigterm_as_sigint()  # Tune saves its state on SIGINT; the clean-up then stops a cluster this process started
    try:
        check_options(num_samples=args.num_samples, workers=args.workers_per_trial,
                      gpus_per_trial=args.gpus_per_trial, cpus_per_worker=args.cpus_per_worker,
                      max_concurrent_trials=args.max_concurrent, grace_period=args.grace_period,
                      time_budget_s=args.time_budget_s, num_cpus=args.num_cpus, out=args.out,
                      max_failures=args.max_failures)
        load_space(args.space, base=args.config)  # a bad space file fails before a market is generated
        data = args.data
        if data is None:
            data = args.out / "data"
            if not (data / "meta.json").is_file():
                from fvae.data.synthetic import SyntheticConfig, write_synthetic

                meta = write_synthetic(data, SyntheticConfig(stocks=args.synthetic_stocks,
                                                             days=args.synthetic_days, seed=args.seed))
                print(f"[fvae.tune] no --data: generated a synthetic market in {data} "
                      f"(ceiling Rank IC {meta.extra['ceiling_rank_ic']})", flush=True)
        run_search(data=data, space_path=args.space, num_samples=args.num_samples, exp_dir=args.out,
                   resume=args.resume, workers=args.workers_per_trial, gpus_per_trial=args.gpus_per_trial,
                   cpus_per_worker=args.cpus_per_worker, seed=args.seed, base_config=args.config,
                   grace_period=args.grace_period, max_concurrent_trials=args.max_concurrent,
                   time_budget_s=args.time_budget_s, address=args.address, num_cpus=args.num_cpus,
                   ray_train=args.ray_train, fast_path=args.fast_path, packing_file=args.packing,
                   max_failures=args.max_failures)
    except (SpaceError, fconfig.ConfigError, DataError, NonFiniteLossError, FileExistsError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RayStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (SearchInterrupted, KeyboardInterrupt) as e:
        print(f"[fvae.tune] interrupted: {e or 'the trials finished so far are in ' + str(args.out / 'trials')}; "
              "continue with --resume", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
