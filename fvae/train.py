"""Training: one loop, run standalone or as Ray Train's ``train_loop_per_worker``.

    python -m fvae.train --data DIR --out RUN_DIR [--config FILE] [--set key=value ...]
                         [--workers N] [--gpu] [--resume | --overwrite]

The loop (``fit``) only knows torch and torch.distributed. Standalone it runs in
this process; with ``--workers N`` the driver builds a Ray Train TorchTrainer whose
workers call the same ``fit`` (DDP: NCCL on GPU, gloo on CPU). Ray is imported in
the marked section at the bottom only.

RUN_DIR receives:
    config.yaml               the resolved config (re-runnable with --config)
    checkpoints/last/         state.pt: model, optimizer, schedule, epoch, RNG, config, data fingerprint
    best.pt                   best-epoch weights by validation Rank ICIR, with config and fingerprint
    tb/                       TensorBoard scalars per epoch and an hparams record
    pred_{valid,test}.parquet (datetime, instrument) -> score, sigma, sigma_alpha, beta_k, resid_beta_p,
                              alpha_u: one row per stock-day; σ's are the raw model's (the calibrated Σ
                              multiplies σ_z,k² by c_z[k] and σ_α² by c_alpha from metrics.json's
                              risk_calibration, and adds the residual factors resid_beta_p and the
                              alpha factor alpha_u)
    pred_{valid,test}.pkl     the same scores in qlib's pred.pkl layout
    factors_{valid,test}.parquet  per-day prior factor distribution (mu_z_k, sigma_z_k), the
                              residual factors' std (resid_sigma_p) and the alpha factor's (alpha_sigma)
    metrics.json              ic, icir, rank_ic, rank_icir for valid and test, plus the epoch history;
                              risk: bias statistics per segment of the raw Σ; risk_calibration: the scalars
                              c_z (one per factor), c_alpha and c_mu (the alpha factor) fit on the
                              validation segment with the residual factors in Σ
                              (fvae.risk.calibrate_risk) and risk_calibrated: the bias statistics of the
                              calibrated Σ per segment
    curves.png                training curves
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from fvae import config as fconfig
from fvae.data.loader import Batch, LoaderConfig, Panel, epoch_batches, load_panel, shard_batches
from fvae.data.shards import RUN_MARKERS, TRUTH_FILE, DataError, Meta, check_shards, read_meta
from fvae.io import atomic_to_parquet, atomic_to_pickle, atomic_torch_save, atomic_write_json, pyplot
from fvae.metrics import daily_ic, daily_rank_ic, summarize
from fvae.model import FactorVAE, ModelConfig
from fvae.progress import step_bar
from fvae.ray_local import RayStartError, sigterm_as_sigint
from fvae.risk import (ACTIVE_KL, RESIDUAL_WINDOW, alpha_factor, apply_calibration, beta_span_r2, bias_statistics,
                       calibrate_risk, canonical_correlations, oracle_factors, residual_factors)


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm, applied before the optimizer step; 0 = off
    patience: int = 5  # epochs without a better validation Rank ICIR before stopping; 0 = off
    seed: int = 0
    bf16: bool = False  # autocast to bfloat16 on the GPU
    compile: bool = False  # torch.compile the model
    cuda_graph: bool = False  # one CUDA graph per training step (one GPU, one process; see GraphStep)
    eval_batch_days: int = 64
    nonfinite: Literal["skip", "raise"] = "skip"  # what a NaN/inf loss does to its step
    max_skipped_fraction: float = 0.25  # more skipped steps than this in an epoch is an error
    kl_warmup_epochs: int = 0  # the KL weight rises linearly from γ/E to γ over the first E epochs

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"train.epochs: expected >= 1, got {self.epochs}")
        if not self.lr > 0:  # also NaN
            raise ValueError(f"train.lr: expected > 0, got {self.lr}")
        if self.patience < 0 or self.grad_clip < 0:
            raise ValueError("train.patience and train.grad_clip: expected >= 0")
        if self.kl_warmup_epochs < 0:
            raise ValueError(f"train.kl_warmup_epochs: expected >= 0, got {self.kl_warmup_epochs}")
        if self.cuda_graph and self.compile:
            raise ValueError("train.cuda_graph and train.compile: choose one")


@dataclass(kw_only=True)
class Config:
    data: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


DEBUG_PRESET = [  # trains in seconds on a tiny synthetic market; used by tests and `--set` examples
    "model.hidden_size=16", "model.num_factors=4", "model.num_portfolios=8",
    "train.epochs=2", "data.batch_days=16",
]


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm went NaN/inf (with train.nonfinite=raise, or too often with skip)."""


# --------------------------------------------------------------------------- the loop
#
#   fit                 restore -> train_epochs -> write outputs       (FactorVAE, standalone or a DDP rank)
#   train_epochs        train_epoch -> validate -> EarlyStopping        (every network: FactorVAE, MLP, GRU)
#   train_epoch         this rank's share of each global batch -> step  (also what fvae.bench times)
#   EagerStep.step / GraphStep.step
#                       forward, loss, backward, grad norm, skip-or-AdamW


@dataclass
class Dist:
    """Where this process sits: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t


class Reporter(Protocol):
    def __call__(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def build_model(cfg: Config, num_features: int) -> FactorVAE:
    return FactorVAE(cfg.model, num_features=num_features)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; for a CUDA graph, capturable, with the learning rate a device tensor the schedule fills."""
    if cfg.cuda_graph:
        lr = torch.tensor(cfg.lr, dtype=torch.float32, device=device)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, capturable=True,
                                 foreach=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then cosine from lr to 5 % of lr (or constant)."""
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass(frozen=True)
class Objective:
    """What a network minimises. ``terms(net, batch)`` gives (P, B) per-day terms named ``names``:
    row 0 is the loss that is minimised, the others are logged beside it."""

    names: tuple[str, ...]
    terms: Callable[[torch.nn.Module, Batch], torch.Tensor]


def _factorvae_terms(net: torch.nn.Module, b: Batch) -> torch.Tensor:
    p = net(b.x, b.y, b.mask)
    return torch.stack([p.loss, p.nll, p.kl]).float()  # (3, B): NLL + γ·KL, NLL, KL per day


FACTORVAE = Objective(names=("loss", "nll", "kl"), terms=_factorvae_terms)


def weighted_sums(terms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(P + 1,): Σ_d w_d · term_d for each of the (P, B) terms, then Σ_d w_d.

    A day of weight 0 (a rank's stand-in, a padded graph slot) adds exactly 0, even if its terms
    are NaN: a select, not 0 · NaN.
    """
    per = torch.where(weight > 0, terms * weight, 0.0)  # (P, B)
    return torch.cat([per.sum(1), weight.sum()[None]])


def grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients, which are first clipped to ``max_norm`` when it is > 0."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


class Step(Protocol):
    """One optimizer step on this rank's ``days`` of a global batch of ``global_days`` days.

    Returns (finite, sums): finite is False when the loss or the gradient norm was NaN/inf on
    any rank, and then neither the weights nor the optimizer moved; sums are ``weighted_sums``
    of the objective's terms on this rank's days.
    """

    net: torch.nn.Module
    optim: torch.optim.Optimizer
    objective: Objective

    def step(self, days: np.ndarray, weight: np.ndarray, *, global_days: int) -> tuple[bool, torch.Tensor]: ...


class EagerStep:
    """The step as plain PyTorch: forward (bf16 autocast on CUDA when asked), backward, clip, AdamW.

    The loss is Σ_d w_d ℓ_d · W / B over this rank's days, W ranks and the B days of the global
    batch: DDP averages gradients over ranks, so every rank applies the gradient of the mean loss
    over the global batch. A rank whose only day is a stand-in (weight 0) backpropagates
    0 · Σ θ instead: every parameter gets a zero gradient (DDP waits for all of them), and no
    NaN of that day can reach the all-reduce. One host sync per step reads whether the loss and
    the gradient norm were finite on every rank.
    """

    def __init__(self, net: torch.nn.Module, optim: torch.optim.Optimizer, panel: Panel, *, d: Dist,
                 grad_clip: float, bf16: bool = False, objective: Objective = FACTORVAE) -> None:
        self.net, self.optim, self.panel, self.d, self.objective = net, optim, panel, d, objective
        self.grad_clip = grad_clip
        self.autocast = bf16 and d.device.type == "cuda"
        self.params = [p for g in optim.param_groups for p in g["params"]]

    def step(self, days: np.ndarray, weight: np.ndarray, *, global_days: int) -> tuple[bool, torch.Tensor]:
        b = self.panel.batch(days, weight)
        with torch.autocast(device_type=self.d.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            terms = self.objective.terms(self.net, b).float()  # (P, B)
        sums = weighted_sums(terms, b.weight)
        if float(np.sum(weight)) > 0:
            loss = sums[0] * (self.d.world_size / global_days)
        else:
            loss = 0.0 * sum(p.sum() for p in self.params)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        norm = grad_norm(self.params, self.grad_clip)
        bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float().reshape(1)
        if self.d.all_reduce(bad, op="max").item() > 0:
            self.optim.zero_grad(set_to_none=True)  # the clip may have scaled them by NaN: drop them
            return False, sums.detach()
        self.optim.step()
        return True, sums.detach()


class GraphStep:
    """The step (forward, backward, clipping, AdamW) captured once as a CUDA graph, then replayed.

    Why (measured on an H100, 500 stocks x 29 days x T = 60; README, Benchmarks): eager, a step's
    ~26 ms of kernels, 19 of them in one cuDNN GRU backward kernel, sit behind ~36 ms of launches and
    host syncs. PyTorch's own fused GRU cell needs ~8 ms of kernels for the whole step but ~1,000
    launches; replayed from a graph, those launches cost nothing and the step takes ~10 ms.

    A graph needs fixed shapes and no host decisions inside it, so:
      - every batch is ``Panel.dense_batch``: ``size`` day slots x all N stocks, padded days weighted 0;
      - the GRU runs over padded stocks too (``gather_real_rows = False``), and without cuDNN;
      - the optimizer is ``make_optimizer``'s capturable AdamW, whose learning rate is a device tensor
        that the schedule fills in place between replays;
      - a non-finite loss or gradient norm cannot branch inside the graph: the graph first copies the
        parameters and the optimizer state aside, and a step whose loss or norm comes out non-finite
        is undone from that copy (one host sync per step reads the flag, as the eager step does).
    One GPU, one process: there is no all-reduce inside the graph.
    """

    WARMUP = 3  # eager steps on a side stream before capture, as torch.cuda.graphs asks

    def __init__(self, model: FactorVAE, optim: torch.optim.Optimizer, panel: Panel, *, size: int, bf16: bool,
                 grad_clip: float, objective: Objective = FACTORVAE) -> None:
        dev = panel.feat.device
        if dev.type != "cuda":
            raise ValueError("train.cuda_graph: needs a CUDA device (--gpu)")
        self.net, self.optim, self.panel, self.size, self.objective = model, optim, panel, size, objective
        self.bf16, self.grad_clip = bf16, grad_clip
        model.gather_real_rows = False
        self.batch = panel.dense_batch(np.zeros(1, dtype=np.int64), size=size)  # static inputs
        self.scale = torch.ones((), device=dev)  # 1 / days of the global batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.finite = torch.ones((), dtype=torch.bool, device=dev)  # static outputs, set by _body
        self.sums = torch.zeros(len(objective.names) + 1, device=dev)
        self._capture()

    def _state(self) -> list[torch.Tensor]:
        return [t for p in self.params for t in self.optim.state[p].values() if torch.is_tensor(t)]

    def _body(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.backup, [*self.params, *self._state()])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False), \
                torch.backends.cudnn.flags(enabled=False):
            terms = self.objective.terms(self.net, self.batch).float()  # (P, size)
        sums = weighted_sums(terms, self.batch.weight)
        loss = sums[0] * self.scale
        loss.backward()
        norm = grad_norm(self.params, self.grad_clip)
        self.optim.step()
        # detached: holding the autograd graph would keep its nodes on the warm-up stream
        self.finite = (torch.isfinite(loss) & torch.isfinite(norm)).detach()
        self.sums = sums.detach()

    def _capture(self) -> None:
        """Warm up with a zero learning rate (so the weights do not move), put the optimizer state back
        as it was, then capture."""
        lr = self.optim.param_groups[0]["lr"]
        if not torch.is_tensor(lr) or len(self.optim.param_groups) != 1:
            raise ValueError("GraphStep: expected make_optimizer's AdamW (one group, a device tensor lr)")
        lr_was = lr.clone()
        had = {id(t): t.clone() for t in self._state()}  # empty for a fresh optimizer
        weights = [p.detach().clone() for p in self.params]
        lr.zero_()
        self.backup = [p.detach().clone() for p in self.params]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.optim.zero_grad(set_to_none=True)
                self._body()
                self.backup = [t.detach().clone() for t in [*self.params, *self._state()]]
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t in self._state():
                t.copy_(had[id(t)]) if id(t) in had else t.zero_()
            torch._foreach_copy_(self.params, weights)
        lr.copy_(lr_was)
        self.optim.zero_grad(set_to_none=True)  # backward inside the graph allocates the grads it replays
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()

    def step(self, days: np.ndarray, weight: np.ndarray, *, global_days: int) -> tuple[bool, torch.Tensor]:
        b = self.panel.dense_batch(days, weight, size=self.size)
        for name in ("x", "y", "mask", "weight"):
            getattr(self.batch, name).copy_(getattr(b, name))
        self.scale.fill_(1.0 / global_days)
        self.graph.replay()
        if bool(self.finite):
            return True, self.sums
        with torch.no_grad():
            torch._foreach_copy_([*self.params, *self._state()], self.backup)
        return False, self.sums


def graph_slots(num_days: int, data: LoaderConfig, lookback: int) -> int:
    """The most days any batch of ``epoch_batches`` can hold: the day slots of a GraphStep."""
    if data.non_overlap and lookback > 1:
        return min(data.batch_days, -(-num_days // lookback))
    return min(data.batch_days, num_days)


def train_epoch(step: Step, batches: list[np.ndarray], *, d: Dist, sched: Any = None, epoch: int = 0,
                nonfinite: Literal["skip", "raise"] = "skip", max_skipped_fraction: float = 1.0,
                days_per_step: int | None = None,
                on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """One step per global batch of ``batches`` on this rank's share of its days (``shard_batches``).

    Each step's loss is the sum over its days divided by ``days_per_step`` (the nominal batch size,
    ``data.batch_days``), not by the days the batch happens to hold: a day left in a short batch
    at the end of a run weighs what any other day weighs. None divides by the batch's own days.

    Returns the day-weighted mean of each objective term over every rank's days, the steps run
    (and the fewest/most over ranks, which DDP needs equal) and the steps skipped as non-finite.
    ``sched`` (an LR scheduler) steps after every step, skipped or not. ``on_step(i, steps, loss)``
    follows every step with this rank's running mean loss (a progress bar: ``fvae.progress.StepBar``).
    """
    step.net.train()
    names = step.objective.names
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=d.device)  # terms..., days
    skipped = 0
    for i, (global_days, (days, weight)) in enumerate(
            zip(batches, shard_batches(batches, rank=d.rank, world_size=d.world_size)), 1):
        finite, part = step.step(days, weight, global_days=days_per_step or len(global_days))
        if sched is not None:
            sched.step()
        if finite:
            sums += part.double()
        elif nonfinite == "raise":
            raise NonFiniteLossError(f"epoch {epoch}: step {i}'s loss or gradient norm is not finite "
                                     "(train.nonfinite=raise)")
        else:
            skipped += 1
        if on_step is not None:  # (the running loss costs a host sync: only for a bar that draws)
            on_step(i, len(batches), (sums[0] / sums[-1].clamp_min(1.0)).item())
    d.all_reduce(sums)
    steps = torch.tensor([len(batches), -len(batches)], dtype=torch.float64, device=d.device)
    d.all_reduce(steps, op="max")  # -> (max over ranks, -min over ranks)
    if skipped > max_skipped_fraction * len(batches):
        raise NonFiniteLossError(f"epoch {epoch}: {skipped} of {len(batches)} steps had a non-finite loss or "
                                 f"gradient norm (more than train.max_skipped_fraction={max_skipped_fraction})")
    n = max(sums[-1].item(), 1.0)
    return {**{k: sums[j].item() / n for j, k in enumerate(names)}, "skipped_steps": skipped,
            "steps": len(batches), "rank_steps_min": int(-steps[1].item()), "rank_steps_max": int(steps[0].item()),
            "train_days": int(n)}


@dataclass(kw_only=True)
class EarlyStopping:
    """The best epoch by validation Rank ICIR (higher is better; undefined counts as -inf), its
    weights on the CPU, and whether ``patience`` epochs in a row brought nothing better (0: never)."""

    patience: int
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None

    METRIC = "rank_icir"  # the validation metric every network (FactorVAE, MLP, GRU) is selected on

    def update(self, epoch: int, val: dict[str, float], model: torch.nn.Module) -> None:
        score = val[self.METRIC] if math.isfinite(val[self.METRIC]) else -math.inf
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:  # checkpoint keys, as tune.evaluate_best and resume read them
        return {"best": {"rank_icir": self.best_score, "epoch": self.best_epoch}, "bad_epochs": self.bad_epochs,
                "best_model": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state["best"]["rank_icir"], state["best"]["epoch"]
        self.bad_epochs, self.best_state = state["bad_epochs"], state["best_model"]


def train_epochs(step: Step, *, epochs: range, batches: Callable[[int], list[np.ndarray]],
                 validate: Callable[[], dict[str, float]], stopper: EarlyStopping, history: list[dict[str, Any]],
                 model: torch.nn.Module, d: Dist, sched: Any = None, nonfinite: Literal["skip", "raise"] = "skip",
                 max_skipped_fraction: float = 1.0, days_per_step: int | None = None,
                 before_epoch: Callable[[int], None] | None = None,
                 after_epoch: Callable[[dict[str, Any]], None] | None = None,
                 on_step: Callable[[int, int, float], None] | None = None) -> list[dict[str, Any]]:
    """The epoch loop of every network: train an epoch, validate, update ``stopper``, append the
    epoch's row to ``history``, call ``after_epoch(row)``; stop early when ``stopper`` says so.
    ``model`` is the bare module whose best weights ``stopper`` keeps (``step.net`` may wrap it)."""
    for epoch in epochs:
        if stopper.stop:
            break
        t0 = time.time()
        if before_epoch is not None:
            before_epoch(epoch)
        row: dict[str, Any] = {"epoch": epoch, **train_epoch(step, batches(epoch), d=d, sched=sched, epoch=epoch,
                                                             nonfinite=nonfinite, days_per_step=days_per_step,
                                                             max_skipped_fraction=max_skipped_fraction,
                                                             on_step=on_step)}
        row["lr"] = float(step.optim.param_groups[0]["lr"])
        val = validate()
        row.update(seconds=time.time() - t0, **{f"valid_{k}": v for k, v in val.items()})
        stopper.update(epoch, val, model)
        row["best_valid_rank_icir"] = stopper.best_score
        row["bad_epochs"] = stopper.bad_epochs  # lets a search tell a patience stop from a scheduler's cut
        history.append(row)
        if after_epoch is not None:
            after_epoch(row)
    return history


@torch.no_grad()
def predict_panel(model: FactorVAE, panel: Panel, *, days: np.ndarray | None = None, batch_days: int = 64,
                  bf16: bool = False) -> dict[str, torch.Tensor]:
    """Prediction for every (day, stock) of ``panel`` (or of ``days``), as dense (D, N) tensors."""
    model.eval()
    D, N = panel.num_days, len(panel.instruments)
    dev = panel.feat.device
    K = model.cfg.num_factors
    out = {"mu": torch.zeros(D, N, device=dev), "sigma": torch.zeros(D, N, device=dev),
           "sigma_alpha": torch.zeros(D, N, device=dev), "beta": torch.zeros(D, N, K, device=dev),
           "mu_z": torch.zeros(D, K, device=dev), "sigma_z": torch.zeros(D, K, device=dev)}
    days = np.arange(D) if days is None else days
    for i in range(0, len(days), batch_days):
        b = panel.batch(days[i:i + batch_days])
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
            p = model.predict(b.x, b.mask)
        rows = b.day[:, None].expand_as(b.stock)
        m = b.mask
        out["mu"][rows[m], b.stock[m]] = p.mu[m].float()
        out["sigma"][rows[m], b.stock[m]] = p.sigma[m].float()
        out["sigma_alpha"][rows[m], b.stock[m]] = p.sigma_alpha[m].float()
        out["beta"][rows[m], b.stock[m]] = p.beta[m].float()
        out["mu_z"][b.day] = p.mu_z.float()
        out["sigma_z"][b.day] = p.sigma_z.float()
    return out


@torch.no_grad()
def evaluate_panel(model: FactorVAE, panel: Panel, d: Dist, *, batch_days: int, bf16: bool = False) -> dict:
    """Valid/test metrics over ALL days of the panel, each rank scoring its share of days.

    Scored against the raw return ``ret``: IC, ICIR, Rank IC, Rank ICIR of the prior's forecast.
    Diagnostics, from the labels the model trains on: ``rank_ic_post`` (the posterior's
    reconstruction, which sees the day's returns: far above the forecast when the posterior is
    informative), ``kl_per_factor`` (mean nats per day), ``active_factors`` (mean KL above
    ACTIVE_KL) and ``common_share`` (Σ β² σ_z² / Σ (β² σ_z² + σ_α²) over stock-days: the share of
    predicted variance the factors carry).
    """
    model.eval()
    dev, D, K = panel.feat.device, panel.num_days, model.cfg.num_factors
    mine = np.arange(D)[d.rank::d.world_size]
    # per day: ic, rank ic, posterior rank ic, defined, covered, common var, idio var; then K KL columns
    acc = torch.zeros(D, 7 + K, dtype=torch.float64, device=dev)
    for i in range(0, len(mine), batch_days):
        b = panel.batch(mine[i:i + batch_days])
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
            g = model.diagnose(b.x, b.y, b.mask)
        a = daily_ic(g.mu_prior.float(), b.ret, b.mask)
        r = daily_rank_ic(g.mu_prior.float(), b.ret, b.mask)
        rp = daily_rank_ic(g.mu_post.float(), b.y, b.mask)
        ok = torch.isfinite(a) & torch.isfinite(r)
        acc[b.day] = torch.cat([torch.stack([torch.where(ok, a, 0.0), torch.where(ok, r, 0.0),
                                             torch.nan_to_num(rp), ok.double(), torch.ones_like(a),
                                             g.common_var.sum(1), g.idio_var.sum(1)], 1).double(),
                                g.kl.double()], 1)
    d.all_reduce(acc)
    defined = acc[:, 3] > 0
    nan = torch.full_like(acc[:, 0], math.nan)
    res = summarize(torch.where(defined, acc[:, 0], nan), torch.where(defined, acc[:, 1], nan))
    res["days_covered"] = int(acc[:, 4].sum().item())
    res["rank_ic_post"] = float(acc[defined, 2].mean().item()) if defined.any() else math.nan
    kl = acc[:, 7:].mean(0)  # (K,)
    res["kl_per_factor"] = [float(v) for v in kl.tolist()]
    res["active_factors"] = int((kl > ACTIVE_KL).sum().item())
    res["common_share"] = float((acc[:, 5].sum() / (acc[:, 5] + acc[:, 6]).sum().clamp_min(1e-30)).item())
    return res


@dataclass
class Run:
    """What ``fit`` trains: the model, the module the step calls (DDP and/or compiled around it),
    the optimizer and the learning-rate schedule."""

    model: FactorVAE
    net: torch.nn.Module
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR


def day_batches(cfg: Config, panel: Panel, epoch: int) -> list[np.ndarray]:
    """The global day batches of ``epoch``: the same on every rank (a function of seed and epoch)."""
    return epoch_batches(panel.num_days, batch_days=cfg.data.batch_days, lookback=panel.lookback,
                         non_overlap=cfg.data.non_overlap, seed=cfg.train.seed, epoch=epoch,
                         day_fraction=cfg.data.day_fraction)


def build_run(cfg: Config, *, panel: Panel, d: Dist, num_features: int) -> Run:
    model = build_model(cfg, num_features).to(d.device)
    net: torch.nn.Module = model
    if d.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    optim = make_optimizer(model, cfg.train, d.device)
    total = len(day_batches(cfg, panel, 0)) * cfg.train.epochs
    return Run(model=model, net=net, optim=optim, sched=torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg.train, total)))


def make_step(cfg: Config, run: Run, panel: Panel, d: Dist) -> EagerStep | GraphStep:
    """The step ``fit`` trains with (and ``fvae.bench train`` times); build it after ``restore``: a graph
    captures the optimizer state it finds."""
    t = cfg.train
    if t.cuda_graph:
        return GraphStep(run.model, run.optim, panel, bf16=t.bf16, grad_clip=t.grad_clip,
                         size=graph_slots(panel.num_days, cfg.data, panel.lookback))
    return EagerStep(run.net, run.optim, panel, d=d, grad_clip=t.grad_clip, bf16=t.bf16)


def restore(run: Run, state: dict[str, Any] | None, *, cfg: Config, d: Dist) -> tuple[int, list[dict], EarlyStopping]:
    """Continue from a checkpoint's state (or start): returns (first epoch, history, early stopping)."""
    stopper = EarlyStopping(patience=cfg.train.patience)
    if state is None:
        return 0, [], stopper
    run.model.load_state_dict(state["model"])
    run.optim.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    if cfg.train.cuda_graph:  # the loaded learning rate must stay the device tensor a graph reads
        for g in run.optim.param_groups:
            g["lr"] = torch.as_tensor(g["lr"], dtype=torch.float32, device=d.device)
    ranks = state["rng"].get("ranks") or []
    rng = ranks[d.rank] if len(ranks) == d.world_size else state["rng"]  # rank 0's for another world size
    torch.set_rng_state(rng["torch"])
    if d.device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], d.device)
    stopper.load_state_dict(state)
    return state["epoch"] + 1, state["history"], stopper


def rng_states(d: Dist) -> list[dict[str, torch.Tensor | None]]:
    """Every rank's torch (and CUDA) RNG state, in rank order (a collective: call it on every rank)."""
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None}
    if d.world_size == 1:
        return [mine]
    ranks: list[Any] = [None] * d.world_size
    dist.all_gather_object(ranks, mine)
    return ranks


def save_checkpoint(out: Path, run: Run, *, cfg: Config, meta: Meta, history: list[dict],
                    stopper: EarlyStopping, rng: list[dict[str, Any]]) -> Path:
    """checkpoints/last/state.pt: everything ``restore`` needs to continue bit for bit, on every rank
    (``rng``: ``rng_states``; rank 0's also at the top level, for a resume with another world size)."""
    state = {"model": run.model.state_dict(), "optimizer": run.optim.state_dict(),
             "scheduler": run.sched.state_dict(), "epoch": history[-1]["epoch"], "config": fconfig.to_dict(cfg),
             "fingerprint": meta.fingerprint, "num_features": meta.channels, "history": history,
             **stopper.state_dict(), "rng": {**rng[0], "ranks": rng}}
    path = out / "checkpoints" / "last"
    atomic_torch_save(path / "state.pt", state)
    return path


def load_state(path: Path) -> dict[str, Any]:
    f = path / "state.pt" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no checkpoint there")
    return torch.load(f, map_location="cpu", weights_only=False)


RESUME_MAY_CHANGE = ("train.epochs", "train.patience")  # how long a resumed run goes on; nothing else


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume(state: dict[str, Any], cfg: Config, *, meta: Meta, data: Path) -> None:
    """A checkpoint continues only with the data and the config it was trained with: one line
    naming what differs (and how), rather than a state_dict size mismatch."""
    if state.get("fingerprint") != meta.fingerprint:
        raise DataError(f"{data}: content fingerprint differs from the checkpoint's; "
                        "resume with the data it was trained on")
    old, new = _flat(state.get("config") or {}), _flat(fconfig.to_dict(cfg))
    default = _flat(fconfig.to_dict(Config()))
    diff = [k for k in sorted(set(old) | set(new)) if k not in RESUME_MAY_CHANGE
            and old.get(k, default.get(k)) != new.get(k)]
    if diff:
        shown = ", ".join(f"{k} (checkpoint {old.get(k, default.get(k))!r}, now {new.get(k)!r})" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise fconfig.ConfigError(f"--resume: the config differs from the checkpoint's in {shown}{more}; resume with "
                                  "the run's own config (--config RUN_DIR/config.yaml) or train into a new --out")


def kl_weight(tcfg: TrainConfig, epoch: int) -> float:
    """The share of γ applied in ``epoch``: (epoch + 1) / E over the first E = kl_warmup_epochs, then 1."""
    return min(1.0, (epoch + 1) / tcfg.kl_warmup_epochs) if tcfg.kl_warmup_epochs else 1.0


TIMINGS_FILE = "timings.json"


class Timings:
    """A run's fixed costs in seconds, outside its epochs: what a search's per-trial overhead is
    made of. Rank 0 writes them to RUN_DIR/timings.json (``python -m fvae.bench tune`` sums them)."""

    def __init__(self, out: Path | None, *, started: float | None) -> None:
        self.path = out / TIMINGS_FILE if out is not None else None
        # the caller's start-up before fit (a Tune trial: Ray Train's controller and worker group)
        self.t: dict[str, Any] = {} if started is None else {"started_at": started, "start_s": time.time() - started}
        self.mark = time.perf_counter()

    def lap(self, name: str) -> None:
        """Charge the time since the last mark to ``name``."""
        now = time.perf_counter()
        self.t[name] = self.t.get(name, 0.0) + now - self.mark
        self.mark = now

    def write(self, **facts: Any) -> None:
        self.t.update(facts)
        if self.path is not None:
            atomic_write_json(self.path, {**self.t, "written_at": time.time()})


def fit(cfg: Config, *, data: Path, out: Path, d: Dist, report: Reporter | None = None,
        resume: dict[str, Any] | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
        write_outputs: bool = True, started: float | None = None) -> dict[str, Any]:
    """Train, early-stop on validation Rank ICIR, write outputs on rank 0. Returns metrics.

    ``report(metrics, checkpoint_dir)`` is called once per epoch on every rank (rank 0
    passes the checkpoint folder; the others pass None). ``resume`` is a state dict from a
    checkpoint to continue from. ``started`` (a ``time.time()``) is when the caller began, so
    that timings.json includes the caller's start-up.
    """
    data, out, tcfg = Path(data), Path(out), cfg.train
    tm = Timings(out if d.is_main else None, started=started)
    meta = read_meta(data)
    if resume is not None:
        check_resume(resume, cfg, meta=meta, data=data)
    if tcfg.cuda_graph and (d.device.type != "cuda" or d.world_size > 1):
        raise ValueError("train.cuda_graph: needs one CUDA device in one process (--gpu, no --workers > 1)")
    seed_all(tcfg.seed)
    train_p, valid_p = (load_panel(data, s, meta=meta, handler=cfg.data.handler).to(d.device) for s in ("train", "valid"))
    tm.lap("data_load_s")
    run = build_run(cfg, panel=train_p, d=d, num_features=meta.channels)
    start, history, stopper = restore(run, resume, cfg=cfg, d=d)
    tm.lap("build_s")
    step = make_step(cfg, run, train_p, d)
    tm.lap("step_setup_s")  # a GraphStep captures its CUDA graph here
    writer = _TensorBoard(out / "tb", cfg) if d.is_main and write_outputs else None
    if d.is_main:
        fconfig.dump(cfg, out / "config.yaml")
        _announce(cfg, train_p, valid_p, d)
    tm.write(data_source=train_p.source)

    def after_epoch(row: dict[str, Any]) -> None:
        row["start_epoch"] = start  # where this process began: 0, or the epoch after a checkpoint it resumed
        rng = rng_states(d)
        ckpt = save_checkpoint(out, run, cfg=cfg, meta=meta, history=history, stopper=stopper, rng=rng) \
            if d.is_main else None
        if writer:
            writer.epoch(row)
        if d.is_main:
            _print_epoch(row, epochs=tcfg.epochs)
        if report is not None:
            report(row, ckpt)
        if on_epoch_end is not None:
            on_epoch_end(row["epoch"], row)

    current = [start]

    def before_epoch(epoch: int) -> None:
        current[0] = epoch
        run.model.kl_scale.fill_(kl_weight(tcfg, epoch))

    bar = step_bar(lambda: f"[fvae] epoch {current[0] + 1}/{tcfg.epochs}", enabled=d.is_main)
    train_epochs(step, epochs=range(start, tcfg.epochs), batches=lambda e: day_batches(cfg, train_p, e),
                 validate=lambda: evaluate_panel(run.model, valid_p, d, batch_days=tcfg.eval_batch_days, bf16=tcfg.bf16),
                 stopper=stopper, history=history, model=run.model, d=d, sched=run.sched, nonfinite=tcfg.nonfinite,
                 max_skipped_fraction=tcfg.max_skipped_fraction, days_per_step=cfg.data.batch_days,
                 before_epoch=before_epoch, after_epoch=after_epoch, on_step=bar)
    finished_before = bool(history) and history[-1]["epoch"] < start  # resumed with nothing left to train
    if report is not None and finished_before:
        # report the last epoch again, so that a caller waiting for metrics (a Tune trial
        # restored after its run had finished) gets them
        report(history[-1], None)
    result = {"history": history, "best_epoch": stopper.best_epoch, "stopped_early": stopper.stop,
              "epochs_run": len(history)}
    if stopper.best_state is not None:
        run.model.load_state_dict(stopper.best_state)
    tm.mark = time.perf_counter()  # the epochs are timed in the history, not here
    if finished_before and (out / "metrics.json").is_file():
        write_outputs = False  # they were written when the run finished; a resumed search must not touch them
    if d.is_main and write_outputs:
        result.update(write_run_outputs(run.model, cfg, meta, data=data, out=out, history=history,
                                        best=stopper.state_dict()["best"], device=d.device))
        if writer:
            writer.close(result)
        tm.lap("outputs_s")
    tm.write(epochs_s=sum(h.get("seconds", 0.0) for h in history if h["epoch"] >= start), fit_end=time.time())
    return result


def _announce(cfg: Config, train_p: Panel, valid_p: Panel, d: Dist) -> None:
    frac = cfg.data.day_fraction
    print(f"[fvae] train {train_p.num_days} days x {len(train_p.instruments)} stocks, "
          f"valid {valid_p.num_days} days; {len(day_batches(cfg, train_p, 0))} steps/epoch of {cfg.data.batch_days} days"
          f"{' (non-overlapping)' if cfg.data.non_overlap else ''}"
          f"{f'; day_fraction={frac}: {frac:.0%} of training days per epoch' if frac < 1 else ''}; "
          f"world_size={d.world_size}, device={d.device}", flush=True)
    if train_p.incomplete_days:
        print(f"[fvae] the first {train_p.incomplete_days} training days have no complete {train_p.lookback}-day "
              "window (the shards hold no history before the train segment; re-export to include it): "
              "they are left out", flush=True)


def _print_epoch(row: dict[str, Any], *, epochs: int) -> None:
    skipped = row["skipped_steps"]
    print(f"[fvae] epoch {row['epoch'] + 1}/{epochs} loss {row['loss']:.4f} (nll {row['nll']:.4f} "
          f"kl {row['kl']:.4f}) valid IC {row['valid_ic']:.4f} RankIC {row['valid_rank_ic']:.4f} "
          f"RankICIR {row['valid_rank_icir']:.3f} | posterior RankIC {row['valid_rank_ic_post']:.3f}, "
          f"{row['valid_active_factors']} active factors, common variance {row['valid_common_share']:.0%} "
          f"[{row['seconds']:.1f}s"
          f"{f', {skipped} skipped' if skipped else ''}]", flush=True)


def write_run_outputs(model: FactorVAE, cfg: Config, meta: Meta, *, data: Path, out: Path,
                      history: list[dict], best: dict, device: torch.device) -> dict[str, Any]:
    """best.pt, predictions, metrics.json and curves.png for a finished run."""
    atomic_torch_save(out / "best.pt", {"model": model.state_dict(), "config": fconfig.to_dict(cfg),
                                        "fingerprint": meta.fingerprint, "num_features": meta.channels, "best": best})
    metrics: dict[str, Any] = {}
    cal: dict[str, Any] | None = None  # fit on the validation segment, checked on every segment
    # a synthetic market's planted β, read with the validation panel for factor_recovery
    truth = tuple(f"beta_true_{k}" for k in range(int(meta.extra["generator"]["factors"]))) \
        if (data / TRUTH_FILE).is_file() else ()
    cal = None  # the risk model's calibration, fit on the validation segment
    lag = label_horizon(meta.label_expr)  # days until a day's label is realised
    if lag is None:
        print(f"[fvae] note: no residual factors in the risk model: {data / 'meta.json'}'s label_expr "
              f"{meta.label_expr!r} does not say when a day's label is realised (Ref($close, -k))", flush=True)
    for seg in ("valid", "test"):
        if seg not in meta.segments:
            continue
        extra = truth if seg == "valid" else ()
        panel = load_panel(data, seg, meta=meta, handler=cfg.data.handler, extra_columns=extra).to(device)
        pred = predict_panel(model, panel, batch_days=cfg.train.eval_batch_days, bf16=cfg.train.bf16)
        res = summarize(daily_ic(pred["mu"], panel.ret, panel.valid), daily_rank_ic(pred["mu"], panel.ret, panel.valid))
        metrics[seg] = res
        metrics.setdefault("risk", {})[seg] = risk_bias(panel, pred, seed=cfg.train.seed)
        resid = segment_residual_factors(panel, pred, lag=lag)
        if seg == "valid":
            cal = fit_risk_calibration(panel, pred, seed=cfg.train.seed, residual=resid)
            if cal is not None:
                metrics["risk_calibration"] = {**cal, "residual_factors": 0 if resid is None else resid[1].shape[-1],
                                               "residual_window": RESIDUAL_WINDOW, "residual_lag": lag}
        if cal is not None:
            metrics.setdefault("risk_calibrated", {})[seg] = risk_bias(panel, pred, seed=cfg.train.seed,
                                                                       calibration=cal, residual=resid)
        write_predictions(out, seg, panel, pred, residual=resid, alpha=segment_alpha_factor(panel, pred, cal, resid))
        if extra:
            metrics["factor_recovery"] = {seg: factor_recovery(model, data, panel, pred, truth=extra, cfg=cfg)}
    metrics.update({"best_epoch": best["epoch"], "epochs_run": len(history), "history": history,
                    "data": str(data), "fingerprint": meta.fingerprint})
    if "ceiling_rank_ic" in meta.extra:
        metrics["ceiling_rank_ic"] = meta.extra["ceiling_rank_ic"]
    atomic_write_json(out / "metrics.json", metrics)
    _plot_curves(history, out / "curves.png")
    print(f"[fvae] valid RankIC {metrics['valid']['rank_ic']:.4f} RankICIR {metrics['valid']['rank_icir']:.3f}"
          + (f" | test RankIC {metrics['test']['rank_ic']:.4f} RankICIR {metrics['test']['rank_icir']:.3f}"
             if "test" in metrics else "") + f" -> {out}", flush=True)
    return {k: metrics[k] for k in ("valid", "test") if k in metrics}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def label_horizon(label_expr: str) -> int | None:
    """Days after day t until day t's label is realised: the largest k of qlib's ``Ref($x, -k)`` in
    the label expression, or the synthetic market's "t+k"; None when the expression does not say.
    The residual factors must lag by it."""
    ks = [int(k) for k in re.findall(r"Ref\(\s*\$\w+\s*,\s*-(\d+)\s*\)", label_expr)]
    ks = ks or [int(k) for k in re.findall(r"\bt\s*\+\s*(\d+)", label_expr)]
    return max(ks) if ks and max(ks) >= 1 else None


def segment_residual_factors(panel: Panel, pred: dict[str, torch.Tensor], *,
                             lag: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The residual factors (L, λ) of the segment's days (``fvae.risk.residual_factors``): components of
    the learnt model's residuals on labels already realised (``lag`` days back) within the segment;
    None when the label's horizon is not known."""
    if lag is None:
        return None
    return residual_factors(y=_np(panel.label), valid=_np(panel.valid), beta=_np(pred["beta"]), lag=lag)


def risk_bias(panel: Panel, pred: dict[str, torch.Tensor], *, seed: int, calibration: dict[str, Any] | None = None,
              residual: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Bias statistics of the predicted covariance on the segment's labels (``fvae.risk``); with
    ``calibration`` (``fit_risk_calibration``'s) and ``residual`` those of the calibrated Σ."""
    sigma_z, sigma_alpha = _np(pred["sigma_z"]), _np(pred["sigma_alpha"])
    if calibration is not None:
        sigma_z, sigma_alpha = apply_calibration(sigma_z=sigma_z, sigma_alpha=sigma_alpha,
                                                 c_z=calibration["c_z"], c_alpha=calibration["c_alpha"])
    return bias_statistics(y=_np(panel.label), valid=_np(panel.valid), mu=_np(pred["mu"]), beta=_np(pred["beta"]),
                           sigma_z=sigma_z, sigma_alpha=sigma_alpha, seed=seed, residual=residual,
                           c_mu=float(calibration.get("c_mu", 0.0)) if calibration is not None else 0.0)


def segment_alpha_factor(panel: Panel, pred: dict[str, torch.Tensor], cal: dict[str, Any] | None,
                         residual: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The calibrated Σ's alpha factor on the segment's days: loadings u (D, N) (``fvae.risk.alpha_factor``)
    and std (D,) √(c_μ s̄), s̄ the day's mean calibrated σ_α²; None without a calibration that has c_μ."""
    if cal is None or "c_mu" not in cal:
        return None
    valid, sa = _np(panel.valid), _np(pred["sigma_alpha"]).astype(np.float64)
    u = alpha_factor(mu=_np(pred["mu"]), valid=valid, beta=_np(pred["beta"]), residual=residual)
    sbar = cal["c_alpha"] * (np.where(valid, sa**2, 0.0).sum(1) / np.maximum(valid.sum(1), 1))
    return u, np.sqrt(cal["c_mu"] * sbar)


def fit_risk_calibration(panel: Panel, pred: dict[str, torch.Tensor], *, seed: int,
                         residual: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any] | None:
    """metrics.json's ``risk_calibration``: c_z (per factor) and c_alpha fit on this (validation)
    segment with the residual factors in Σ; None, with a note, when the segment is too short."""
    try:
        cal = calibrate_risk(y=_np(panel.label), valid=_np(panel.valid), beta=_np(pred["beta"]),
                             sigma_z=_np(pred["sigma_z"]), sigma_alpha=_np(pred["sigma_alpha"]), seed=seed,
                             mu=_np(pred["mu"]), residual=residual)
    except ValueError as e:
        print(f"[fvae] note: no risk calibration ({e})", flush=True)
        return None
    cz = np.asarray(cal["c_z"])
    print(f"[fvae] risk calibration on valid: factor variances x{cz.min():.3g}..{cz.max():.3g}, specific variance "
          f"x{cal['c_alpha']:.3g}, alpha factor variance x{cal['c_mu']:.3g}, "
          f"{0 if residual is None else residual[1].shape[-1]} residual factors"
          f"{' (clipped at a bound)' if cal['clipped'] else ''}", flush=True)
    return {**cal, "fit_segment": "valid"}


@torch.no_grad()
def posterior_factors(model: FactorVAE, panel: Panel, *, batch_days: int = 64) -> torch.Tensor:
    """μ_post (D, K): the posterior factor means of every day of the panel (it reads the labels)."""
    model.eval()
    out = torch.zeros(panel.num_days, model.cfg.num_factors, device=panel.feat.device)
    for i in range(0, panel.num_days, batch_days):
        b = panel.batch(np.arange(i, min(i + batch_days, panel.num_days)))
        out[b.day] = model.diagnose(b.x, b.y, b.mask).mu_z_post.float()
    return out


def factor_recovery(model: FactorVAE, data: Path, panel: Panel, pred: dict[str, torch.Tensor], *,
                    truth: tuple[str, ...], cfg: Config) -> dict[str, Any]:
    """On a synthetic market, how well the planted factors are recovered (``fvae.risk``): canonical
    correlations of the posterior μ_post and of the prior μ_z with the true z_t, next to an oracle's
    (the label regressed on the true β), and the R² of the true β on the learnt β. ``panel`` holds
    the true β as its ``truth`` extra columns."""
    z = pd.read_parquet(data / TRUTH_FILE).set_index("datetime").reindex(panel.dates)
    z_true = z[[f"z_true_{k}" for k in range(len(truth))]].to_numpy(np.float64)
    valid = panel.valid.cpu().numpy()
    beta_true = np.stack([panel.extra[c].cpu().numpy() for c in truth], -1)
    oracle = oracle_factors(panel.label.cpu().numpy(), valid, beta_true)
    ok = np.isfinite(oracle).all(1) & np.isfinite(z_true).all(1)
    post = posterior_factors(model, panel, batch_days=cfg.train.eval_batch_days).cpu().numpy()
    prior = pred["mu_z"].cpu().numpy()
    res = {"canonical_corr_posterior": canonical_correlations(post[ok], z_true[ok]).tolist(),
           "canonical_corr_prior": canonical_correlations(prior[ok], z_true[ok]).tolist(),
           "canonical_corr_oracle": canonical_correlations(oracle[ok], z_true[ok]).tolist(),
           "beta_r2": beta_span_r2(beta_true, pred["beta"].cpu().numpy(), valid), "days": int(ok.sum())}
    return res


def write_predictions(out: Path, seg: str, panel: Panel, pred: dict[str, torch.Tensor],
                      residual: tuple[np.ndarray, np.ndarray] | None = None,
                      alpha: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    valid = panel.valid.cpu().numpy()
    dd, nn = np.nonzero(valid)
    K = pred["beta"].shape[-1]
    df = pd.DataFrame({"datetime": panel.dates[dd], "instrument": panel.instruments[nn],
                       "score": pred["mu"].cpu().numpy()[dd, nn],
                       "sigma": pred["sigma"].cpu().numpy()[dd, nn],
                       "sigma_alpha": pred["sigma_alpha"].cpu().numpy()[dd, nn],
                       "label": panel.ret.cpu().numpy()[dd, nn]})
    beta = pred["beta"].cpu().numpy()[dd, nn]
    for k in range(K):
        df[f"beta_{k}"] = beta[:, k]
    if residual is not None:  # the residual factors' loadings (unit-norm per day; 0 where a day has none)
        for p in range(residual[0].shape[-1]):
            df[f"resid_beta_{p}"] = residual[0][dd, nn, p].astype(np.float32)
    if alpha is not None:  # the alpha factor's loadings u (unit-norm per day)
        df["alpha_u"] = alpha[0][dd, nn].astype(np.float32)
    atomic_to_parquet(out / f"pred_{seg}.parquet", df)
    atomic_to_pickle(out / f"pred_{seg}.pkl", df.set_index(["datetime", "instrument"])[["score"]])
    fz = pd.DataFrame({"datetime": panel.dates})
    mu_z, sigma_z = pred["mu_z"].cpu().numpy(), pred["sigma_z"].cpu().numpy()
    for k in range(K):
        fz[f"mu_z_{k}"] = mu_z[:, k]
        fz[f"sigma_z_{k}"] = sigma_z[:, k]
    if residual is not None:
        for p in range(residual[1].shape[-1]):
            fz[f"resid_sigma_{p}"] = np.sqrt(residual[1][:, p])
    if alpha is not None:  # its calibrated std √(c_μ s̄)
        fz["alpha_sigma"] = alpha[1]
    atomic_to_parquet(out / f"factors_{seg}.parquet", fz)


def _plot_curves(history: list[dict], path: Path) -> None:
    if not history:
        return
    plt = pyplot()

    ep = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.4))
    ax[0].plot(ep, [h["nll"] for h in history], label="NLL")
    ax[0].plot(ep, [h["kl"] for h in history], label="KL")
    ax[0].set_title("training loss parts")
    ax[0].legend()
    ax[1].plot(ep, [h["valid_rank_ic"] for h in history], label="Rank IC")
    ax[1].plot(ep, [h["valid_ic"] for h in history], label="IC")
    ax[1].set_title("validation IC")
    ax[1].legend()
    if "valid_rank_ic_post" in history[0]:
        ax[1].plot(ep, [h["valid_rank_ic_post"] for h in history], label="posterior Rank IC (label)", ls="--")
        ax[1].legend()
    ax[2].plot(ep, [h["valid_rank_icir"] for h in history])
    ax[2].set_title("validation Rank ICIR")
    kl = np.array([h.get("valid_kl_per_factor", []) for h in history], dtype=float)
    if kl.ndim == 2 and kl.shape[1]:
        for k in range(kl.shape[1]):
            ax[3].plot(ep, kl[:, k], label=f"z{k}")
        ax[3].axhline(ACTIVE_KL, color="grey", ls=":", lw=1)
        ax[3].set_yscale("log")
        ax[3].set_title(f"validation KL per factor ({history[-1].get('valid_active_factors', '?')} active)")
        if kl.shape[1] <= 8:
            ax[3].legend(fontsize=7)
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _TensorBoard:
    """Per-epoch scalars plus an hparams record whose metrics are the validation scalars."""

    METRICS = ("valid/rank_icir", "valid/rank_ic", "valid/ic", "valid/icir")
    DIAGNOSTICS = ("valid/rank_ic_post", "valid/active_factors", "valid/common_share")

    def __init__(self, logdir: Path, cfg: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.w = SummaryWriter(log_dir=str(logdir))
        hp = {}
        for section in ("model", "train", "data"):
            for k, v in fconfig.to_dict(getattr(cfg, section)).items():
                if isinstance(v, (bool, int, float, str)):
                    hp[f"{section}.{k}"] = v
        exp, ssi, self._sei = hparams(hp, {m: 0.0 for m in self.METRICS})
        self.w.file_writer.add_summary(exp)
        self.w.file_writer.add_summary(ssi)
        self.w.flush()

    def epoch(self, row: dict) -> None:
        e = row["epoch"] + 1
        for k in ("loss", "nll", "kl"):
            self.w.add_scalar(f"train/{k}", row[k], e)
        self.w.add_scalar("train/lr", row["lr"], e)
        for m in self.METRICS + self.DIAGNOSTICS:
            v = row.get(m.replace("/", "_"), math.nan)
            if math.isfinite(v):
                self.w.add_scalar(m, v, e)
        for k, v in enumerate(row.get("valid_kl_per_factor", [])):
            self.w.add_scalar(f"valid/kl_factor_{k}", v, e)
        self.w.flush()

    def close(self, result: dict) -> None:
        for seg in ("test",):
            if seg in result:
                for k in ("ic", "rank_ic", "icir", "rank_icir"):
                    v = result[seg][k]
                    if math.isfinite(v):
                        self.w.add_scalar(f"{seg}/{k}", v, result["epochs_run"])
        self.w.file_writer.add_summary(self._sei)
        self.w.close()


# --------------------------------------------------------------------------- standalone entry


def run_standalone(cfg: Config, *, data: Path, out: Path, gpu: bool = False, resume: bool = False,
                   on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    if gpu and not torch.cuda.is_available():
        raise RuntimeError("--gpu: no CUDA device is visible")
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    # every shard, also the test segment's, before the first epoch (a search's driver checks them
    # once for all its trials, so fit itself does not: a trial reads only the panel cache)
    check_shards(data, read_meta(data))
    out.mkdir(parents=True, exist_ok=True)
    state = None
    if resume:
        last = out / "checkpoints" / "last"
        if (last / "state.pt").is_file():
            state = load_state(last)
            print(f"[fvae] resuming from {last} after epoch {state['epoch'] + 1}", flush=True)
        else:
            print(f"[fvae] --resume: no checkpoint in {last}, starting fresh", flush=True)
    return fit(cfg, data=data, out=out, d=Dist(device=device), resume=state, on_epoch_end=on_epoch_end)


def load_config(path: str | Path | None, overrides: list[str]) -> Config:
    return fconfig.load(Config, path=path, overrides=overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvae.train", description="Train FactorVAE on a shard folder.")
    p.add_argument("--data", type=Path, required=True, help="shard folder (python -m fvae.data ...)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--config", type=Path, default=None, help="YAML with data/model/train sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--debug", action="store_true", help="tiny preset that trains in seconds")
    p.add_argument("--workers", type=int, default=0, help="N > 0 runs Ray Train data-parallel with N workers")
    p.add_argument("--gpu", action="store_true", help="train on GPU(s)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR's last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in RUN_DIR (its new results take its place once complete)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="with --workers: times a failed worker group is restarted from the last checkpoint")
    return p


def _run_marker(out: Path) -> str | None:
    """The first file or folder of a training run that ``out`` holds (None: not a run folder)."""
    return next((m for m in RUN_MARKERS if (out / m).exists()), None)


def check_cli(cfg: Config, args: argparse.Namespace) -> None:
    """Everything the command line can get wrong, checked before anything is written or Ray starts."""
    if args.workers < 0:
        raise fconfig.ConfigError(f"--workers: expected 0 (train in this process) or N >= 1 Ray Train workers, "
                                  f"got {args.workers}")
    if args.max_failures < 0:
        raise fconfig.ConfigError(f"--max-failures: expected >= 0 restarts of a failed worker group, "
                                  f"got {args.max_failures}")
    local = args.workers == 0 or not (args.address or os.environ.get("RAY_ADDRESS"))
    if args.gpu and local and not torch.cuda.is_available():
        raise fconfig.ConfigError("--gpu: no CUDA device is visible here (torch.cuda.is_available() is False); "
                                  "drop --gpu to train on the CPU")
    if cfg.train.cuda_graph and (not args.gpu or args.workers > 1):
        raise fconfig.ConfigError("train.cuda_graph: needs one GPU in one process (--gpu, no --workers > 1)")
    out = args.out
    if out.exists() and not out.is_dir():
        raise fconfig.ConfigError(f"--out {out}: exists and is not a folder; expected a run directory")
    if args.resume and args.overwrite:
        raise fconfig.ConfigError("--resume and --overwrite: choose one")
    marker = _run_marker(out) if out.is_dir() else None
    if marker and not (args.resume or args.overwrite):
        raise fconfig.ConfigError(f"--out {out}: already holds a training run ({marker}); pass --resume to continue "
                                  "it or --overwrite to replace it")
    if out.is_dir() and not marker and any(out.iterdir()):
        raise fconfig.ConfigError(f"--out {out}: folder is not empty and holds no training run; "
                                  "choose a new or empty folder")
    meta = read_meta(args.data)
    check_shards(args.data, meta)
    state_file = out / "checkpoints" / "last" / "state.pt"
    if args.resume and state_file.is_file():
        check_resume(load_state(state_file), cfg, meta=meta, data=args.data)


def _replace_dir(new: Path, old: Path) -> None:
    """``new`` takes the place of ``old``: two renames, so that ``old`` is never a mix of both runs."""
    aside = old.with_name(f".{old.name}.old-{os.getpid()}")
    os.rename(old, aside)
    os.rename(new, old)
    shutil.rmtree(aside, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work, fresh, temporary = args.out, False, False
    try:
        cfg = load_config(args.config, (DEBUG_PRESET if args.debug else []) + args.overrides)
        check_cli(cfg, args)
        if args.overwrite and _run_marker(args.out):
            # train beside the old run; it is replaced only by a complete new one
            target = args.out.resolve()
            for stale in target.parent.glob(f".{target.name}.overwrite-*"):  # left by a killed overwrite
                shutil.rmtree(stale, ignore_errors=True)
            work, temporary = target.with_name(f".{target.name}.overwrite-{os.getpid()}"), True
        fresh = not work.exists()
        sigterm_as_sigint()  # a stopped run exits through its clean-up (which stops a Ray cluster it started)
        if args.workers > 0:
            run_ray(cfg, data=args.data, out=work, workers=args.workers, gpu=args.gpu,
                    address=args.address, resume=args.resume, max_failures=args.max_failures)
        else:
            run_standalone(cfg, data=args.data, out=work, gpu=args.gpu, resume=args.resume)
        if temporary:
            _replace_dir(work, args.out.resolve())
            print(f"[fvae] --overwrite: the new run replaced the old one in {args.out}", flush=True)
    except (fconfig.ConfigError, DataError, NonFiniteLossError) as e:
        _discard(work, fresh=fresh, temporary=temporary)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RayStartError as e:
        _discard(work, fresh=fresh, temporary=temporary)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _discard(work, fresh=fresh, temporary=temporary)
        last = work / "checkpoints" / "last"
        print("[fvae] interrupted: " + (f"{last} holds the last finished epoch; continue with --resume"
                                        if last.is_dir() else "no epoch had finished"), file=sys.stderr, flush=True)
        return 130
    except BaseException:
        _discard(work, fresh=fresh, temporary=temporary)
        raise
    return 0


def _discard(work: Path, *, fresh: bool, temporary: bool) -> None:
    """A failed run leaves no folder of its own behind unless it holds a checkpoint to resume from
    (an --overwrite run's folder never: the old run stays in place)."""
    if temporary or (fresh and work.is_dir() and not (work / "checkpoints" / "last" / "state.pt").is_file()):
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- Ray Train (the only Ray calls)


FAILED_FILE = "failed.json"  # in a run directory: a failure that a retry would only repeat
# errors that the same checkpoint, data and config raise again: Ray Train would retry them (it retries
# whatever a worker raises), so the workers record them and return, and the driver raises them
DETERMINISTIC = (NonFiniteLossError, DataError, ValueError)


def record_failure(out: Path, error: BaseException) -> None:
    """FAILED_FILE: the error's type and first line (what a search's summary shows as the reason)."""
    first = (str(error).strip().splitlines() or [""])[0]
    atomic_write_json(out / FAILED_FILE, {"error": type(error).__name__, "message": first[:1000]})


def raise_if_failed(out: Path) -> None:
    """Raise the failure recorded in ``out`` (FAILED_FILE), as the type it had where it is known."""
    f = out / FAILED_FILE
    if f.is_file():
        info = json.loads(f.read_text())
        kind = {"NonFiniteLossError": NonFiniteLossError, "DataError": DataError}.get(info["error"], RuntimeError)
        raise kind(f"{info['message']}" if kind is not RuntimeError else f"{info['error']}: {info['message']}")


def latest_state(state: dict[str, Any] | None, out: Path) -> dict[str, Any] | None:
    """The later of ``state`` (the checkpoint Ray holds) and the run folder's own last checkpoint.

    Ray takes a report in a moment after the checkpoint was written (Ray Train's controller polls
    every 2 s; a run's last report waits for its outputs: ``hold_last_report``), so after a kill
    the run folder can hold an epoch Ray never heard of: continuing from it trains nothing twice.
    The folder is the run's own: a search trial's, or one fvae.train only reuses with --resume."""
    f = out / "checkpoints" / "last" / "state.pt"
    if not f.is_file():
        return state
    own = load_state(f)
    return own if state is None or own["epoch"] > state["epoch"] else state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the same ``fit``, reporting each epoch through ray.train.report.

    A retried worker group (Ray Train restarts one after a worker died, up to ``max_failures``
    times) continues from the last reported checkpoint, ``ray.train.get_checkpoint()``."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    cfg = fconfig.from_dict(Config, config["cfg"])
    out = Path(config["out"])
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as path:
            resume = load_state(Path(path))
    resume = latest_state(resume, out)
    if resume is not None and ctx.get_world_rank() == 0:
        print(f"[fvae] resuming from the checkpoint after epoch {resume['epoch'] + 1}", flush=True)

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(scalar_metrics(metrics), checkpoint=ckpt)

    report, flush = hold_last_report(report, epochs=cfg.train.epochs)
    try:
        fit(cfg, data=Path(config["data"]), out=out,
            d=Dist(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device),
            report=report, resume=resume, write_outputs=config.get("write_outputs", True),
            started=config.get("started"))
    except DETERMINISTIC as e:  # every rank raises it at the same step: all return
        if ctx.get_world_rank() == 0:
            record_failure(out, e)
        return
    if ctx.get_world_rank() == 0 and config.get("started") is not None:
        record_trial_time(out, started=config["started"])  # before the last report, after which Tune may stop it
    flush()


def record_trial_time(out: Path, *, started: float) -> None:
    """Add the whole time since ``started`` (a search trial's start) to RUN_DIR/timings.json."""
    path = out / TIMINGS_FILE
    if path.is_file():
        t = json.loads(path.read_text())
        atomic_write_json(path, {**t, "trial_s": time.time() - started})


def hold_last_report(report: Reporter, *, epochs: int) -> tuple[Reporter, Callable[[], None]]:
    """``report`` with the last epoch's report held back until ``flush()``, called once fit has
    written its outputs: a scheduler stops a trial the moment it hears of its last epoch (ASHA at
    max_t), which would kill the trial while it writes its predictions and metrics."""
    held: list[tuple[dict[str, Any], Path | None]] = []

    def wrapped(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if metrics.get("epoch", -1) + 1 >= epochs:
            held.append((metrics, checkpoint_dir))
        else:
            report(metrics, checkpoint_dir)

    def flush() -> None:
        for metrics, checkpoint_dir in held:
            report(metrics, checkpoint_dir)
        held.clear()

    return wrapped, flush


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """What Ray reports take: finite scalars (lists such as kl_per_factor stay in metrics.json)."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if "epoch" in metrics:  # a count of epochs that survives restarts (Tune's training_iteration may restart at 1)
        out["epochs_done"] = metrics["epoch"] + 1
    return out


def make_trainer(cfg: Config, *, data: Path, out: Path, workers: int, gpu: bool, storage_path: str,
                 name: str, callbacks: list | None = None, resources_per_worker: dict | None = None,
                 resume: bool = False, max_failures: int = 2, started: float | None = None):
    """A TorchTrainer that runs ``train_loop_per_worker`` on ``workers`` DDP ranks; a worker group that
    fails (a worker killed, OOM, a lost node) is restarted up to ``max_failures`` times, from the
    last checkpoint."""
    import importlib

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # by reference: under `python -m fvae.train` this module is __main__, whose functions Ray would
    # pickle by value, with every global they touch (torch's cudnn module cannot be pickled)
    loop = importlib.import_module("fvae.train").train_loop_per_worker

    return TorchTrainer(
        loop,
        train_loop_config={"cfg": fconfig.to_dict(cfg), "data": str(Path(data).resolve()),
                           "out": str(Path(out).resolve()), "resume": resume, "started": started},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # a worker group that cannot start (e.g. resources held elsewhere) fails the run
                             # after a few tries instead of retrying forever
                             failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=2)),
    )


_LOCAL_CLUSTERS: list[Any] = []  # the local cluster init_ray started (fvae.ray_local.LocalCluster), if any


def init_ray(*, address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address``, or RAY_ADDRESS as ``ray job submit`` sets it), or start
    a private local one (``fvae.ray_local``: explicit CPUs, a bounded object store, retried when
    the machine is slow, stopped when this process ends, however it ends).

    Ray Train's placement-group cleaner finds the State API by auto-detection, which fails when a
    machine runs two Ray instances; a trial that ASHA stops then keeps its resources and the search
    stalls. So the job's workers are told the dashboard address (RAY_API_SERVER_ADDRESS).
    """
    import ray

    if ray.is_initialized():
        return
    # Ray's core worker replaces this process's SIGTERM handler with its own (a stack dump, then
    # death); the handler a command line set (fvae.ray_local.sigterm_as_sigint) is put back
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _connect(address=address, num_cpus=num_cpus)
    finally:
        if callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)


def _connect(*, address: str | None, num_cpus: int | None) -> None:
    import ray

    api = os.environ.get("RAY_API_SERVER_ADDRESS")
    # Ray Train patches print() in its workers to tee into its logger, whose console handler then
    # prints every progress line a second time; fvae's lines are plain progress, so no patch.
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if address or os.environ.get("RAY_ADDRESS"):
        if api:
            env_vars["RAY_API_SERVER_ADDRESS"] = api
        ray.init(address=address or os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env_vars})
        return
    import atexit

    import ray._raylet

    from fvae import ray_local

    for earlier in _LOCAL_CLUSTERS:  # a caller that shut Ray down and starts it again gets a fresh cluster
        ray_local.stop(earlier)
    _LOCAL_CLUSTERS.clear()
    print("[fvae] starting a local Ray cluster", flush=True)
    cluster = ray_local.start(num_cpus=num_cpus or os.cpu_count() or 2)
    _LOCAL_CLUSTERS.append(cluster)
    print(f"[fvae] local Ray cluster up: dashboard {cluster.dashboard}, logs in {cluster.temp_dir} "
          "(both gone when this process ends)", flush=True)
    os.environ[ray_local.AUTH] = ray_local.auth_mode()  # the driver must speak the cluster's mode...
    ray._raylet.Config.initialize("")  # ...and Ray read RAY_AUTH_MODE when it was imported

    def stop() -> None:
        if cluster in _LOCAL_CLUSTERS:
            ray.shutdown()
            ray_local.stop(cluster)

    atexit.register(stop)
    ray.init(address=cluster.address,
             runtime_env={"env_vars": {**env_vars, "RAY_API_SERVER_ADDRESS": cluster.dashboard}})


def run_ray(cfg: Config, *, data: Path, out: Path, workers: int, gpu: bool, address: str | None = None,
            resume: bool = False, max_failures: int = 2) -> None:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / FAILED_FILE).unlink(missing_ok=True)  # an earlier run's failure: this run decides anew
    init_ray(address=address, num_cpus=max(workers + 1, os.cpu_count() or 1))
    trainer = make_trainer(cfg, data=data, out=out, workers=workers, gpu=gpu,
                           storage_path=str(out / "ray"), name="train", resume=resume, max_failures=max_failures)
    trainer.fit()
    raise_if_failed(out)


if __name__ == "__main__":
    sys.exit(main())
