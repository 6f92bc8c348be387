"""``python -m fvae.bench train``: FactorVAE's training cost against qlib's own GRU, same data, same run.

On one synthetic market the size of the S&P 500 (default 500 stocks x 2500 days,
written by ``fvae.data.synthetic.write_synthetic``; 60 % of the days are the
training segment) this times, in the same run:

  (1) FactorVAE through ``fit``'s own step and epoch (``fvae.train.build_run``, ``make_step``,
      ``train_epoch``: forward, loss, backward, clipping, the non-finite check, AdamW and the
      schedule, the very code ``fit`` runs) over every training day, with no validation: the
      cost of training alone;
  (2) qlib's ``qlib.contrib.model.pytorch_gru.GRU`` with FactorVAE's hidden size and one
      layer (FactorVAE has one GRU layer; qlib's GRU benchmark config uses two),
      through its own ``train_epoch`` on the same training stock-days (every valid
      stock-day of the training segment, its T x C window flattened in the C x T order
      qlib's GRUModel reshapes, the same processed label), batch size 800 (as qlib's
      GRU benchmark config; the class default is 2000). This is qlib's training step
      loop as ``GRU.fit`` runs it, without qlib's DatasetH and without its per-epoch
      evaluation;
  (3) unless ``--no-fit``: ``fvae.train.fit`` itself, whose epochs also score the
      validation segment and write a checkpoint, so its seconds are an upper bound.

(1) and (2) each live in their own process and take turns: every timed epoch is
cut into ``--slices`` shares, run alternately (FactorVAE, qlib, qlib, FactorVAE,
...), so a load swing on a shared machine hits both alike; an epoch's time is
the sum of its slices. (3) runs afterwards in a third process. Peak memory is
each process's own: on the CPU the RSS high-water mark from the end of data
loading (the kernel's VmHWM, reset then; ru_maxrss where it cannot be reset),
on the GPU ``torch.cuda.max_memory_allocated``. Printed: seconds per epoch (wall,
and the process's CPU time, which other tenants' load disturbs less),
stock-days per second, peak memory and the ratio FactorVAE epoch / qlib GRU
epoch (the target on the CPU is at most 1.5x).

Both models see the same rows, but not the same network: qlib's GRU maps the C
features straight into a GRU and reads one number out; FactorVAE first projects
them to H (Linear + LeakyReLU), runs a GRU of width H, then the factor encoder,
predictor and decoder over each day's whole cross-section. The parameter counts
are printed next to the timings.

``--layout alpha360-like`` makes the synthetic windows Alpha360-shaped (T=60
days x C=6 channels); the generator still writes the ``daily`` layout, and the
loader builds the 60-day windows from consecutive days.

On a GPU (``--gpu``) the FactorVAE panel lives on the device and day batches
are large (default 256 days); qlib's GRU keeps its numpy arrays on the host and
copies each batch over, as qlib does. ``--bf16`` autocasts FactorVAE on CUDA
only (as ``fit`` does); qlib's GRU has no such option.

``--no-qlib`` times FactorVAE alone (steps (1) and (3)), for a machine without pyqlib
such as a bare GPU node. On a GPU the target is a FactorVAE training epoch of at most
2 s for 500 stocks x 1,750 training days at T = 60 (``--layout alpha360-like --days 2917``).

Timings on a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvae.bench import add_market_args, prepare_market

QLIB_BATCH = 800  # rows per step: qlib's GRU benchmark configs (the class's own default is 2000)
CPU_TARGET = 1.5  # FactorVAE epoch / qlib GRU epoch on the CPU
GPU_TARGET_S = 2.0  # FactorVAE training epoch on one H100, 500 stocks x 1,750 days, T = 60
PROGRESS_EVERY_S = 15.0
WARMUP_STEPS_IF_NO_EPOCH = 2  # untimed steps when --warmup 0: one-time costs stay out of the timing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvae.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_market_args(p, days_help="trading days in all; 60 %% are the training segment")
    p.add_argument("--layout", choices=["daily", "alpha360-like"], default="daily",
                   help="alpha360-like: T=60 x C=6 windows (sets --lookback 60)")
    p.add_argument("--lookback", type=int, default=None, help="T (default 20; 60 with --layout alpha360-like)")
    p.add_argument("--hidden", type=int, default=64, help="H of FactorVAE and of qlib's GRU")
    p.add_argument("--factors", type=int, default=8, help="FactorVAE's K")
    p.add_argument("--portfolios", type=int, default=64, help="FactorVAE's M")
    p.add_argument("--batch-days", type=int, default=None, help="FactorVAE days per step (default 32; 256 on GPU)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs")
    p.add_argument("--warmup", type=int, default=1,
                   help=f"untimed epochs before them; 0 runs {WARMUP_STEPS_IF_NO_EPOCH} untimed steps instead "
                        "(a CPU epoch is expensive)")
    p.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True,
                   help="also time fvae.train.fit (train + validation + checkpoint per epoch)")
    p.add_argument("--slices", type=int, default=8,
                   help="cut each timed epoch into this many slices, run alternately for the two models "
                        "(evens out a shared machine's load swings); 1 = back-to-back epochs")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per model process (default: torch's own, one per core)")
    p.add_argument("--gpu", action="store_true", help="train on cuda:0 (qlib's GPU=0)")
    p.add_argument("--qlib", action=argparse.BooleanOptionalAction, default=True,
                   help="also time qlib's GRU (needs pyqlib); --no-qlib times FactorVAE alone")
    p.add_argument("--bf16", action="store_true", help="FactorVAE under bfloat16 autocast (CUDA only, as fit)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile FactorVAE (as fit's train.compile); compiles for new batch shapes "
                        "land in the first epoch, so pair it with --warmup 1")
    p.add_argument("--cuda-graph", action="store_true",
                   help="FactorVAE's steps as one CUDA graph each (as fit's train.cuda_graph; GPU only)")
    p.add_argument("--seed", type=int, default=0)
    return p


# --------------------------------------------------------------------------- machine and memory


def _say(msg: str) -> None:
    print(msg, flush=True)


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux); the platform's word for it elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def describe_machine(*, gpu: bool, threads: int = 0) -> str:
    """One line naming the device and the cores, with the load average that makes CPU timings noisy.

    ``threads``: the torch threads the timed processes use (0 = torch's default, one per core).
    """
    import torch

    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    line = (f"CPU {cpu_model()}, {cores} cores ({usable} usable), "
            f"torch threads {threads or torch.get_num_threads()}, load average {load}")
    if gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        line = f"GPU {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB); " + line
    return line


def _rss_mib() -> float:
    """Current resident set size of this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other tenants' load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so the peak excludes loading the data."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """Peak RSS since the last reset (VmHWM), else since the process started (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# --------------------------------------------------------------------------- the workers (one process per model)


@dataclass(frozen=True, kw_only=True)
class Job:
    """What every timed job needs; plain fields so it crosses into a spawned process."""

    data: str
    device: str  # "cpu" or "cuda:0"
    hidden: int
    factors: int
    portfolios: int
    batch_days: int
    epochs: int
    warmup: int
    bf16: bool
    compile: bool
    cuda_graph: bool
    seed: int
    threads: int  # torch intra-op threads; 0 = torch's default


class _Progress:
    """Prints ``[who]   what: step i/n, t s`` at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.last = time.perf_counter()

    def tick(self, *, what: str, step: int, steps: int, started: float) -> None:
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            _say(f"[{self.who}]   {what}: step {step}/{steps}, {now - started:.1f} s")


def _sync(device: Any) -> None:  # noqa: ANN401 (torch.device)
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem_start(device: Any) -> float:  # noqa: ANN401
    """Start measuring peak memory here (after the data is loaded); returns what is in use now."""
    import torch

    if device.type == "cuda":
        torch.empty(0, device=device)  # the allocator's stats exist only once this process has a CUDA context
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    _reset_peak_rss()
    return _rss_mib()


def _mem_peak(device: Any) -> float:  # noqa: ANN401
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _peak_rss_mib()


def _set_threads(job: Job) -> int:
    import torch

    if job.threads > 0:
        torch.set_num_threads(job.threads)
    return torch.get_num_threads()


def _fvae_config(job: Job, *, epochs: int) -> Any:  # noqa: ANN401 (fvae.train.Config, imported late)
    from fvae.data.loader import LoaderConfig
    from fvae.model import ModelConfig
    from fvae.train import Config, TrainConfig

    return Config(data=LoaderConfig(batch_days=job.batch_days),
                  model=ModelConfig(hidden_size=job.hidden, num_factors=job.factors, num_portfolios=job.portfolios),
                  train=TrainConfig(epochs=epochs, patience=0, seed=job.seed, bf16=job.bf16, compile=job.compile,
                                    cuda_graph=job.cuda_graph))


class FactorVAEWorker:
    """FactorVAE's training steps exactly as ``fit`` runs them, minus validation and checkpoints.

    The model, optimizer and schedule come from ``fvae.train.build_run``, the step from
    ``fvae.train.make_step`` (the eager step, or the CUDA graph with ``--cuda-graph``) and each
    slice of an epoch runs through ``fvae.train.train_epoch``: the code that ships, not a copy.
    An epoch is ``fvae.train.day_batches`` over the training days; a slice is a contiguous share
    of that epoch's batches.
    """

    def __init__(self, job: Job) -> None:
        import numpy as np
        import torch

        from fvae.data.loader import load_panel
        from fvae.data.shards import read_meta
        from fvae.train import Dist, build_run, make_step, seed_all

        self.job = job
        self.threads = _set_threads(job)
        self.device = device = torch.device(job.device)
        self.d = Dist(device=device)
        self.cfg = cfg = _fvae_config(job, epochs=job.warmup + job.epochs)
        seed_all(cfg.train.seed)
        meta = read_meta(job.data)
        t0 = time.perf_counter()
        self.panel = load_panel(job.data, "train", meta=meta).to(device)
        _sync(device)
        _say(f"[fvae] train panel {self.panel.num_days} days x {len(self.panel.instruments)} stocks "
             f"(T={self.panel.lookback}, C={self.panel.channels}) on {device} in {time.perf_counter() - t0:.1f} s")
        self.per_day = self.panel.valid.sum(1).cpu().numpy().astype(np.int64)  # stock-days of each day
        self.run = build_run(cfg, panel=self.panel, d=self.d, num_features=meta.channels)
        self.step = make_step(cfg, self.run, self.panel, self.d)
        self.progress = _Progress("fvae")
        self.mem_before = _mem_start(device)
        probe = self.batches(0)
        if job.warmup == 0:
            r = self.steps(probe[:WARMUP_STEPS_IF_NO_EPOCH], "warm-up steps")
            _say(f"[fvae] {r['steps']} warm-up steps (untimed): {r['wall']:.1f} s")
        for e in range(job.warmup):
            r = self.steps(self.batches(e), f"epoch {e + 1} (warm-up)")
            _say(f"[fvae] warm-up epoch {e + 1}: {r['steps']} steps, {r['wall']:.1f} s")
        self.info = {"stock_days": int(self.per_day.sum()), "steps": len(probe), "threads": self.threads,
                     "params": sum(p.numel() for p in self.run.model.parameters()), "mem_before": self.mem_before}

    def batches(self, epoch: int) -> list:
        from fvae.train import day_batches

        return day_batches(self.cfg, self.panel, epoch)

    def steps(self, batches: list, what: str) -> dict[str, float]:
        from fvae.train import train_epoch

        t = self.cfg.train
        _sync(self.device)
        start, cpu = time.perf_counter(), _cpu_seconds()
        out = train_epoch(self.step, batches, d=self.d, sched=self.run.sched, nonfinite=t.nonfinite,
                          max_skipped_fraction=t.max_skipped_fraction, days_per_step=self.cfg.data.batch_days,
                          on_step=lambda i, n, _loss: self.progress.tick(what=what, step=i, steps=n, started=start))
        _sync(self.device)
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        days = [d for b in batches for d in b]
        return {"wall": wall, "cpu": cpu, "steps": len(batches), "stock_days": int(self.per_day[days].sum()),
                "loss": out["loss"], "skipped_steps": out["skipped_steps"]}

    def run_slice(self, *, epoch: int, part: int, parts: int) -> dict[str, float]:
        batches = self.batches(self.job.warmup + epoch)
        n = len(batches)
        return self.steps(batches[part * n // parts:(part + 1) * n // parts],
                          f"epoch {epoch + 1} slice {part + 1}/{parts}")

    def finish(self) -> dict[str, Any]:
        return {**self.info, "mem_peak": _mem_peak(self.device)}


def qlib_rows(panel: Any, *, chunk_days: int = 64) -> tuple[Any, Any]:  # noqa: ANN401 (Panel; numpy arrays)
    """Every valid stock-day of ``panel`` as qlib's GRU reads it: x (R, C*T) float32, y (R,).

    FactorVAE's windows come from ``Panel.batch`` (x (B, N, T, C), real stocks first); qlib's
    GRUModel reshapes a row to (C, T) and permutes to (T, C), so a row is the window
    transposed and flattened: feature-major, oldest day first, as Alpha360's columns.
    """
    import numpy as np
    import torch

    R = int(panel.valid.sum().item())
    T, C = panel.lookback, panel.channels
    x = np.empty((R, C * T), dtype=np.float32)
    y = np.empty(R, dtype=np.float32)
    at = 0
    with torch.no_grad():
        for a in range(0, panel.num_days, chunk_days):
            b = panel.batch(np.arange(a, min(a + chunk_days, panel.num_days)))
            w = b.x[b.mask]  # (r, T, C)
            r = w.shape[0]
            x[at:at + r] = w.permute(0, 2, 1).reshape(r, C * T).cpu().numpy()
            if a == 0 and r and not torch.equal(torch.from_numpy(x[:1]).reshape(1, C, T).permute(0, 2, 1)[0],
                                                w[0].cpu()):  # what GRUModel.forward does to a row
                raise RuntimeError("qlib rows: the C x T flattening does not give back FactorVAE's window")
            y[at:at + r] = b.y[b.mask].cpu().numpy()
            at += r
    if at != R:
        raise RuntimeError(f"qlib rows: expected {R} valid stock-days, gathered {at}")
    return x, y


class QlibGRUWorker:
    """One-layer ``qlib.contrib.model.pytorch_gru.GRU`` of width H, trained by its own ``train_epoch``.

    ``train_epoch(x_train, y_train)`` reads ``.values`` of pandas frames, shuffles the rows and
    runs batches of ``batch_size`` rows (dropping the last partial one) with Adam and value
    clipping, copying each batch host -> device as qlib does. The constructor needs no
    ``qlib.init`` and nothing here touches qlib's recorder R. The rows are shuffled once here;
    a slice is a contiguous run of whole batches of them (a zero-copy view) handed to
    ``train_epoch``, which shuffles within it: the slices of an epoch cover every row once.
    """

    def __init__(self, job: Job) -> None:
        import numpy as np
        import torch

        from fvae.data.loader import load_panel
        from fvae.data.shards import read_meta

        self.job = job
        self.threads = _set_threads(job)
        self.device = device = torch.device(job.device)
        meta = read_meta(job.data)
        t0 = time.perf_counter()
        panel = load_panel(job.data, "train", meta=meta)  # qlib keeps its arrays on the host
        x, y = qlib_rows(panel)
        T, C = panel.lookback, panel.channels
        del panel
        perm = np.random.default_rng(job.seed).permutation(len(x))
        self.x, self.y = x[perm], y[perm]
        del x, y
        _say(f"[qlib] {self.x.shape[0]:,} rows x {self.x.shape[1]} (C={C} x T={T}) float32 "
             f"({self.x.nbytes / 2**20:,.0f} MiB) built in {time.perf_counter() - t0:.1f} s")

        from qlib.contrib.model.pytorch_gru import GRU

        self.model = GRU(d_feat=C, hidden_size=job.hidden, num_layers=1, dropout=0.0, n_epochs=1, lr=1e-3,
                         batch_size=QLIB_BATCH, GPU=(device.index or 0) if device.type == "cuda" else -1,
                         seed=job.seed)
        self.batches_per_epoch = len(self.x) // QLIB_BATCH
        self.progress = _Progress("qlib")
        self._tick = {"what": "", "step": 0, "steps": 0, "start": 0.0}
        self.model.gru_model.register_forward_pre_hook(self._hook)
        self.mem_before = _mem_start(device)
        if job.warmup == 0:
            r = self.rows(0, WARMUP_STEPS_IF_NO_EPOCH * QLIB_BATCH, "warm-up steps")
            _say(f"[qlib] {r['steps']} warm-up steps (untimed): {r['wall']:.1f} s")
        for e in range(job.warmup):
            r = self.rows(0, self.batches_per_epoch * QLIB_BATCH, f"epoch {e + 1} (warm-up)")
            _say(f"[qlib] warm-up epoch {e + 1}: {r['steps']} steps, {r['wall']:.1f} s")
        self.info = {"stock_days": self.batches_per_epoch * QLIB_BATCH, "steps": self.batches_per_epoch,
                     "threads": self.threads, "mem_before": self.mem_before,
                     "params": sum(p.numel() for p in self.model.gru_model.parameters()), "rows": len(self.x)}

    def _hook(self, _module: Any, _args: Any) -> None:  # noqa: ANN401 (torch forward-pre-hook)
        t = self._tick
        t["step"] += 1
        self.progress.tick(what=t["what"], step=t["step"], steps=t["steps"], started=t["start"])

    def rows(self, a: int, b: int, what: str) -> dict[str, float]:
        import pandas as pd

        xs = pd.DataFrame(self.x[a:b], copy=False)  # views: .values hands qlib the same memory
        ys = pd.DataFrame(self.y[a:b, None], copy=False)
        steps = (b - a) // QLIB_BATCH
        self._tick.update(what=what, step=0, steps=steps)
        _sync(self.device)
        self._tick["start"] = start = time.perf_counter()
        cpu = _cpu_seconds()
        self.model.train_epoch(xs, ys)
        _sync(self.device)
        return {"wall": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu, "steps": steps,
                "stock_days": steps * QLIB_BATCH}

    def run_slice(self, *, epoch: int, part: int, parts: int) -> dict[str, float]:
        n = self.batches_per_epoch
        a, b = (part * n // parts) * QLIB_BATCH, ((part + 1) * n // parts) * QLIB_BATCH
        return self.rows(a, b, f"epoch {epoch + 1} slice {part + 1}/{parts}")

    def finish(self) -> dict[str, Any]:
        return {**self.info, "mem_peak": _mem_peak(self.device)}


_WORKER: FactorVAEWorker | QlibGRUWorker | None = None  # the model this worker process holds


def _worker_start(kind: str, job: Job) -> dict[str, Any]:
    global _WORKER
    _WORKER = FactorVAEWorker(job) if kind == "fvae" else QlibGRUWorker(job)
    return _WORKER.info


def _worker_slice(epoch: int, part: int, parts: int) -> dict[str, float]:
    if _WORKER is None:
        raise RuntimeError("worker not started")
    return _WORKER.run_slice(epoch=epoch, part=part, parts=parts)


def _worker_finish() -> dict[str, Any]:
    if _WORKER is None:
        raise RuntimeError("worker not started")
    return _WORKER.finish()


def time_fit(job: Job) -> dict[str, Any]:
    """``fvae.train.fit`` for warm-up + timed epochs; its per-epoch seconds include validation."""
    import torch

    from fvae.data.loader import load_panel
    from fvae.data.shards import read_meta
    from fvae.train import Dist, fit

    threads = _set_threads(job)
    device = torch.device(job.device)
    cfg = _fvae_config(job, epochs=job.warmup + job.epochs)
    meta = read_meta(job.data)
    stock_days = int(load_panel(job.data, "train", meta=meta).valid.sum().item())
    base = _mem_start(device)
    out = Path(tempfile.mkdtemp(prefix="fvae-bench-fit-"))
    try:
        t0 = time.perf_counter()
        res = fit(cfg, data=Path(job.data), out=out, d=Dist(device=device), write_outputs=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seconds = [h["seconds"] for h in res["history"][job.warmup:]]
    return {"seconds": seconds, "stock_days": stock_days, "steps": res["history"][0]["steps"], "wall": wall,
            "mem_before": base, "mem_peak": _mem_peak(device), "threads": threads}


def _spawn() -> ProcessPoolExecutor:
    """A fresh one-process pool: its peak memory and its thread pools are its own."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def time_interleaved(job: Job, *, slices: int, qlib: bool = True) -> dict[str, dict[str, Any]]:
    """Both models in their own processes, their epochs cut into slices run alternately (ABBA...).

    Other tenants' load on a shared machine swings within minutes; alternating slices gives both
    models the same machine on average, so their ratio holds up better than back-to-back epochs.
    ``qlib=False``: FactorVAE alone, in the same slices.
    """
    out: dict[str, dict[str, Any]] = {}
    names = ["fvae", "qlib"] if qlib else ["fvae"]
    with contextlib.ExitStack() as stack:
        pools = {name: stack.enter_context(_spawn()) for name in names}
        _say("\n[bench train] (1) FactorVAE: load the panel, build the model, warm up")
        out["fvae"] = dict(pools["fvae"].submit(_worker_start, "fvae", job).result())
        if qlib:
            _say("\n[bench train] (2) qlib GRU: build its rows, build the model, warm up")
            out["qlib"] = dict(pools["qlib"].submit(_worker_start, "qlib", job).result())
        for name in pools:
            out[name].update(seconds=[], cpu_seconds=[], slice_walls=[])
        _say(f"\n[bench train] timed epochs: {slices} slices per epoch"
             + (", alternating FactorVAE and qlib GRU" if qlib else ", FactorVAE alone"))
        for epoch in range(job.epochs):
            tot = {name: {"wall": 0.0, "cpu": 0.0, "steps": 0, "stock_days": 0} for name in pools}
            for part in range(slices):
                order = names if part % 2 == 0 else names[::-1]
                got = {}
                for name in order:
                    got[name] = pools[name].submit(_worker_slice, epoch, part, slices).result()
                    # per stock-day: FactorVAE's steps differ in days and stocks, its slices in steps
                    out[name]["slice_walls"].append(got[name]["wall"] / max(got[name]["stock_days"], 1))
                    for k in tot[name]:
                        tot[name][k] += got[name][k]
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
                f_ = got["fvae"]
                q_ = (f", qlib GRU {got['qlib']['wall']:.1f} s ({got['qlib']['steps']} steps)" if qlib else "")
                _say(f"[bench train] epoch {epoch + 1} slice {part + 1}/{slices}: FactorVAE {f_['wall']:.1f} s "
                     f"({f_['steps']} steps){q_}; load {load:.1f}")
            for name in names:
                label = {"fvae": "FactorVAE", "qlib": "qlib GRU"}[name]
                t = tot[name]
                out[name]["seconds"].append(t["wall"])
                out[name]["cpu_seconds"].append(t["cpu"])
                out[name]["epoch_stock_days"] = t["stock_days"]
                _say(f"[bench train] epoch {epoch + 1} {label}: {t['steps']} steps, {t['wall']:.1f} s "
                     f"(CPU time {t['cpu']:.1f} s), {t['stock_days'] / t['wall']:,.0f} stock-days/s")
        for name, pool in pools.items():
            out[name].update(pool.submit(_worker_finish).result())
    return out


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.layout == "alpha360-like":
        if args.lookback not in (None, 60):
            print("error: --layout alpha360-like means T=60; drop --lookback or set it to 60", file=sys.stderr)
            return 2
        lookback = 60
    else:
        lookback = args.lookback or 20
    if args.epochs < 1 or args.warmup < 0 or lookback < 1 or args.slices < 1 or args.threads < 0:
        print("error: --epochs >= 1, --warmup >= 0, --lookback >= 1, --slices >= 1 and --threads >= 0 expected",
              file=sys.stderr)
        return 2
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu: no CUDA device is visible", file=sys.stderr)
        return 2
    if args.qlib and importlib.util.find_spec("qlib") is None:
        print("error: --qlib: pyqlib is not installed here; install it or pass --no-qlib to time FactorVAE alone",
              file=sys.stderr)
        return 2
    device = "cuda:0" if args.gpu else "cpu"
    batch_days = args.batch_days or (256 if args.gpu else 32)
    machine = describe_machine(gpu=args.gpu, threads=args.threads)
    _say(f"[bench train] {machine}")
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1)
    if busy and not args.gpu and args.threads != 1:
        _say("[bench train] the load is above the core count: several torch threads per process then wait on "
             "each other (small steps, such as qlib's 800-row batches, slow down by up to 100x); "
             "--threads 1 gives steadier figures")
    if args.cuda_graph and args.compile:
        print("error: --cuda-graph and --compile: choose one", file=sys.stderr)
        return 2
    if args.cuda_graph and not args.gpu:
        print("error: --cuda-graph needs --gpu", file=sys.stderr)
        return 2
    if args.bf16 and not args.gpu:
        _say("[bench train] --bf16 has no effect on the CPU (fit autocasts on CUDA only)")

    from fvae.data.shards import DataError, read_meta

    workdir = Path(tempfile.mkdtemp(prefix="fvae-bench-train-"))
    try:
        data = prepare_market(args, workdir, ignored="--stocks/--days/--lookback/--layout", lookback=lookback,
                              channels=6, smooth=min(10, lookback))
        meta = read_meta(data)
        job = Job(data=str(data.resolve()), device=device, hidden=args.hidden, factors=args.factors,
                  portfolios=args.portfolios, batch_days=batch_days, epochs=args.epochs, warmup=args.warmup,
                  bf16=args.bf16, compile=args.compile, cuda_graph=args.cuda_graph, seed=args.seed,
                  threads=args.threads)
        warm = (f"{args.warmup} warm-up epoch(s)" if args.warmup
                else f"no warm-up epoch ({WARMUP_STEPS_IF_NO_EPOCH} untimed steps)")
        qlib_line = (f"; qlib GRU H={args.hidden}, 1 layer, {QLIB_BATCH} rows/step; each model in its own process"
                     if args.qlib else "; qlib's GRU not timed (--no-qlib)")
        _say(f"[bench train] {args.epochs} timed epoch(s) after {warm}; FactorVAE H={args.hidden} "
             f"K={args.factors} M={args.portfolios}, {batch_days} days/step{qlib_line}")
        results = time_interleaved(job, slices=args.slices, qlib=args.qlib)
        if args.fit:
            _say("\n[bench train] (3) fvae.train.fit (each epoch: train + validation + checkpoint)")
            with _spawn() as pool:
                results["fit"] = pool.submit(time_fit, job).result()
        _summary(results, meta=meta, machine=describe_machine(gpu=args.gpu, threads=args.threads), gpu=args.gpu,
                 warmup=args.warmup)
    except (DataError, ValueError) as e:  # ValueError: a synthetic market the options cannot make
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _summary(r: dict[str, dict[str, Any]], *, meta: Any, machine: str, gpu: bool, warmup: int) -> None:  # noqa: ANN401
    mem = "peak GPU alloc" if gpu else "peak RSS"
    f, q = r["fvae"], r.get("qlib")
    _say("\n== summary ==")
    _say(f"  device: {machine}")
    _say("  timings on a shared machine are noisy (other tenants' load changes wall time by a factor, not by %); "
         "compare within one run, and see the CPU-time columns")
    _say(f"  data: {meta.instruments} stocks, train {meta.days.get('train', '?')} days, T={meta.lookback}, "
         f"C={meta.channels} ({meta.layout} layout); {f['stock_days']:,} training stock-days")
    _say(f"  {'':34} {'s/epoch':>9} {'CPU s/ep':>9} {'stock-days/s':>13} {'steps':>6} {mem:>15} {'params':>8}")
    rows = [("FactorVAE training loop", "fvae"), ("qlib GRU train_epoch", "qlib"),
            ("FactorVAE fit (train+valid+ckpt)", "fit")]
    for name, key in rows:
        if key not in r:
            continue
        x = r[key]
        s = _mean(x["seconds"])
        cpu = f"{_mean(x['cpu_seconds']):9.1f}" if x.get("cpu_seconds") else f"{'-':>9}"
        spread = f" (min {min(x['seconds']):.1f})" if len(x["seconds"]) > 1 else ""
        params = f"{x['params']:,}" if "params" in x else "-"
        _say(f"  {name:<34} {s:9.1f} {cpu} {x['stock_days'] / s:13,.0f} {x['steps']:6d} "
             f"{x['mem_peak']:11,.0f} MiB {params:>8}{spread}")
    _say(f"  peak memory: high-water mark from the end of data loading (warm-up included); in use then: FactorVAE "
         f"{f['mem_before']:,.0f} MiB" + (f", qlib GRU {q['mem_before']:,.0f} MiB" if q else "")
         + (f", fit {r['fit']['mem_before']:,.0f} MiB (fit's peak includes loading both segments)"
            if "fit" in r else "") + f"; torch threads {f['threads']}")
    timed = [k for k in ("fvae", "qlib") if k in r]
    spread = {k: max(r[k]["slice_walls"]) / max(min(r[k]["slice_walls"]), 1e-9) for k in timed}
    if len(f["slice_walls"]) > 1:
        _say(f"  seconds per stock-day, slowest slice / fastest: FactorVAE {spread['fvae']:.1f}x"
             + (f", qlib GRU {spread['qlib']:.1f}x" if q else "")
             + ("  <- the machine's load swung during the run: the figures are "
                "unreliable; repeat on a quiet machine or with --threads 1" if max(spread.values()) > 2 else ""))
    fv = _mean(f["seconds"])
    if gpu:
        target_panel = meta.instruments == 500 and meta.days.get("train") == 1750 and meta.lookback == 60
        verdict = (("met" if fv <= GPU_TARGET_S else "NOT met") if target_panel
                   else "not judged: this is not the target's panel")
        _say(f"  FactorVAE training epoch {fv:.2f} s; GPU target (one H100, 500 stocks x 1,750 training days, "
             f"T=60) <= {GPU_TARGET_S:.0f} s: {verdict}")
    if q is None:
        if "fit" in r:
            _say(f"  fit epoch (with validation) {_mean(r['fit']['seconds']):.2f} s; "
                 f"fit wall {r['fit']['wall']:.1f} s (incl. loading both segments)")
        return
    qv = _mean(q["seconds"])
    ratio = fv / qv
    verdict = "" if gpu else f"; target on CPU <= {CPU_TARGET}x: {'met' if ratio <= CPU_TARGET else 'NOT met'}"
    _say(f"  ratio FactorVAE epoch / qlib GRU epoch: {ratio:.2f}x (wall){verdict}")
    if not gpu:
        _say(f"  ratio by CPU time: {_mean(f['cpu_seconds']) / _mean(q['cpu_seconds']):.2f}x")
    _say(f"  per stock-day: FactorVAE {1e6 * fv / f['stock_days']:.1f} us, "
         f"qlib GRU {1e6 * qv / q['stock_days']:.1f} us")
    if "fit" in r:
        ft = r["fit"]
        _say(f"  ratio fit epoch (with validation) / qlib GRU epoch: {_mean(ft['seconds']) / qv:.2f}x; "
             f"fit wall {ft['wall']:.1f} s (incl. loading both segments)")
        if warmup == 0:
            _say("  note: fit has no untimed steps; with --warmup 0 its epoch includes one-time costs")
