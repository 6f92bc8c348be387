"""Baselines on FactorVAE's own split and features, and the paper's robustness experiment.

    python -m fvae.baselines --data DIR --out DIR [--models linear,lightgbm,mlp,gru,factorvae] [--seeds 0,1,2]
                             [--hidden 64 --epochs 30 --lr 1e-3 --patience 5 --batch-days 16]
                             [--day-fraction 1.0]
                             [--config FACTORVAE_YAML] [--set section.key=value ...] [--debug]
                             [--tuned-config YAML]
                             [--robustness M] [--gpu]

Every model sees exactly what FactorVAE sees: the loader's day panels (``Panel.batch``: x (B, N, T, C)
windows, the processed ``label`` as the training target, the mask of real stocks), trained on
the train segment, selected on the validation Rank ICIR (as FactorVAE; LightGBM keeps qlib's rule,
early stopping on the validation L2), scored on the test segment with
``fvae.metrics`` against the raw forward return ``ret`` (as ``fvae.train`` scores FactorVAE):

    linear     ridge regression on the flattened T·C window, closed form; the ridge λ (relative to
               the mean eigenvalue of the Gram matrix) is chosen on the validation Rank ICIR
    lightgbm   gradient-boosted trees on the flattened window with qlib's benchmark settings for
               Alpha158/Alpha360 (its ``LGBModel``: MSE, 1,000 rounds at most, early stopping after 50
               rounds without a better validation L2); LightGBM is called directly, so only
               ``fvae.data.qlib_io`` imports qlib
    mlp        two hidden layers on the flattened window, MSE on the label; MLP and GRU train through
               FactorVAE's own step, epoch loop and early stopping (``fvae.train``) with their own loss
    gru        FactorVAE's own feature extractor (``fvae.model.FeatureExtractor``: Linear + LeakyReLU
               + GRU) with a linear head, MSE on the label
    factorvae  ``fvae.train.run_standalone`` with the paper's model (``model.gat_layers=0``)
    tuned      only with ``--tuned-config``: FactorVAE from that YAML as it is, extensions included
               (e.g. a search's ``best_config.yaml``), retrained with each seed

Seeds change the initialisation and batch order, and LightGBM's column sampling (the ridge is
deterministic; its spread is 0).
``baselines.json`` holds mean ± sample std (ddof = 1) over seeds per model, segment and metric.
``runs.json`` is rewritten after every finished (model, seed) run, so an interrupted call keeps what
it had done; running the same command again with the same options skips those runs.
``--day-fraction`` trains every network (FactorVAE included) on that random share of the training
days each epoch, as ``data.day_fraction`` does for ``fvae.train``.

Robustness (the paper's Table 2): with ``--robustness M``, per seed, M stocks listed in both the
train and the test segment are drawn at random and removed from training (their label is
masked out in the train and valid segments, so they are neither fitted nor used for model
selection; their features stay, so their test windows are complete). The models are scored by
the Rank IC over those M stocks alone on the test segment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from fvae import train as ftrain
from fvae.data.loader import Batch, Panel, epoch_batches, load_panel
from fvae.data.shards import DataError, Meta, read_meta, read_rows, write_shards
from fvae.io import atomic_write_json
from fvae.metrics import daily_ic, daily_rank_ic, summarize
from fvae.model import FeatureExtractor, ModelConfig
from fvae.progress import bar, step_bar

MODELS = ("linear", "lightgbm", "mlp", "gru", "factorvae")
TUNED = "tuned"  # the model of --tuned-config; added to the models when that is given
METRICS = ("ic", "icir", "rank_ic", "rank_icir")
SELECTED_BY = {  # how each model's final fit was chosen, shown in the table
    "linear": "λ by valid Rank ICIR", "lightgbm": "rounds by valid L2 (qlib's rule)",
    "mlp": "epoch by valid Rank ICIR", "gru": "epoch by valid Rank ICIR",
    "factorvae": "epoch by valid Rank ICIR", TUNED: "epoch by valid Rank ICIR"}
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # λ / mean eigenvalue of the centred Gram matrix
DEBUG_FACTORVAE = ["model.hidden_size=16", "model.num_factors=4", "model.num_portfolios=8", "train.epochs=2",
                   "data.batch_days=16"]


@dataclass(frozen=True, kw_only=True)
class BaselineConfig:
    """Options of the neural baselines (MLP, GRU) and the FactorVAE run."""

    hidden: int = 64
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5  # epochs without a better validation Rank ICIR before stopping
    batch_days: int = 16
    eval_batch_days: int = 64
    day_fraction: float = 1.0  # share of training days per epoch, drawn anew each epoch
    factorvae_config: Path | None = None  # YAML for fvae.train; model.gat_layers is forced to 0
    factorvae_overrides: tuple[str, ...] = ()
    tuned_config: Path | None = None  # YAML for fvae.train taken as it is (the "tuned" model)
    gpu: bool = False  # networks and FactorVAE on cuda:0; the ridge and LightGBM stay on the CPU

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "batch_days", "eval_batch_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr: expected > 0, got {self.lr}")
        if self.patience < 0:
            raise ValueError(f"--patience: expected >= 0, got {self.patience}")
        if not 0.0 < self.day_fraction <= 1.0:
            raise ValueError(f"--day-fraction: expected 0 < value <= 1, got {self.day_fraction}")
        if self.tuned_config is not None and not Path(self.tuned_config).is_file():
            raise ValueError(f"--tuned-config: {self.tuned_config} is not a file")


DEBUG = BaselineConfig(hidden=16, epochs=3, patience=2, factorvae_overrides=tuple(DEBUG_FACTORVAE))


# --------------------------------------------------------------------------- panels and scoring


@dataclass
class Split:
    """The three segments of a shard folder as panels (train/valid possibly with stocks held out)."""

    train: Panel
    valid: Panel
    test: Panel
    meta: Meta


def load_split(data: str | Path, *, holdout: list[str] | None = None) -> Split:
    """Panels of all three segments; ``holdout`` stocks lose their labels in train and valid."""
    meta = read_meta(data)
    panels = {seg: load_panel(data, seg, meta=meta) for seg in ("train", "valid", "test")}
    if holdout:
        for seg in ("train", "valid"):
            p = panels[seg]
            drop = torch.from_numpy(np.isin(p.instruments, holdout))
            p.valid = p.valid & ~drop[None, :]
    return Split(train=panels["train"], valid=panels["valid"], test=panels["test"], meta=meta)


def flat_rows(panel: Panel, days: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real stock-days of ``days`` as rows: x (R, T·C), label (R,), and the (day, stock) index (R, 2)."""
    b = panel.batch(days)
    m = b.mask
    x = b.x[m].reshape(int(m.sum()), -1)  # (R, T*C), time-major windows flattened
    rows = torch.stack([b.day[:, None].expand_as(b.stock)[m], b.stock[m]], dim=1)
    return x, b.y[m], rows


def predict_dense(panel: Panel, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                  batch_days: int = 64, width: int | None = None) -> torch.Tensor:
    """Scores for every (day, stock) of ``panel``: (D, N) or (D, N, width); 0 where no stock.

    ``fn(x (B, N, T, C), mask (B, N))`` returns (B, N) or (B, N, width).
    """
    D, N = panel.num_days, len(panel.instruments)
    out = torch.zeros((D, N) if width is None else (D, N, width), dtype=torch.float64, device=panel.feat.device)
    with torch.no_grad():
        for i in range(0, D, batch_days):
            b = panel.batch(np.arange(i, min(D, i + batch_days)))
            p = fn(b.x, b.mask)
            rows = b.day[:, None].expand_as(b.stock)
            out[rows[b.mask], b.stock[b.mask]] = p[b.mask].double()
    return out


def score(pred: torch.Tensor, panel: Panel, *, stocks: list[str] | None = None) -> dict[str, float]:
    """IC, ICIR, Rank IC, Rank ICIR of (D, N) predictions against the panel's raw return.

    With ``stocks``, only those stocks count (the robustness evaluation); the others are masked out.
    """
    mask = panel.valid
    if stocks is not None:
        mask = mask & torch.from_numpy(np.isin(panel.instruments, stocks)).to(mask.device)[None, :]
        used = set(panel.instruments[mask.any(0).cpu().numpy()])
        assert used <= set(stocks), "robustness scoring must see held-out stocks only"
    return summarize(daily_ic(pred, panel.ret, mask), daily_rank_ic(pred, panel.ret, mask))


# --------------------------------------------------------------------------- linear (ridge, closed form)


def fit_ridge(split: Split, *, grid: tuple[float, ...] = RIDGE_GRID, batch_days: int = 32) -> dict[str, Any]:
    """Ridge on the flattened window with an unpenalised intercept; λ picked on validation Rank ICIR.

    Sufficient statistics accumulated over day batches (memory O(F²), F = T·C, never the full design):
        A = Σ x xᵀ − n m mᵀ (centred Gram),  b = Σ x y − n m ȳ,  then A = V diag(e) Vᵀ once and
        w(λ) = V diag(1 / (e + λ)) Vᵀ b for every λ of the grid (λ = r · mean(e)).
    """
    train = split.train
    Fdim = train.lookback * train.channels
    A = torch.zeros(Fdim, Fdim, dtype=torch.float64)
    sx = torch.zeros(Fdim, dtype=torch.float64)
    sxy = torch.zeros(Fdim, dtype=torch.float64)
    sy, n = 0.0, 0
    for i in range(0, train.num_days, batch_days):
        x, y, _ = flat_rows(train, np.arange(i, min(train.num_days, i + batch_days)))
        x, y = x.double(), y.double()
        A += x.T @ x
        sx += x.sum(0)
        sxy += x.T @ y
        sy += float(y.sum())
        n += len(y)
    if n < 2:
        raise DataError("linear: the train segment has fewer than two labelled stock-days")
    mx, my = sx / n, sy / n
    A -= n * torch.outer(mx, mx)
    b = sxy - n * mx * my
    e, V = torch.linalg.eigh(A)
    e = e.clamp_min(0.0)
    lams = torch.tensor(grid, dtype=torch.float64) * e.mean().clamp_min(1e-12)
    Vb = V.T @ b  # (F,)
    W = V @ (Vb[:, None] / (e[:, None] + lams[None, :]))  # (F, L): one weight vector per λ
    c = my - mx @ W  # (L,) intercepts

    def fn(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N = mask.shape
        return (x.reshape(B, N, -1).double() @ W + c)  # (B, N, L)

    val = predict_dense(split.valid, fn, width=len(grid))
    ricir = [score(val[..., j], split.valid)["rank_icir"] for j in range(len(grid))]
    best = int(np.nanargmax(np.where(np.isfinite(ricir), ricir, -np.inf)))
    w_best, c_best = W[:, best].clone(), float(c[best])
    return {"weights": w_best, "intercept": c_best, "lambda_rel": grid[best],
            "valid_rank_icir_by_lambda": {str(g): r for g, r in zip(grid, ricir)}}


def _ridge_predict(fit: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    w, c = fit["weights"], fit["intercept"]

    def fn(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N = mask.shape
        return x.reshape(B, N, -1).double() @ w + c

    return fn


def fit_linear(data_dir: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """The ridge baseline's valid and test metrics on a shard folder (deterministic; ``seed`` is unused
    by the fit and kept so every baseline has the same signature). Returns {"valid", "test", "lambda_rel"}."""
    split = load_split(data_dir)
    return _run_linear(split, holdout=None, seed=seed)


def _run_linear(split: Split, *, holdout: list[str] | None, seed: int) -> dict[str, Any]:
    fit = fit_ridge(split)
    fn = _ridge_predict(fit)
    res = {"valid": score(predict_dense(split.valid, fn), split.valid),
           "test": score(predict_dense(split.test, fn), split.test),
           "lambda_rel": fit["lambda_rel"], "seed": seed}
    if holdout:
        res["holdout"] = score(predict_dense(split.test, fn), split.test, stocks=holdout)
    return res


# --------------------------------------------------------------------------- LightGBM

# qlib's examples/benchmarks/LightGBM/workflow_config_lightgbm_Alpha{158,360}.yaml (LGBModel kwargs).
# qlib passes ``subsample`` without ``bagging_freq``, so LightGBM never bags rows: kept as is.
LGB_PARAMS: dict[str, Any] = {"objective": "mse", "colsample_bytree": 0.8879, "learning_rate": 0.0421,
                              "subsample": 0.8789, "lambda_l1": 205.6999, "lambda_l2": 580.9768,
                              "max_depth": 8, "num_leaves": 210, "verbosity": -1}
LGB_ROUNDS, LGB_EARLY_STOP = 1000, 50  # qlib's LGBModel.fit defaults


def _flat_segment(panel: Panel, *, batch_days: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Every labelled stock-day of a segment: x (R, T·C) float32 and label (R,)."""
    xs, ys = [], []
    for i in range(0, panel.num_days, batch_days):
        x, y, _ = flat_rows(panel, np.arange(i, min(panel.num_days, i + batch_days)))
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def fit_lightgbm(split: Split, *, seed: int, holdout: list[str] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """LightGBM with qlib's benchmark parameters, early-stopped on the validation L2 to the label."""
    try:
        import lightgbm as lgb
    except ImportError:
        raise ValueError("--models lightgbm: the lightgbm package is missing (pip install lightgbm)") from None
    x, y = _flat_segment(split.train)
    xv, yv = _flat_segment(split.valid)
    dtrain = lgb.Dataset(x, label=y, free_raw_data=True)
    dvalid = lgb.Dataset(xv, label=yv, reference=dtrain)
    del x
    callbacks = [lgb.early_stopping(LGB_EARLY_STOP, verbose=False)]
    rounds = bar(desc=f"[baselines] lightgbm seed {seed}", total=LGB_ROUNDS, unit="round", enabled=progress)
    if progress:
        def report(env: Any) -> None:
            rounds.update(1)
            rounds.set_postfix(valid_l2=f"{env.evaluation_result_list[0][2]:.5f}", refresh=False)
            if (env.iteration + 1) % 50 == 0 and rounds.disable:  # a log, not a terminal: a line now and then
                l2 = env.evaluation_result_list[0][2]
                print(f"[baselines] lightgbm seed {seed} round {env.iteration + 1} valid l2 {l2:.5f}", flush=True)
        callbacks.append(report)
    params = {**LGB_PARAMS, "seed": seed, "num_threads": torch.get_num_threads()}
    booster = lgb.train(params, dtrain, num_boost_round=LGB_ROUNDS, valid_sets=[dvalid], valid_names=["valid"],
                        callbacks=callbacks)
    rounds.close()

    def fn(xb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N = mask.shape
        flat = xb.reshape(B * N, -1).numpy()
        return torch.from_numpy(booster.predict(flat, num_iteration=booster.best_iteration)).reshape(B, N)

    test_pred = predict_dense(split.test, fn)
    res = {"valid": score(predict_dense(split.valid, fn), split.valid), "test": score(test_pred, split.test),
           "best_iteration": booster.best_iteration, "seed": seed}
    if holdout:
        res["holdout"] = score(test_pred, split.test, stocks=holdout)
    return res


# --------------------------------------------------------------------------- neural baselines


class MLP(nn.Module):
    """x (B, N, T, C) → ŷ (B, N): the flattened window through two LeakyReLU layers."""

    def __init__(self, num_inputs: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_inputs, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.1), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N = mask.shape
        return torch.where(mask, self.net(x.reshape(B, N, -1)).squeeze(-1), 0.0)


class GRUBaseline(nn.Module):
    """x (B, N, T, C) → ŷ (B, N): FactorVAE's feature extractor e (R, H) on the real stocks + Linear(H, 1)."""

    def __init__(self, num_features: int, hidden: int) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(num_features, ModelConfig(hidden_size=hidden))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(mask.shape)
        if bool(mask.any()):
            out[mask] = self.head(self.extractor(x[mask])).squeeze(-1)  # GRU over real stocks only
        return out


def _masked_mse_terms(net: nn.Module, b: Batch) -> torch.Tensor:
    """(1, B): each day's mean squared error to the label over its real stocks."""
    err = torch.where(b.mask, (net(b.x, b.mask) - b.y) ** 2, 0.0)
    return (err.sum(1) / b.mask.sum(1).clamp_min(1))[None].float()


MSE = ftrain.Objective(names=("loss",), terms=_masked_mse_terms)


def train_network(net: nn.Module, split: Split, *, cfg: BaselineConfig, seed: int, name: str,
                  holdout: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Adam on the masked MSE to the label through FactorVAE's own step, epoch loop and early stopping
    (``fvae.train.EagerStep``, ``train_epochs``, ``EarlyStopping``: the best epoch by validation Rank
    ICIR), over FactorVAE's non-overlapping day batches; returns valid/test metrics of the best epoch."""
    train = split.train
    d = ftrain.Dist(device=train.feat.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = ftrain.EagerStep(net, opt, train, d=d, grad_clip=1.0, objective=MSE)
    stopper = ftrain.EarlyStopping(patience=cfg.patience)

    def validate() -> dict[str, float]:
        net.eval()
        return score(predict_dense(split.valid, net, batch_days=cfg.eval_batch_days), split.valid)

    def show(row: dict[str, Any]) -> None:
        if progress:
            print(f"[baselines] {name} seed {seed} epoch {row['epoch'] + 1}/{cfg.epochs} loss {row['loss']:.4f} "
                  f"valid RankIC {row['valid_rank_ic']:.4f} RankICIR {row['valid_rank_icir']:.3f} "
                  f"[{row['seconds']:.1f}s]", flush=True)

    current = [0]
    epoch_bar = step_bar(lambda: f"[baselines] {name} seed {seed} epoch {current[0] + 1}/{cfg.epochs}", enabled=progress)
    history = ftrain.train_epochs(
        step, epochs=range(cfg.epochs), validate=validate, stopper=stopper, history=[], model=net, d=d,
        before_epoch=lambda e: current.__setitem__(0, e), on_step=epoch_bar,
        batches=lambda e: epoch_batches(train.num_days, batch_days=cfg.batch_days, lookback=train.lookback,
                                        seed=seed, epoch=e, day_fraction=cfg.day_fraction),
        max_skipped_fraction=ftrain.TrainConfig().max_skipped_fraction, days_per_step=cfg.batch_days,
        after_epoch=show)
    if stopper.best_state is not None:
        net.load_state_dict(stopper.best_state)
    net.eval()
    test_pred = predict_dense(split.test, net, batch_days=cfg.eval_batch_days)
    res = {"valid": score(predict_dense(split.valid, net, batch_days=cfg.eval_batch_days), split.valid),
           "test": score(test_pred, split.test), "best_epoch": stopper.best_epoch, "epochs_run": len(history),
           "seed": seed}
    if holdout:
        res["holdout"] = score(test_pred, split.test, stocks=holdout)
    return res


def fit_network(kind: str, split: Split, *, cfg: BaselineConfig, seed: int, holdout: list[str] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Train the ``mlp`` or ``gru`` baseline with ``seed`` on the device ``split``'s panels live on."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    T, C = split.train.lookback, split.train.channels
    net: nn.Module = MLP(T * C, cfg.hidden) if kind == "mlp" else GRUBaseline(C, cfg.hidden)
    net = net.to(split.train.feat.device)
    return train_network(net, split, cfg=cfg, seed=seed, name=kind, holdout=holdout, progress=progress)


def split_on(split: Split, device: torch.device) -> Split:
    """The same split with its panels on ``device`` (the whole split: one copy, gathers per batch)."""
    if split.train.feat.device == device:
        return split
    return Split(train=split.train.to(device), valid=split.valid.to(device), test=split.test.to(device),
                 meta=split.meta)


def fit_factorvae(data: str | Path, *, out: str | Path, seed: int, cfg: BaselineConfig,
                  holdout: list[str] | None = None, test_panel: Panel | None = None,
                  tuned: bool = False) -> dict[str, Any]:
    """FactorVAE as the paper has it (``model.gat_layers=0``) through ``fvae.train.run_standalone``;
    with ``tuned``, the model of ``cfg.tuned_config`` as it is (only the seed changes)."""
    if tuned:
        tcfg = ftrain.load_config(cfg.tuned_config, [f"train.seed={seed}"])
    else:
        fraction = [f"data.day_fraction={cfg.day_fraction}"] if cfg.day_fraction < 1.0 else []
        tcfg = ftrain.load_config(cfg.factorvae_config,
                                  [*fraction, *cfg.factorvae_overrides, f"train.seed={seed}", "model.gat_layers=0"])
    out = Path(out)
    result = ftrain.run_standalone(tcfg, data=Path(data), out=out, gpu=cfg.gpu)
    res = {"valid": result["valid"], "test": result["test"], "best_epoch": result["best_epoch"],
           "epochs_run": result["epochs_run"], "seed": seed, "run_dir": str(out),
           "factor_model": factor_model_figures(out / "metrics.json")}
    if holdout:
        if test_panel is None:
            raise ValueError("fit_factorvae: holdout scoring needs the original test panel")
        res["holdout"] = score(predictions_to_dense(out / "pred_test.parquet", test_panel), test_panel,
                               stocks=holdout)
    return res


FACTOR_FIGURES = ("active_factors", "rank_ic_post", "common_share")  # the best epoch's, on validation


def factor_model_figures(metrics_file: Path) -> dict[str, Any]:
    """Is the factor model fit? From a run's metrics.json: the best epoch's number of active factors,
    posterior Rank IC and factors' share of the predicted variance (validation), and the bias
    statistics per segment (``risk``, and ``risk_calibrated`` where the run has them)."""
    m = json.loads(Path(metrics_file).read_text())
    row = next(h for h in m["history"] if h["epoch"] == m["best_epoch"])
    out: dict[str, Any] = {k: row[f"valid_{k}"] for k in FACTOR_FIGURES}
    out.update({k: m[k] for k in ("risk", "risk_calibrated") if k in m})
    return out


def aggregate_factor_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over the seeds of ``factor_model_figures`` (bias statistics per segment and portfolio)."""
    figs = [r["factor_model"] for r in results]
    out: dict[str, Any] = {k: mean_std([f[k] for f in figs]) for k in FACTOR_FIGURES}
    for kind in ("risk", "risk_calibrated"):
        if all(kind in f for f in figs):
            out[kind] = {seg: {p: mean_std([f[kind][seg][p] for f in figs]) for p in figs[0][kind][seg] if p != "days"}
                         for seg in figs[0][kind]}
    return out


def predictions_to_dense(path: Path, panel: Panel) -> torch.Tensor:
    """A pred_*.parquet's ``score`` on the panel's (day, stock) grid: (D, N), 0 where absent."""
    df = pd.read_parquet(path, columns=["datetime", "instrument", "score"])
    di = panel.dates.get_indexer(pd.DatetimeIndex(df["datetime"]))
    si = pd.Index(panel.instruments).get_indexer(df["instrument"].astype(str))
    ok = (di >= 0) & (si >= 0)
    out = torch.zeros(panel.num_days, len(panel.instruments), dtype=torch.float64)
    out[di[ok], si[ok]] = torch.from_numpy(df["score"].to_numpy(np.float64)[ok])
    return out


# --------------------------------------------------------------------------- robustness


def choose_holdout(split: Split, m: int, *, seed: int) -> list[str]:
    """M stocks with labels in both the train and the test segment, drawn with ``seed``."""
    tr = set(split.train.instruments[split.train.valid.any(0).numpy()])
    te = split.test.instruments[split.test.valid.any(0).numpy()]
    pool = np.array(sorted(s for s in te if s in tr))
    if not 2 <= m <= len(pool) - 2:
        raise ValueError(f"--robustness: M must be between 2 and {len(pool) - 2} (stocks in both train and test), "
                         f"got {m}")
    rng = np.random.default_rng([seed, 7919])
    return sorted(rng.choice(pool, size=m, replace=False).tolist())


def write_holdout_copy(data: str | Path, out: str | Path, holdout: list[str]) -> Path:
    """A copy of the shard folder with ``label`` and ``ret`` of the held-out stocks set to NaN on train
    and valid days, so that ``fvae.train`` (which reads folders) trains without them."""
    data, out = Path(data), Path(out)
    meta = read_meta(data)
    lo = min(pd.Timestamp(s["start"]) for s in meta.shards)
    hi = max(pd.Timestamp(s["end"]) for s in meta.shards)
    df = read_rows(data, meta, lo, hi)
    test_start, _ = meta.segment_range("test")
    drop = df["instrument"].astype(str).isin(holdout).to_numpy() & (df["datetime"] < test_start).to_numpy()
    df.loc[drop, ["label", "ret"]] = np.nan
    fresh = dataclasses.replace(meta, extra={**meta.extra, "holdout_stocks": holdout, "holdout_of": str(data)})
    write_shards(out, df, fresh)
    return out


# --------------------------------------------------------------------------- many seeds, one table


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per segment and metric: mean and sample std (ddof = 1; None for one seed) over the seeds' results."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for seg in ("valid", "test", "holdout"):
        if not results or seg not in results[0]:
            continue
        out[seg] = {m: mean_std([r[seg][m] for r in results]) for m in METRICS}
    return out


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample std (ddof = 1; None for one value) of the finite values, and the values (NaN: None)."""
    v = np.array(values, dtype=np.float64)
    fin = v[np.isfinite(v)]
    return {"mean": float(fin.mean()) if len(fin) else None, "std": float(fin.std(ddof=1)) if len(fin) > 1 else None,
            "values": [float(x) if math.isfinite(x) else None for x in v]}


def _pm(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean']:.4f}" + (f" ± {cell['std']:.4f}" if cell["std"] is not None else "")


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per model: valid Rank IC / Rank ICIR and the four test metrics (mean ± std over seeds)."""
    head = ("| model | valid Rank IC | valid Rank ICIR | test IC | test ICIR | test Rank IC | test Rank ICIR "
            "| selected by |")
    lines = [head, "|" + "---|" * 8]
    for name, agg in summary["models"].items():
        v, t = agg["valid"], agg["test"]
        lines.append(f"| {name} | {_pm(v['rank_ic'])} | {_pm(v['rank_icir'])} | {_pm(t['ic'])} | {_pm(t['icir'])} "
                     f"| {_pm(t['rank_ic'])} | {_pm(t['rank_icir'])} | {SELECTED_BY.get(name, '')} |")
    ceiling = summary.get("ceiling_rank_ic")
    if ceiling:
        lines.append(f"| ceiling (true μ) | {ceiling.get('valid', math.nan):.4f} | | | | "
                     f"{ceiling.get('test', math.nan):.4f} | | |")
    if summary.get("robustness"):
        rob = summary["robustness"]
        lines += ["", f"Robustness: Rank IC on {rob['m']} stocks removed from training (test segment)", "",
                  "| model | Rank IC | Rank ICIR |", "|---|---|---|"]
        for name, agg in rob["models"].items():
            lines.append(f"| {name} | {_pm(agg['rank_ic'])} | {_pm(agg['rank_icir'])} |")
    return "\n".join(lines)


def run_baselines(data: str | Path, *, out: str | Path, models: tuple[str, ...] = MODELS,
                  seeds: tuple[int, ...] = (0, 1, 2), cfg: BaselineConfig = BaselineConfig(),
                  robustness: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train every model with every seed, write ``baselines.json`` (and ``runs.json`` per run) to ``out``.

    With ``robustness`` = M > 0 each seed holds out its own M stocks and the models are trained
    without them; the normal metrics are then those of the held-out training, plus ``robustness``.
    """
    data, out = Path(data), Path(out)
    bad = [m for m in models if m not in MODELS and not (m == TUNED and cfg.tuned_config)]
    if bad or not models:
        raise ValueError(f"--models: unknown {bad} (choose from {', '.join(MODELS)}; "
                         f"'{TUNED}' comes with --tuned-config)")
    if cfg.tuned_config:
        ftrain.load_config(cfg.tuned_config, [])  # a bad file fails now, not after the other models trained
        if TUNED not in models:
            models = (*models, TUNED)
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    if cfg.gpu and not torch.cuda.is_available():
        raise ValueError("--gpu: no CUDA device is visible")
    device = torch.device("cuda", 0) if cfg.gpu else torch.device("cpu")
    if robustness < 0:
        raise ValueError(f"--robustness: expected M >= 2 stocks to hold out (or 0: none), got {robustness}")
    full = load_split(data)
    # every seed's held-out stocks before anything is written: an impossible M leaves --out untouched
    holdouts = {seed: choose_holdout(full, robustness, seed=seed) if robustness else None for seed in seeds}
    out.mkdir(parents=True, exist_ok=True)
    runs = _done_runs(out, data=data, cfg=cfg, robustness=robustness, models=models, seeds=seeds,
                      progress=progress)
    for seed in seeds:
        holdout = holdouts[seed]
        split = load_split(data, holdout=holdout) if holdout else full
        on_device: Split | None = None  # the networks' copy, made when the first of them runs
        fv_data = data
        if holdout and ("factorvae" in models or TUNED in models):
            fv_data = write_holdout_copy(data, out / f"holdout_data_seed{seed}", holdout)
        for name in models:
            if any(r["seed"] == seed for r in runs[name]):
                continue
            t0 = time.time()
            if name == "linear":
                res = _run_linear(split, holdout=holdout, seed=seed)
            elif name == "lightgbm":
                res = fit_lightgbm(split, seed=seed, holdout=holdout, progress=progress)
            elif name in ("factorvae", TUNED):
                res = fit_factorvae(fv_data, out=out / f"{name}_seed{seed}", seed=seed, cfg=cfg,
                                    holdout=holdout, test_panel=full.test, tuned=name == TUNED)
            else:
                on_device = on_device or split_on(split, device)
                res = fit_network(name, on_device, cfg=cfg, seed=seed, holdout=holdout, progress=progress)
            res["seconds"] = time.time() - t0
            if holdout:
                res["holdout_stocks"] = holdout
            runs[name].append(res)
            atomic_write_json(out / "runs.json", runs)
            if progress:
                extra = f", held-out RankIC {res['holdout']['rank_ic']:.4f}" if holdout else ""
                print(f"[baselines] {name} seed {seed}: valid RankIC {res['valid']['rank_ic']:.4f}, test RankIC "
                      f"{res['test']['rank_ic']:.4f} RankICIR {res['test']['rank_icir']:.3f}{extra} "
                      f"[{res['seconds']:.1f}s]", flush=True)
    summary: dict[str, Any] = {"data": str(data), "seeds": list(seeds), "config": _config_dict(cfg),
                               "models": {m: aggregate(r) for m, r in runs.items()},
                               "selected_by": {m: SELECTED_BY[m] for m in runs}}
    summary["factor_model"] = {m: aggregate_factor_figures(r) for m, r in runs.items()
                               if r and all("factor_model" in x for x in r)}
    if "ceiling_rank_ic" in full.meta.extra:
        summary["ceiling_rank_ic"] = full.meta.extra["ceiling_rank_ic"]
    if robustness:
        summary["robustness"] = {"m": robustness, "models": {m: aggregate(r)["holdout"] for m, r in runs.items()},
                                 "holdout_stocks": {str(r["seed"]): r["holdout_stocks"]
                                                    for r in runs[models[0]]}}
    summary["markdown"] = markdown_table(summary)
    atomic_write_json(out / "baselines.json", summary)
    return summary


def _done_runs(out: Path, *, data: Path, cfg: BaselineConfig, robustness: int, models: tuple[str, ...],
               seeds: tuple[int, ...], progress: bool) -> dict[str, list[dict[str, Any]]]:
    """The runs an earlier call with the same data and options finished in ``out`` (empty lists if none).

    ``settings.json`` pins what the runs depend on; a call with other settings starts afresh
    rather than mixing runs that are not comparable.
    """
    # "selected_by": runs chosen by another rule (before, the networks' epoch and the ridge's λ by
    # valid Rank IC) are not comparable and are not resumed
    settings = {"data": str(data.resolve()), "config": _config_dict(cfg), "robustness": robustness,
                "selected_by": SELECTED_BY}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    path, pinned = out / "runs.json", out / "settings.json"
    if path.exists() and pinned.exists():
        if json.loads(pinned.read_text()) == json.loads(json.dumps(settings)):
            old = json.loads(path.read_text())
            for m in models:
                runs[m] = [r for r in old.get(m, []) if r.get("seed") in seeds]
            done = sum(len(v) for v in runs.values())
            if done and progress:
                print(f"[baselines] resuming in {out}: {done} of {len(models) * len(seeds)} runs already done",
                      flush=True)
        elif progress:
            print(f"[baselines] {pinned} differs from this call's options: starting afresh", flush=True)
    atomic_write_json(pinned, settings)
    atomic_write_json(path, runs)
    return runs


def _config_dict(cfg: BaselineConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["factorvae_config"] = None if cfg.factorvae_config is None else str(cfg.factorvae_config)
    d["factorvae_overrides"] = list(cfg.factorvae_overrides)
    d["tuned_config"] = None if cfg.tuned_config is None else str(cfg.tuned_config)
    if cfg.tuned_config is not None:  # what the tuned runs depend on is the file's content
        d["tuned_config_text"] = Path(cfg.tuned_config).read_text()
    return d


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvae.baselines", description="Baselines on FactorVAE's split.")
    p.add_argument("--data", type=Path, required=True, help="shard folder")
    p.add_argument("--out", type=Path, required=True, help="output folder for baselines.json")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {','.join(MODELS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma list of integer seeds")
    p.add_argument("--hidden", type=int, default=None, help="MLP/GRU hidden size (64)")
    p.add_argument("--epochs", type=int, default=None, help="MLP/GRU epochs (30)")
    p.add_argument("--lr", type=float, default=None, help="MLP/GRU learning rate (1e-3)")
    p.add_argument("--patience", type=int, default=None, help="MLP/GRU early-stopping patience (5)")
    p.add_argument("--batch-days", type=int, default=None, help="MLP/GRU days per batch (16)")
    p.add_argument("--day-fraction", type=float, default=None,
                   help="share of training days per epoch, for every network (1.0)")
    p.add_argument("--config", type=Path, default=None, help="FactorVAE YAML (fvae.train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="FactorVAE override")
    p.add_argument("--debug", action="store_true", help="tiny models that train in seconds")
    p.add_argument("--tuned-config", type=Path, default=None, metavar="YAML",
                   help="also train the 'tuned' model: FactorVAE from this YAML as it is (e.g. best_config.yaml)")
    p.add_argument("--robustness", type=int, default=0, metavar="M", help="hold M random stocks out of training")
    p.add_argument("--gpu", action="store_true",
                   help="train the MLP, GRU and FactorVAE runs on cuda:0 (the ridge and LightGBM stay on the CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fvae.config import ConfigError

    try:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
        base = DEBUG if args.debug else BaselineConfig()
        given = {"hidden": args.hidden, "epochs": args.epochs, "lr": args.lr, "patience": args.patience,
                 "batch_days": args.batch_days, "day_fraction": args.day_fraction, "gpu": args.gpu or None}
        cfg = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None},
                                  factorvae_config=args.config, tuned_config=args.tuned_config,
                                  factorvae_overrides=tuple(base.factorvae_overrides) + tuple(args.overrides))
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        summary = run_baselines(args.data, out=args.out, models=models, seeds=seeds, cfg=cfg,
                                robustness=args.robustness)
    except (DataError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary["markdown"])
    print(f"[baselines] wrote {args.out / 'baselines.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
