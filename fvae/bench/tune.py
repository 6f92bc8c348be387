"""``python -m fvae.bench tune``: what ASHA saves in a search, and on a GPU what packing trials saves.

On one synthetic market (default 500 stocks x 2500 days, or ``--data``) this
runs ``fvae.tune.run_search`` as shipped, twice, with the same space, samples
and TPE seed:

  asha  ASHA as ``python -m fvae.tune`` runs it (grace period 1 epoch);
  full  every trial trained to its last epoch. ``run_search`` has no switch to turn
        ASHA off, so this passes ``grace_period`` = the space's ``train.epochs`` =
        ASHA's ``max_t``: ASHA's only rung is then at max_t, where a trial ends
        anyway, so it can stop nothing early. (``train.patience`` can still end a
        trial early in both runs; it is the trial's own rule, not the scheduler's.)

and prints for each: trials per hour (trials that did not fail, over Tune's own
wall time, without Ray's start-up or the final test scoring), epochs run in all,
the epochs ASHA saved, the time spent inside epochs against per-trial overhead,
and the best validation Rank ICIR. With fewer samples than TPE's random
start-up trials (10), both runs propose the same configs, so the difference in
best Rank ICIR is what ASHA's early verdicts cost; the output says whether the
configs matched.

On a GPU (``--gpus-per-trial G`` with CUDA visible): the ASHA-free search again
with 1-worker trials on 1, 0.5, 0.25, ... of a GPU, down to G, printing how many
trials ran on the GPU at once, whether any failed (out of memory), the device's
peak memory in use, and the trials-per-hour speed-up over whole-GPU trials.

Each search runs on a private local Ray cluster started here (``address="local"``,
with the dashboard, whose State API Ray Train's placement-group cleaner needs) and
shut down after it. Two Ray instances on one machine break that cleaner (it cannot
tell which instance to ask, and the CPUs of trials that ASHA stopped are never
given back), so the bench refuses to start while another one runs
(``--ignore-other-ray`` overrides); the cluster is started by ``fvae.train.init_ray``, which
also tells its workers where their own State API is, in case another instance starts meanwhile.

Timings on a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvae.bench import add_market_args, prepare_market

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "smoke.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvae.bench tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_market_args(p)
    p.add_argument("--space", type=Path, default=DEFAULT_SPACE)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="TPE seed (and the synthetic market's)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial for both searches; on a GPU also the smallest share the packing sweep tries")
    p.add_argument("--gpu", action="store_true",
                   help="on a GPU: sweep 1, 2, 4 and 8 one-worker trials per GPU (ASHA-free), write the fastest "
                        "packing to --packing-out for fvae.tune, then run the ASHA search at that packing")
    p.add_argument("--packing-out", type=Path, default=None,
                   help="where --gpu writes its packing measurement (default: fvae.tune's PACKING_FILE)")
    p.add_argument("--ray-train", action="store_true",
                   help="1-worker trials on Ray Train too, as fvae.tune --ray-train (to measure what it costs)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the experiments here (default: a temporary folder, removed)")
    p.add_argument("--ignore-other-ray", action="store_true",
                   help="run even though another Ray instance is running on this machine")
    return p


def _say(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    """The figures of one search."""

    label: str
    seconds: float  # Tune's wall time (tuner.fit)
    wall: float  # including Ray's start-up and the best trial's test scoring
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    concurrent: int
    gpu_peak_mib: float  # device memory in use at the peak, minus before; NaN off the GPU
    gpu_util: float  # mean GPU utilisation (%) while the search ran (nvidia-smi); NaN off the GPU
    epoch_seconds: float  # time the trials spent inside their epochs (train + validation), summed
    timings: list[dict[str, Any]]  # each trial's timings.json (fvae.train.Timings), {} where absent

    @property
    def epochs(self) -> int:
        return sum(t["epochs"] for t in self.trials)

    @property
    def errors(self) -> int:
        return sum(1 for t in self.trials if t["status"] == "ERROR")

    @property
    def per_hour(self) -> float:
        """Trials that ran to their end (or to ASHA's stop) per hour; failed ones do not count."""
        done = len(self.trials) - self.errors
        return done / self.seconds * 3600 if self.seconds > 0 else math.nan

    @property
    def best_rank_icir(self) -> float:
        return self.best["valid_rank_icir"] if self.best else math.nan


class _GpuMemoryPeak:
    """Samples the device's memory in use (all processes: Ray's trial workers) and, through
    nvidia-smi where it is installed, its utilisation, in a thread."""

    def __init__(self, *, period_s: float = 0.5) -> None:
        import torch

        self.torch = torch
        self.period = period_s
        self.base = self._used()
        self.peak = self.base
        self.util: list[float] = []
        self._smi = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> float:
        free, total = self.torch.cuda.mem_get_info(0)
        return (total - free) / 2**20

    def _utilisation(self) -> float | None:
        import subprocess

        try:
            out = subprocess.run([self._smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "--id=0"], check=False, capture_output=True, text=True, timeout=5).stdout
            return float(out.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self._used())
            u = self._utilisation() if self._smi else None
            if u is not None:
                self.util.append(u)

    @property
    def mean_util(self) -> float:
        return sum(self.util) / len(self.util) if self.util else math.nan

    def __enter__(self) -> _GpuMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def added_mib(self) -> float:
        return self.peak - self.base


def other_ray_instances() -> list[str]:
    """GCS addresses of Ray instances already running on this machine (ours would be a second)."""
    from ray._private import services

    try:
        return sorted(services.find_gcs_addresses())
    except Exception:  # noqa: BLE001 (a private API; not finding is not an error)
        return []


@dataclass(frozen=True, kw_only=True)
class Setup:
    """What every search of one bench run shares."""

    data: Path
    space: Path
    num_samples: int
    seed: int
    workers: int
    cpus_per_worker: float
    num_cpus: int
    gpu: bool
    ray_train: bool  # 1-worker trials on Ray Train too (fvae.tune --ray-train)


def _search(setup: Setup, *, label: str, exp_dir: Path, grace_period: int, gpus_per_trial: float) -> SearchResult:
    """One run_search on a fresh private Ray cluster, shut down afterwards (no state leaks between runs)."""
    import ray

    from fvae.train import init_ray
    from fvae.tune import DRIVER_CPUS, max_concurrent, run_search

    t0 = time.perf_counter()
    init_ray(num_cpus=setup.num_cpus)
    try:
        cluster = ray.cluster_resources()
        concurrent = max_concurrent(cluster=cluster, workers=setup.workers, cpus_per_worker=setup.cpus_per_worker,
                                    gpus_per_worker=gpus_per_trial / setup.workers,
                                    driver_cpus=DRIVER_CPUS if setup.workers > 1 or setup.ray_train else 0.0)
        _say(f"\n[bench tune] {label}: grace_period {grace_period}, {setup.num_samples} trials, up to {concurrent} "
             f"at a time, cluster {dict(sorted(cluster.items()))}")
        with _GpuMemoryPeak() if setup.gpu else contextlib.nullcontext() as mem:
            summary = run_search(data=setup.data, space_path=setup.space, num_samples=setup.num_samples,
                                 exp_dir=exp_dir, workers=setup.workers, gpus_per_trial=gpus_per_trial,
                                 cpus_per_worker=setup.cpus_per_worker, seed=setup.seed, grace_period=grace_period,
                                 ray_train=setup.ray_train)
        peak = mem.added_mib if mem is not None else math.nan
        util = mem.mean_util if mem is not None else math.nan
    finally:
        ray.shutdown()
    res = SearchResult(label=label, seconds=float(summary["seconds"]), wall=time.perf_counter() - t0,
                       trials=summary["trials"], best=summary["best"], concurrent=concurrent, gpu_peak_mib=peak,
                       gpu_util=util,
                       epoch_seconds=sum(_epoch_seconds(Path(t["run_dir"])) for t in summary["trials"]),
                       timings=[_timings(Path(t["run_dir"])) for t in summary["trials"]])
    _say(f"[bench tune] {label}: {len(res.trials)} trials in {res.seconds:.1f} s ({res.per_hour:.1f} trials/h), "
         f"{res.epochs} epochs, {res.errors} errors, best valid Rank ICIR {res.best_rank_icir:.3f}; "
         f"wall with Ray start-up and test scoring {res.wall:.1f} s")
    return res


def _epoch_seconds(run_dir: Path) -> float:
    """Seconds a trial spent in its epochs, from its last checkpoint's history (0 without one)."""
    from fvae.train import load_state

    state = run_dir / "checkpoints" / "last" / "state.pt"
    if not state.is_file():
        return 0.0
    return float(sum(h.get("seconds", 0.0) for h in load_state(state)["history"]))


def _timings(run_dir: Path) -> dict[str, Any]:
    from fvae.train import TIMINGS_FILE

    path = run_dir / TIMINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


FIXED_PARTS = (  # timings.json key, what it is
    ("start_s", "Ray Train start (controller, worker group, process spawn) until fit begins"),
    ("data_load_s", "data panel load"),
    ("build_s", "model and optimiser build, restore"),
    ("step_setup_s", "train step set-up (CUDA graph capture)"),
    ("outputs_s", "final predictions, metrics, plots"),
)


def fixed_cost(timings: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per finished trial of each fixed-cost part, ``other`` (the rest of the trial
    outside its epochs) and ``total`` = trial time - epoch time; over trials that ran to their end."""
    done = [t for t in timings if "trial_s" in t]
    if not done:
        return {}
    out = {k: sum(t.get(k, 0.0) for t in done) / len(done) for k, _ in FIXED_PARTS}
    out["total"] = sum(t["trial_s"] - t.get("epochs_s", 0.0) for t in done) / len(done)
    out["other"] = out["total"] - sum(out[k] for k, _ in FIXED_PARTS)
    out["trials"] = len(done)
    out["from_cache"] = sum(1 for t in done if t.get("data_source") == "cache")
    return out


def _fractions(smallest: float) -> list[float]:
    """1, 0.5, 0.25, ... down to ``smallest`` (which is included even if not a power of 2)."""
    out, f = [], 1.0
    while f > smallest + 1e-9:
        out.append(f)
        f /= 2
    return out + [smallest]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from fvae import config as fconfig
    from fvae.bench.train import describe_machine
    from fvae.data.shards import DataError
    from fvae.space import SpaceError, load_space
    from fvae.train import NonFiniteLossError
    from fvae.tune import resolve_trial_config

    if args.num_samples < 1 or args.workers_per_trial < 1 or args.gpus_per_trial < 0:
        print("error: --num-samples >= 1, --workers-per-trial >= 1 and --gpus-per-trial >= 0 expected",
              file=sys.stderr)
        return 2
    gpu = args.gpus_per_trial > 0 or args.gpu
    if gpu and not torch.cuda.is_available():
        print(f"error: {'--gpu' if args.gpu else '--gpus-per-trial'}: no CUDA device is visible", file=sys.stderr)
        return 2
    if args.gpu and args.workers_per_trial > 1:
        print("error: --gpu packs 1-worker trials; drop --workers-per-trial", file=sys.stderr)
        return 2
    others = other_ray_instances()
    if others and not args.ignore_other_ray:
        print(f"error: another Ray instance runs on this machine (GCS {', '.join(others)}); two instances break "
              "Ray Train's placement-group cleaner. Stop it (`ray stop` if it is yours) or pass --ignore-other-ray",
              file=sys.stderr)
        return 2
    num_cpus = args.num_cpus or os.cpu_count() or 2
    machine = describe_machine(gpu=gpu)
    _say(f"[bench tune] {machine}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fvae-bench-tune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        space = load_space(args.space)
        max_epochs = resolve_trial_config(space, {}, base=None).train.epochs
        data = prepare_market(args, workdir)
        run = time.strftime("%Y%m%d-%H%M%S")  # fresh experiment folders: run_search refuses existing ones
        setup = Setup(data=data, space=args.space, num_samples=args.num_samples, seed=args.seed,
                      workers=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker, num_cpus=num_cpus,
                      gpu=gpu, ray_train=args.ray_train)
        if args.gpu:
            _packing_sweep(setup, workdir=workdir, run=run, max_epochs=max_epochs, space=space.name,
                           out=args.packing_out, machine=machine)
            return 0
        asha = _search(setup, label="asha", exp_dir=workdir / f"asha-{run}", grace_period=1,
                       gpus_per_trial=args.gpus_per_trial)
        full = _search(setup, label="full", exp_dir=workdir / f"full-{run}", grace_period=max_epochs,
                       gpus_per_trial=args.gpus_per_trial)
        packing: list[tuple[float, SearchResult]] = []
        if gpu:
            if args.workers_per_trial > 1:
                _say("[bench tune] packing sweep skipped: fractional GPUs need 1-worker trials")
            else:
                for f in _fractions(args.gpus_per_trial):
                    if abs(f - args.gpus_per_trial) < 1e-9:
                        packing.append((f, full))
                        continue
                    packing.append((f, _search(setup, label=f"full, {f:g} GPU/trial",
                                               exp_dir=workdir / f"gpu{f:g}-{run}", grace_period=max_epochs,
                                               gpus_per_trial=f)))
        _summary(asha=asha, full=full, packing=packing, machine=describe_machine(gpu=gpu), space=space.name,
                 max_epochs=max_epochs, num_samples=args.num_samples, num_cpus=num_cpus)
    except (SpaceError, fconfig.ConfigError, DataError, NonFiniteLossError, FileExistsError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _summary(*, asha: SearchResult, full: SearchResult, packing: list[tuple[float, SearchResult]], machine: str,
             space: str, max_epochs: int, num_samples: int, num_cpus: int) -> None:
    _say("\n== summary ==")
    _say(f"  device: {machine}; Ray cluster of {num_cpus} CPUs")
    _say("  timings on a shared machine are noisy (other tenants' load changes them by a factor); "
         "trials/h compares within one run only")
    _say(f"  space '{space}', {num_samples} trials, {max_epochs} epochs max per trial")
    _say(f"  'full' = grace_period {max_epochs} = max_t: ASHA's only rung sits where trials end anyway, so it "
         "stops nothing early (run_search has no switch to turn ASHA off)")
    _say(f"  {'':6} {'trials/h':>9} {'Tune s':>8} {'epochs':>7} {'stopped':>8} {'errors':>7} "
         f"{'best valid RankICIR':>20}")
    for r in (asha, full):
        stopped = sum(1 for t in r.trials if t["status"] != "ERROR" and t["epochs"] < max_epochs)
        _say(f"  {r.label:6} {r.per_hour:9.1f} {r.seconds:8.1f} {r.epochs:7d} {stopped:8d} {r.errors:7d} "
             f"{r.best_rank_icir:20.3f}")
    runs = [asha, full] + [x for _, x in packing if x is not full]
    for r in runs:
        failed = [t for t in r.trials if t["status"] == "ERROR"]
        if failed:
            _say(f"  WARNING: {len(failed)} trial(s) of '{r.label}' failed, so its figures are not comparable; "
                 f"first error: {failed[0]['error']}")
    saved = full.epochs - asha.epochs
    _say(f"  epochs saved by ASHA: {saved} of {full.epochs} ({saved / max(full.epochs, 1):.0%}); "
         f"time saved {full.seconds - asha.seconds:.1f} s ({1 - asha.seconds / max(full.seconds, 1e-9):.0%})")
    for r in (asha, full):
        per_trial = (r.seconds * r.concurrent - r.epoch_seconds) / max(len(r.trials), 1)
        per_epoch = r.epoch_seconds / max(r.epochs, 1)
        _say(f"  {r.label}: {r.epoch_seconds:.1f} s of trial time inside epochs ({per_epoch:.1f} s per epoch); "
             f"about {per_trial:.1f} s per trial outside them (Ray Train worker start-up, process spawn, data "
             "loading, and a finished trial's final predictions and plots, which a stopped trial skips)")
    fc = fixed_cost(full.timings)
    if fc:
        _say(f"  fixed cost per trial ('full', {fc['trials']} trials that ran to their end; panel from the "
             f"cache in {fc['from_cache']}): {fc['total']:.2f} s outside the epochs")
        for k, what in FIXED_PARTS:
            _say(f"    {fc[k]:7.2f} s  {what}")
        _say(f"    {fc['other']:7.2f} s  other (config, run folder, Tune's reporting and checkpoint copies)")
        between = (full.seconds * full.concurrent - sum(t.get("trial_s", 0.0) for t in full.timings)) / max(
            len(full.trials), 1)
        _say(f"  and about {between:.2f} s per trial outside the trial's own time (Tune starting the trial's process "
             "and, on Ray Train, its shutdown; an upper bound when fewer trials than slots were running)")
    same = sorted(_key(t["params"]) for t in asha.trials) == sorted(_key(t["params"]) for t in full.trials)
    same_best = bool(asha.best and full.best and _key(asha.best["params"]) == _key(full.best["params"]))
    ids = [r.best["trial_id"] if r.best else "-" for r in (asha, full)]
    _say(f"  same configs proposed in both: {'yes' if same else 'no'}; "
         f"same best config: {'yes' if same_best else 'no'} (asha {ids[0]}, full {ids[1]})")
    _say(f"  best valid Rank ICIR full - asha: {full.best_rank_icir - asha.best_rank_icir:+.3f} "
         "(what ASHA's early verdicts cost, when the configs match)")
    if packing:
        _say("  GPU packing (ASHA-free search, 1-worker trials):")
        _say(f"  {'GPU/trial':>9} {'at once':>8} {'trials/h':>9} {'speed-up':>9} {'errors':>7} {'peak GPU mem':>13}")
        base = packing[0][1].per_hour
        holds = 0
        for f, r in packing:
            _say(f"  {f:9g} {r.concurrent:8d} {r.per_hour:9.1f} {r.per_hour / base:8.2f}x {r.errors:7d} "
                 f"{r.gpu_peak_mib:9,.0f} MiB")
            if r.errors == 0:
                holds = max(holds, r.concurrent)
        _say(f"  one GPU held {holds} concurrent 1-worker trial(s) without a failed trial "
             "(at once = min(by GPU share, by CPUs); a trial needs 1 CPU per worker + 0.1)")


PACKINGS = (1, 2, 4, 8)  # one-worker trials per GPU that --gpu measures


def _packing_sweep(setup: Setup, *, workdir: Path, run: str, max_epochs: int, space: str, out: Path | None,
                   machine: str) -> None:
    """ASHA-free searches with 1, 2, 4 and 8 trials per GPU; the fastest packing without a failed
    trial (trials per hour) is written for fvae.tune, then one ASHA search runs at that packing."""
    from fvae.tune import PACKING_FILE

    runs = {k: _search(setup, label=f"full, {k} trial(s)/GPU", exp_dir=workdir / f"pack{k}-{run}",
                       grace_period=max_epochs, gpus_per_trial=1.0 / k) for k in PACKINGS}
    ok = {k: r for k, r in runs.items() if r.errors == 0}
    best = max(ok, key=lambda k: ok[k].per_hour, default=1)
    asha = _search(setup, label=f"asha, {best} trial(s)/GPU", exp_dir=workdir / f"asha-{run}", grace_period=1,
                   gpus_per_trial=1.0 / best)
    import torch

    record = {"device": torch.cuda.get_device_name(0), "machine": machine, "space": space,
              "num_samples": setup.num_samples, "best_trials_per_gpu": best,
              "trials_per_hour": {str(k): round(r.per_hour, 1) for k, r in runs.items()},
              "errors": {str(k): r.errors for k, r in runs.items()},
              "peak_gpu_mib": {str(k): round(r.gpu_peak_mib) for k, r in runs.items()},
              "gpu_util_pct": {str(k): round(r.gpu_util, 1) for k, r in runs.items()},
              "fixed_cost_s": {str(k): fixed_cost(r.timings).get("total") for k, r in runs.items()},
              "asha": {"trials_per_hour": round(asha.per_hour, 1), "epochs": asha.epochs,
                       "epochs_full": runs[best].epochs, "best_valid_rank_icir": asha.best_rank_icir}}
    from fvae.io import atomic_write_json

    path = out or PACKING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    _say("\n== GPU packing (1-worker trials, bf16 + CUDA graphs, ASHA-free) ==")
    _say(f"  device: {record['device']}; space '{space}', {setup.num_samples} trials per search")
    _say(f"  {'trials/GPU':>10} {'at once':>8} {'trials/h':>9} {'errors':>7} {'peak GPU mem':>13} {'GPU util':>9} "
         f"{'fixed s/trial':>14}")
    for k, r in runs.items():
        fc = fixed_cost(r.timings).get("total", math.nan)
        _say(f"  {k:10d} {r.concurrent:8d} {r.per_hour:9.1f} {r.errors:7d} {r.gpu_peak_mib:9,.0f} MiB "
             f"{r.gpu_util:8.0f}% {fc:14.2f}")
    _say(f"  fastest: {best} trials per GPU, written to {path} (fvae.tune's default packing)")
    _say(f"  ASHA at that packing: {asha.per_hour:.1f} trials/h, {asha.epochs} epochs against {runs[best].epochs} "
         f"without ASHA ({1 - asha.epochs / max(runs[best].epochs, 1):.0%} saved), best valid Rank ICIR "
         f"{asha.best_rank_icir:.3f}")


def _key(params: dict[str, Any]) -> str:
    return repr(sorted(params.items()))
