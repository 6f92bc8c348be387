"""Portfolio backtests of a prediction file: TopK-Drop and mean-variance on the model's own risk model.

    python -m fvae.backtest --pred PREDICTIONS --out DIR [--data DIR] [--strategy topk|mv|all]
                            [--topk 50 --n-drop 5] [--buy-cost-bps 5 --sell-cost-bps 15]
                            [--benchmark INDEX_CSV] [--max-weight 0.05 --max-turnover 0.3
                            --risk-aversion 1] [--risk auto|calibrated|raw] [--qlib-check]

PREDICTIONS is a ``pred_*.parquet`` written by ``fvae.train``, a run directory (then its
``pred_test.parquet``) or a search directory of ``fvae.tune`` (then its best trial's). Mean-variance also needs the matching ``factors_*.parquet`` next to it.

Risk model of mean-variance (``--risk``): ``calibrated`` is
Σ_c = β diag(c_z σ_z²) βᵀ + L diag(λ) Lᵀ + σ_u² u uᵀ + c_α diag(σ_α²) with the scalars of
``risk_calibration`` in the run's metrics.json (next to the predictions; fit on the validation
segment, ``fvae.risk.calibrate_risk``), the residual factors L (``resid_beta_p``) and √λ
(``resid_sigma_p``) and the alpha factor u (``alpha_u``) and σ_u (``alpha_sigma``) of the
prediction files, when the calibration has them; ``raw`` the model's own σ's as written in the
prediction files, ``auto`` (the default) calibrated when the run has a calibration, else raw with a
note. backtest.json's ``risk_model`` records which Σ the books were built on.

Timing convention. A row (date t, stock i) of the predictions holds the score computed from
information up to t and ``label`` = ret[t, i], the raw forward return realised *after* t (for the
synthetic market the return from t to t+1; for qlib's default label the return from the close of
t+1 to the close of t+2, i.e. trading one day after the signal). A portfolio w_t formed from the
day-t scores therefore earns  r_t = Σ_i w_t,i · ret[t, i]. With ``--data`` the realised returns
come from the shard folder's ``ret`` column (checked against the predictions' ``label``) and the
benchmark universe is the folder's stock-days; without it, the predictions' own rows are both.

Weights and costs. Each day the book is rebalanced to its target weights w_t (fully invested,
long-only, Σ w = 1). Trades are measured between consecutive targets, Δ_t = w_t − w_{t−1} with
w_{−1} = 0 (the first day buys the whole book); the drift of weights inside a day is ignored, the
usual research-backtest simplification (qlib's share-based accounting is in ``--qlib-check``):

    buys_t = Σ_i max(Δ_t,i, 0),  sells_t = Σ_i max(−Δ_t,i, 0),  turnover_t = ‖Δ_t‖₁ = buys_t + sells_t
    net_t  = gross_t − buy_rate · buys_t − sell_rate · sells_t          (rates = bps / 10⁴)

Outputs in --out, per strategy S: ``returns_S.csv`` (datetime, gross, net, benchmark, excess =
net − benchmark, turnover, buys, sells, holdings), ``holdings_S.parquet`` (datetime, instrument,
weight); for all: ``backtest.json`` (metrics with and without costs), ``cumulative.png``,
``drawdown.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fvae.data.shards import DataError, read_meta, read_rows
from fvae.io import atomic_write_json, pyplot
from fvae.progress import bar
from fvae.risk import apply_calibration, risk_matvec

TRADING_DAYS = 252
STRATEGIES = ("topk", "mv")
STRATEGY_LABELS = {"topk": "TopK-Drop", "mv": "mean-variance"}
RISK_MODES = ("auto", "calibrated", "raw")  # --risk: which Σ mean-variance uses (module docstring)


@dataclass(frozen=True, kw_only=True)
class BacktestConfig:
    """Options of one backtest run; the CLI flags map one to one."""

    strategies: tuple[str, ...] = STRATEGIES
    topk: int = 50  # k: names held by TopK-Drop (paper: 50)
    n_drop: int = 5  # n: most names TopK-Drop replaces per day (paper: 5)
    buy_cost_bps: float = 5.0
    sell_cost_bps: float = 15.0
    max_weight: float = 0.05  # mean-variance cap per name
    max_turnover: float = 0.3  # mean-variance limit on ‖w_t − w_{t−1}‖₁ from the second day on
    risk_aversion: float = 1.0  # λ, in the model's units (μ and Σ are in label units)
    benchmark: Path | None = None  # CSV (date, return); None = equal-weighted universe of the day
    risk: str = "auto"  # RISK_MODES: calibrated Σ when the run has one (auto), required (calibrated), or raw

    def __post_init__(self) -> None:
        if self.risk not in RISK_MODES:
            raise ValueError(f"--risk: expected one of {', '.join(RISK_MODES)}, got {self.risk!r}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ValueError(f"--strategy: expected topk, mv or all, got {list(self.strategies)}")
        if self.topk < 1:
            raise ValueError(f"--topk: expected >= 1, got {self.topk}")
        if not 0 <= self.n_drop <= self.topk:
            raise ValueError(f"--n-drop: expected 0..topk ({self.topk}), got {self.n_drop}")
        if self.buy_cost_bps < 0 or self.sell_cost_bps < 0:
            raise ValueError("--buy-cost-bps/--sell-cost-bps: expected >= 0")
        if not 0 < self.max_weight <= 1:
            raise ValueError(f"--max-weight: expected 0 < w <= 1, got {self.max_weight}")
        if not 0 <= self.max_turnover <= 2:
            raise ValueError(f"--max-turnover: expected 0..2 (an L1 distance between two books), "
                             f"got {self.max_turnover}")
        if not (self.risk_aversion >= 0 and math.isfinite(self.risk_aversion)):
            raise ValueError(f"--risk-aversion: expected a finite number >= 0, got {self.risk_aversion}")


# --------------------------------------------------------------------------- inputs


@dataclass
class Market:
    """One prediction segment as dense day × stock arrays (NaN / False where a stock has no row)."""

    dates: pd.DatetimeIndex  # (D,)
    instruments: np.ndarray  # (N,)
    score: np.ndarray  # (D, N) predicted μ_y
    ret: np.ndarray  # (D, N) realised forward return
    universe: np.ndarray  # (D, N) bool: the benchmark's stocks (finite ret)
    beta: np.ndarray | None = None  # (D, N, K) factor exposures
    sigma_alpha: np.ndarray | None = None  # (D, N)
    sigma_z: np.ndarray | None = None  # (D, K) prior factor std from factors_*.parquet
    resid_beta: np.ndarray | None = None  # (D, N, P) residual factors' loadings (resid_beta_p), when written
    resid_sigma: np.ndarray | None = None  # (D, P) their std (resid_sigma_p)
    alpha_u: np.ndarray | None = None  # (D, N) the alpha factor's loadings (alpha_u), when written
    alpha_sigma: np.ndarray | None = None  # (D,) its calibrated std (alpha_sigma)
    source: dict[str, str] = field(default_factory=dict)

    @property
    def tradable(self) -> np.ndarray:
        """(D, N) a stock can be held on a day when it has both a score and a realised return."""
        return np.isfinite(self.score) & np.isfinite(self.ret)


def trial_dirs(exp_dir: Path, summary: dict[str, Any], trial_id: str) -> list[Path]:
    """Where a search's trial may have its run directory: as recorded in summary.json, then
    EXP_DIR/trials/<id> (the search directory may have moved since)."""
    recorded = [Path(t["run_dir"]) for t in summary.get("trials", [])
                if t.get("trial_id") == trial_id and t.get("run_dir")]
    return [*recorded, exp_dir / "trials" / str(trial_id)]


def resolve_predictions(path: str | Path) -> Path:
    """A pred_*.parquet file, a run directory's pred_test.parquet, or that of a search directory's
    best trial (``summary.json`` of ``fvae.tune``)."""
    path = Path(path)
    if path.is_dir() and not (path / "pred_test.parquet").exists() and (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path / 'summary.json'}: not valid JSON ({e})") from None
        best = (summary.get("best") or {}).get("trial_id")
        if best is None:
            raise DataError(f"{path / 'summary.json'}: the search has no best trial yet")
        cands = trial_dirs(path, summary, best)
        path = next((c for c in cands if c.is_dir()), cands[-1])
    if path.is_dir():
        path = path / "pred_test.parquet"
    if not path.is_file():
        raise DataError(f"{path}: prediction file not found (expected a pred_*.parquet, a run directory or a "
                        "search directory)")
    return path


def factors_path_for(pred_path: Path) -> Path:
    """pred_test.parquet -> factors_test.parquet in the same folder."""
    return pred_path.with_name(pred_path.name.replace("pred_", "factors_", 1))


def load_market(pred: str | Path, *, data: str | Path | None = None, need_risk: bool = False) -> Market:
    """Read predictions (+ factors) and realised returns into dense arrays.

    With ``data``, ``ret`` comes from the shard folder and must agree with the predictions'
    ``label`` where both exist (else the predictions were made on other data).
    """
    pred_path = resolve_predictions(pred)
    df = pd.read_parquet(pred_path)
    need = ["datetime", "instrument", "score"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{pred_path}: missing column(s) {missing}")
    if df.empty:
        raise DataError(f"{pred_path}: no rows")
    if df.duplicated(["datetime", "instrument"]).any():
        raise DataError(f"{pred_path}: duplicate (datetime, instrument) rows")
    df["datetime"] = pd.to_datetime(df["datetime"])
    df["instrument"] = df["instrument"].astype(str)
    source = {"predictions": str(pred_path.resolve())}

    if data is not None:
        data = Path(data)
        meta = read_meta(data)
        rows = read_rows(data, meta, df["datetime"].min(), df["datetime"].max(),
                         columns=["datetime", "instrument", "ret"])
        rows["instrument"] = rows["instrument"].astype(str)
        rows = rows[rows["ret"].notna() & rows["datetime"].isin(df["datetime"].unique())]
        source["returns"] = f"{data} (ret)"
        source["data_source"] = meta.source
    elif "label" in df.columns:
        rows = df.loc[df["label"].notna(), ["datetime", "instrument", "label"]].rename(columns={"label": "ret"})
        source["returns"] = f"{pred_path} (label)"
    else:
        raise DataError(f"{pred_path}: no 'label' column and no --data folder to take realised returns from")

    dates = pd.DatetimeIndex(np.unique(df["datetime"].to_numpy()))
    instruments = np.unique(np.concatenate([df["instrument"].to_numpy(str), rows["instrument"].to_numpy(str)]))
    D, N = len(dates), len(instruments)
    di, si = dates.get_indexer(df["datetime"]), np.searchsorted(instruments, df["instrument"].to_numpy(str))
    score = np.full((D, N), np.nan)
    score[di, si] = df["score"].to_numpy(np.float64)
    ret = np.full((D, N), np.nan)
    rd, rs = dates.get_indexer(rows["datetime"]), np.searchsorted(instruments, rows["instrument"].to_numpy(str))
    ok = rd >= 0
    ret[rd[ok], rs[ok]] = rows["ret"].to_numpy(np.float64)[ok]
    if data is not None and "label" in df.columns:
        lab = np.full((D, N), np.nan)
        lab[di, si] = df["label"].to_numpy(np.float64)
        both = np.isfinite(lab) & np.isfinite(ret)
        diff = np.abs(lab[both] - ret[both])
        if both.any() and diff.max() > 1e-5 + 1e-4 * np.abs(ret[both]).max():
            raise DataError(f"{pred_path}: column 'label' differs from {data}'s 'ret' (max |diff| {diff.max():.3g}); "
                            "were the predictions made on this data?")
    market = Market(dates=dates, instruments=instruments, score=score, ret=ret, universe=np.isfinite(ret),
                    source=source)
    _check_overlap(market, df, rows, pred_path=pred_path, returns=source["returns"])

    betas = sorted((c for c in df.columns if c.startswith("beta_")), key=lambda c: int(c.split("_")[1]))
    fpath = factors_path_for(pred_path)
    if betas and "sigma_alpha" in df.columns and fpath.is_file():
        K = len(betas)
        beta = np.full((D, N, K), np.nan)
        beta[di, si] = df[betas].to_numpy(np.float64)
        sa = np.full((D, N), np.nan)
        sa[di, si] = df["sigma_alpha"].to_numpy(np.float64)
        factors = pd.read_parquet(fpath)
        cols = [f"sigma_z_{k}" for k in range(K)]
        missing = [c for c in ["datetime", *cols] if c not in factors.columns]
        if missing:
            raise DataError(f"{fpath}: missing column(s) {missing} (predictions have {K} betas)")
        by_day = factors.set_index(pd.to_datetime(factors["datetime"])).reindex(dates)
        fz = by_day[cols]
        if fz.isna().any().any():
            raise DataError(f"{fpath}: no factor row for {int(fz.isna().any(axis=1).sum())} prediction date(s)")
        market.beta, market.sigma_alpha, market.sigma_z = beta, sa, fz.to_numpy(np.float64)
        source["factors"] = str(fpath)
        resid = sorted((c for c in df.columns if c.startswith("resid_beta_")), key=lambda c: int(c.rsplit("_", 1)[1]))
        rs_cols = [f"resid_sigma_{p}" for p in range(len(resid))]
        if resid and all(c in factors.columns for c in rs_cols):
            market.resid_beta = np.zeros((D, N, len(resid)))
            market.resid_beta[di, si] = df[resid].to_numpy(np.float64)
            market.resid_sigma = by_day[rs_cols].fillna(0.0).to_numpy(np.float64)
        if "alpha_u" in df.columns and "alpha_sigma" in factors.columns:
            market.alpha_u = np.zeros((D, N))
            market.alpha_u[di, si] = df["alpha_u"].to_numpy(np.float64)
            market.alpha_sigma = by_day["alpha_sigma"].fillna(0.0).to_numpy(np.float64)
    elif need_risk:
        why = (f"{fpath} not found" if not fpath.is_file() else
               f"{pred_path} lacks beta_k/sigma_alpha columns")
        raise DataError(f"mean-variance needs the model's risk model: {why}")
    return market


def read_calibration(pred_path: Path) -> tuple[dict[str, Any] | None, str]:
    """``risk_calibration`` of the run that wrote ``pred_path`` (its folder's metrics.json) and that
    file's path; None (and why, in place of the path) when there is none."""
    path = pred_path.parent / "metrics.json"
    if not path.is_file():
        return None, f"{path} not found"
    try:
        cal = json.loads(path.read_text()).get("risk_calibration")
    except (json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{path}: not a valid metrics.json ({e})") from None
    if cal is None:
        return None, f"{path} has no risk_calibration"
    def positive(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v) and v > 0

    ok = isinstance(cal, dict) and positive(cal.get("c_alpha")) and (
        positive(cal.get("c_z")) or (isinstance(cal.get("c_z"), list) and bool(cal["c_z"])
                                     and all(positive(v) for v in cal["c_z"])))
    if not ok:
        raise DataError(f"{path}: risk_calibration: expected positive finite c_z and c_alpha, got {cal!r}")
    return cal, str(path)


def use_risk_model(market: Market, mode: str) -> dict[str, Any]:
    """Put the Σ of ``mode`` (RISK_MODES) into ``market``'s σ_z, σ_α; returns backtest.json's ``risk_model``."""
    if mode == "raw":
        return {"sigma": "raw"}
    cal, where = read_calibration(Path(market.source["predictions"]))
    if cal is None:
        if mode == "calibrated":
            raise DataError(f"--risk calibrated: {where} (pass --risk raw for the model's own Σ)")
        return {"sigma": "raw", "note": f"no calibration: {where}"}
    assert market.sigma_z is not None and market.sigma_alpha is not None and market.beta is not None
    try:
        market.sigma_z, market.sigma_alpha = apply_calibration(sigma_z=market.sigma_z, sigma_alpha=market.sigma_alpha,
                                                               c_z=cal["c_z"], c_alpha=float(cal["c_alpha"]))
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    out = {"sigma": "calibrated", "c_z": cal["c_z"], "c_alpha": float(cal["c_alpha"]),
           "fit_segment": cal.get("fit_segment"), "from": where}
    P = int(cal.get("residual_factors") or 0)
    if P:  # the residual factors are factors of Σ_c: appended to β and σ_z
        if market.resid_beta is None or market.resid_sigma is None or market.resid_beta.shape[-1] != P:
            raise DataError(f"{where}: risk_calibration has {P} residual factors, but {market.source['predictions']} "
                            f"and its factors file do not hold resid_beta_0..{P - 1} and resid_sigma_0..{P - 1}")
        market.beta = np.concatenate([market.beta, market.resid_beta], -1)
        market.sigma_z = np.concatenate([market.sigma_z, market.resid_sigma], -1)
        out["residual_factors"] = P
    if "c_mu" in cal:  # the alpha factor: one more factor of Σ_c
        if market.alpha_u is None or market.alpha_sigma is None:
            raise DataError(f"{where}: risk_calibration has an alpha factor (c_mu), but {market.source['predictions']} "
                            "and its factors file do not hold alpha_u and alpha_sigma")
        market.beta = np.concatenate([market.beta, market.alpha_u[..., None]], -1)
        market.sigma_z = np.concatenate([market.sigma_z, market.alpha_sigma[:, None]], -1)
        out["c_mu"] = float(cal["c_mu"])
    return out


def _calibration_text(rm: dict[str, Any]) -> str:
    """'c_z …, c_alpha …, P residual factors' of a ``risk_model`` record; c_z one scalar or one per factor."""
    cz = np.atleast_1d(np.asarray(rm["c_z"], np.float64))
    text = f"c_z {cz[0]:.3g}" if cz.size == 1 else f"c_z {cz.min():.3g}..{cz.max():.3g} ({cz.size} factors)"
    alpha = f", alpha factor c_mu {rm['c_mu']:.3g}" if "c_mu" in rm else ""
    return f"{text}, c_alpha {rm['c_alpha']:.3g}, {rm.get('residual_factors', 0)} residual factors{alpha}"


def _check_overlap(market: Market, df: pd.DataFrame, rows: pd.DataFrame, *, pred_path: Path, returns: str) -> None:
    """A backtest needs stock-days with both a finite score and a realised return; without one it
    would report a complete-looking run whose every return is 0."""
    if not np.isfinite(market.score).any():
        raise DataError(f"{pred_path}: column 'score' has no finite value on any of its {len(df)} rows; "
                        "expected model scores")
    if market.tradable.any():
        return
    span = f"{market.dates[0].date()}..{market.dates[-1].date()}"
    if rows.empty:
        raise DataError(f"{pred_path}: no realised return from {returns} on any of its {len(market.dates)} days "
                        f"({span}); were the predictions made on this data?")
    raise DataError(f"{pred_path}: none of its {df['instrument'].nunique()} instruments (e.g. "
                    f"{df['instrument'].iloc[0]}) has both a score and a realised return from {returns} on its "
                    f"days ({span}); were the predictions made on this data?")


def read_benchmark_csv(path: str | Path, dates: pd.DatetimeIndex) -> np.ndarray:
    """Index returns (CSV with columns ``date`` and ``return``) aligned to ``dates``: (D,)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: benchmark CSV not found")
    df = pd.read_csv(path)
    missing = [c for c in ("date", "return") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected 'date' and 'return'")
    try:
        idx = pd.to_datetime(df["date"])
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: column 'date' is not parseable as dates ({e})") from None
    s = pd.Series(pd.to_numeric(df["return"], errors="coerce").to_numpy(), index=idx)
    s = s[~s.index.duplicated()].reindex(dates)
    if s.isna().any():
        first = dates[int(np.argmax(s.isna().to_numpy()))]
        raise DataError(f"{path}: column 'return' has no value for {int(s.isna().sum())} backtest day(s), "
                        f"first {first.date()}")
    return s.to_numpy(np.float64)


def equal_weight_benchmark(market: Market) -> np.ndarray:
    """Mean realised return over the day's universe: (D,)."""
    n = market.universe.sum(1)
    tot = np.where(market.universe, market.ret, 0.0).sum(1)
    return np.where(n > 0, tot / np.maximum(n, 1), 0.0)


# --------------------------------------------------------------------------- TopK-Drop


def topk_drop_weights(score: np.ndarray, tradable: np.ndarray, *, topk: int, n_drop: int) -> np.ndarray:
    """TopK-Drop target weights (D, N): hold k names equally weighted, replace at most n a day.

    qlib's TopkDropoutStrategy (method_sell="bottom", method_buy="top"): the candidates are the
    k + n − |held| best-scored names not held; held names and candidates are ranked together and
    the book becomes the top k of that combined list. So at most n held names leave per day, each
    replaced by a better-scored candidate. Two deliberate differences: (i) when there are too few
    candidates (a day with fewer than k + n stocks) nothing is sold without a replacement, whereas
    qlib would still sell the bottom n; (ii) a held name that leaves the tradable set (no score or
    no return that day) is sold at once, which may exceed n. Fully invested, no 95 % risk degree.
    """
    D, N = score.shape
    w = np.zeros((D, N))
    held = np.zeros(0, dtype=np.int64)
    for d in range(D):
        ok = tradable[d]
        s = np.where(ok, score[d], -np.inf)
        held = held[ok[held]]  # forced exits
        is_held = np.zeros(N, dtype=bool)
        is_held[held] = True
        order = np.argsort(-s, kind="stable")
        order = order[ok[order]]  # tradable names, best first
        cand = order[~is_held[order]][: max(topk + n_drop - len(held), 0)]
        comb = np.concatenate([held, cand])
        comb = comb[np.argsort(-s[comb], kind="stable")]
        held = comb[:topk]
        if len(held):
            w[d, held] = 1.0 / len(held)
    return w


# --------------------------------------------------------------------------- mean-variance


def _prox_capped_simplex_l1(v: np.ndarray, p: np.ndarray, kappa: float, cap: float) -> np.ndarray:
    """argmin_w ½‖w − v‖² + κ‖w − p‖₁  s.t. 0 ≤ w ≤ cap, Σ w = 1   (exact, O(n log n)).

    With a multiplier s for Σ w = 1 the problem separates: w_i(s) = clip(S_i(v_i − s), 0, cap),
    S_i the soft-threshold of width κ around p_i. h(s) = Σ_i w_i(s) is piecewise linear and
    non-increasing, with slope −#{i: s in [v_i − p_i + κ, v_i + κ] ∪ [v_i − cap − κ, v_i − p_i − κ]};
    it is integrated exactly from the right over the sorted breakpoints and h(s) = 1 solved on
    the segment that brackets 1. Needs p_i ∈ [0, cap] and n·cap ≥ 1.
    """
    starts = np.concatenate([v - p + kappa, v - cap - kappa])
    ends = np.concatenate([v + kappa, v - p - kappa])
    pts = np.concatenate([starts, ends])
    delta = np.concatenate([np.ones_like(starts), -np.ones_like(ends)])
    order = np.argsort(pts, kind="stable")
    pts, delta = pts[order], delta[order]
    count = np.cumsum(delta)[:-1]  # slope magnitude on (pts[j], pts[j+1])
    seg = count * np.diff(pts)
    h = np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]])  # h(pts[j]), non-increasing
    j = int(np.searchsorted(-h, -1.0, side="right")) - 1  # last j with h[j] >= 1
    j = min(max(j, 0), len(count) - 1)
    s = pts[j] + (h[j] - 1.0) / count[j] if count[j] > 0 else pts[j]
    u = v - s
    soft = p + np.sign(u - p) * np.maximum(np.abs(u - p) - kappa, 0.0)
    return np.clip(soft, 0.0, cap)


def _fista(mu: np.ndarray, beta: np.ndarray, var_z: np.ndarray, var_a: np.ndarray, *, lam: float,
           cap: float, p: np.ndarray, kappa: float, w0: np.ndarray, step: float,
           max_iter: int, tol: float) -> np.ndarray:
    """Accelerated proximal gradient with adaptive restart on −μᵀw + λ/2 wᵀΣw + κ‖w − p‖₁ over the capped simplex."""
    w = w0.copy()
    y, t = w.copy(), 1.0
    for _ in range(max_iter):
        grad = -mu + lam * risk_matvec(y, beta, var_z, var_a)
        w_new = _prox_capped_simplex_l1(y - step * grad, p, step * kappa, cap)
        if np.max(np.abs(w_new - w)) < tol:
            return w_new
        if np.dot(y - w_new, w_new - w) > 0:  # restart momentum when it points uphill
            t = 1.0
            y = w_new
        else:
            t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
            y = w_new + ((t - 1) / t_new) * (w_new - w)
            t = t_new
        w = w_new
    return w


def solve_mean_variance(mu: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray, sigma_alpha: np.ndarray, *,
                        risk_aversion: float, max_weight: float, w_prev: np.ndarray | None = None,
                        max_turnover: float | None = None, max_iter: int = 2000,
                        tol: float = 1e-9) -> np.ndarray:
    """One day's mean-variance book on the model's factor risk model.

        maximise  μᵀw − (λ/2) wᵀΣw,   Σ = β diag(σ_z²) βᵀ + diag(σ_α²)
        s.t.      0 ≤ w ≤ cap,  Σ w = 1,  ‖w − w_prev‖₁ ≤ τ

    mu (n,), beta (n, K), sigma_z (K,), sigma_alpha (n,), w_prev (n,) or None (no turnover limit).

    Solver, self-contained: FISTA on the capped simplex with the exact prox of the L1 term
    (``_prox_capped_simplex_l1``); Σw is computed through the factors (O(nK), no n × n matrix).
    The turnover limit is handled through its Lagrangian: the solution of the problem with
    penalty κ‖w − w_prev‖₁ has turnover non-increasing in κ, so κ = 0 is tried first and, if the
    limit binds, κ is bracketed by doubling and bisected; the book returned is the feasible one
    (or, where T(κ) jumps as in the λ → 0 linear programme, the mix of the two bracketing books
    that meets the limit exactly, which is then optimal). Checked against cvxpy to ~1e-5.
    w_prev may sum to less than 1 (names that left the universe were sold) or exceed the cap;
    the turnover that is then unavoidable is allowed even when it exceeds τ.
    If n · cap < 1 the cap is raised to 1/n (no feasible book otherwise).
    """
    mu = np.asarray(mu, np.float64)
    n = len(mu)
    if n == 0:
        return np.zeros(0)
    cap = max(max_weight, 1.0 / n)
    var_z, var_a = np.asarray(sigma_z, np.float64) ** 2, np.asarray(sigma_alpha, np.float64) ** 2
    beta = np.asarray(beta, np.float64)
    lam = float(risk_aversion)
    # Lipschitz constant of the gradient: λ‖Σ‖₂ ≤ λ (max σ_α² + ‖diag(σ_z) βᵀβ diag(σ_z)‖₂), a K × K problem
    sz = np.sqrt(var_z)
    g = (beta * sz).T @ (beta * sz)
    L = lam * (var_a.max() + (np.linalg.eigvalsh(g).max() if g.size else 0.0))
    spread = float(mu.max() - mu.min())
    # λ → 0 is a linear programme: cap the step so that step·spread stays ≈ 10³ (no float cancellation)
    L = max(L, spread * 1e-3, 1e-12)
    step = 1.0 / L
    # the L1 anchor: w_prev clipped to the cap. For w ≤ cap, |w − w_prev| = |w − p| + (w_prev − p), so the
    # penalty is the same up to a constant and the true turnover is ‖w − p‖₁ + excess
    w_prev_ = np.zeros(n) if w_prev is None else np.asarray(w_prev, np.float64)
    p = np.clip(w_prev_, 0.0, cap)
    excess = float(np.abs(w_prev_ - p).sum())
    start = p / p.sum() if p.sum() > 0 else np.full(n, 1.0 / n)
    start = _prox_capped_simplex_l1(start, start, 0.0, cap)  # feasible start

    def solve(kappa: float, w0: np.ndarray) -> np.ndarray:
        return _fista(mu, beta, var_z, var_a, lam=lam, cap=cap, p=p, kappa=kappa, w0=w0, step=step,
                      max_iter=max_iter, tol=tol)

    w = solve(0.0, start)
    if w_prev is None or max_turnover is None:
        return w
    turnover = lambda x: float(np.abs(x - p).sum()) + excess  # noqa: E731
    # the least turnover any book needs: sell what is above the cap, buy what is missing from Σ = 1
    limit = max(max_turnover, excess + max(0.0, 1.0 - p.sum())) + 1e-12
    if turnover(w) <= limit:
        return w
    lo, hi = 0.0, max(spread, 1e-12)
    w_lo, w_hi = w, solve(hi, w)
    while turnover(w_hi) > limit and hi < 1e12:
        lo, hi, w_lo = hi, hi * 4.0, w_hi
        w_hi = solve(hi, w_hi)
    for _ in range(60):  # stop once the binding limit is met to 10⁻⁴ of itself
        if hi - lo <= 1e-7 * hi or turnover(w_hi) >= limit * (1 - 1e-4):
            break
        mid = 0.5 * (lo + hi)
        w_mid = solve(mid, w_hi)
        if turnover(w_mid) <= limit:
            hi, w_hi = mid, w_mid
        else:
            lo, w_lo = mid, w_mid
    # Near the critical κ both books minimise the same Lagrangian; when the objective is (nearly)
    # linear, T(κ) jumps there and the optimum mixes them: move from w_hi towards w_lo until the
    # limit binds (T is convex along the segment, so bisect on the mixing share).
    a, b = 0.0, 1.0
    for _ in range(50):
        m = 0.5 * (a + b)
        if turnover(w_hi + m * (w_lo - w_hi)) <= limit:
            a = m
        else:
            b = m
    mix = w_hi + a * (w_lo - w_hi)
    objective = lambda x: float(mu @ x - 0.5 * lam * x @ risk_matvec(x, beta, var_z, var_a))  # noqa: E731
    return mix if objective(mix) > objective(w_hi) else w_hi


def mean_variance_weights(market: Market, *, risk_aversion: float, max_weight: float, max_turnover: float,
                          progress: bool = True) -> np.ndarray:
    """Daily mean-variance books (D, N) from the model's μ, β, σ_α and the day's prior σ_z."""
    if market.beta is None or market.sigma_alpha is None or market.sigma_z is None:
        raise DataError(f"{market.source.get('predictions')}: mean-variance needs beta_k, sigma_alpha and "
                        "factors_*.parquet")
    D, N = market.score.shape
    w = np.zeros((D, N))
    prev = np.zeros(N)
    ok_all = market.tradable & np.isfinite(market.sigma_alpha) & np.isfinite(market.beta).all(-1)
    t0 = time.time()
    days = bar(range(D), desc="[backtest] mean-variance", unit="day", enabled=progress)
    for d in days:
        idx = np.nonzero(ok_all[d])[0]
        if len(idx) == 0:
            prev = np.zeros(N)
            continue
        first = not prev.any()
        wd = solve_mean_variance(market.score[d, idx], market.beta[d, idx], market.sigma_z[d],
                                 market.sigma_alpha[d, idx], risk_aversion=risk_aversion,
                                 max_weight=max_weight, w_prev=None if first else prev[idx],
                                 max_turnover=None if first else max_turnover)
        w[d, idx] = wd
        prev = w[d]
        if progress and days.disable and (d + 1) % 50 == 0:  # a log, not a terminal: a line now and then
            print(f"[backtest] mean-variance day {d + 1}/{D} ({time.time() - t0:.1f}s)", flush=True)
    return w


# --------------------------------------------------------------------------- accounting and metrics


def simulate(weights: np.ndarray, ret: np.ndarray, *, buy_cost_bps: float, sell_cost_bps: float,
             benchmark: np.ndarray) -> pd.DataFrame:
    """Daily returns of target books ``weights`` (D, N) held over ``ret`` (D, N); see the module doc."""
    w = np.asarray(weights, np.float64)
    held = w != 0
    if np.any(held & ~np.isfinite(ret)):
        raise ValueError("a book holds a stock without a realised return")
    gross = np.where(held, w * np.nan_to_num(ret), 0.0).sum(1)
    prev = np.vstack([np.zeros((1, w.shape[1])), w[:-1]])
    delta = w - prev
    buys, sells = np.clip(delta, 0, None).sum(1), np.clip(-delta, 0, None).sum(1)
    net = gross - buy_cost_bps * 1e-4 * buys - sell_cost_bps * 1e-4 * sells
    return pd.DataFrame({"gross": gross, "net": net, "benchmark": benchmark, "excess": net - benchmark,
                         "turnover": buys + sells, "buys": buys, "sells": sells,
                         "holdings": held.sum(1)})


def wealth(returns: np.ndarray) -> np.ndarray:
    """Compounded wealth curve Π(1 + r), starting from 1 before the first day: (D,)."""
    return np.cumprod(1.0 + np.asarray(returns, np.float64))


def drawdown(curve: np.ndarray) -> np.ndarray:
    """1 − wealth / running peak of a wealth curve (values ≥ 0): (D,)."""
    curve = np.asarray(curve, np.float64)
    return 1.0 - curve / np.maximum.accumulate(curve)


def max_drawdown(curve: np.ndarray) -> float:
    """Largest peak-to-trough loss of a wealth curve, as a fraction of the peak."""
    return float(drawdown(curve).max()) if len(curve) else math.nan


def portfolio_metrics(returns: np.ndarray, benchmark: np.ndarray | None = None) -> dict[str, float]:
    """Annualised (252 days) return (geometric), volatility, Sharpe (rf = 0), IR vs benchmark, max drawdown."""
    r = np.asarray(returns, np.float64)
    n = len(r)
    if n == 0:
        return {"annual_return": math.nan, "annual_volatility": math.nan, "sharpe": math.nan,
                "information_ratio": math.nan, "max_drawdown": math.nan, "total_return": math.nan, "days": 0}
    curve = wealth(r)
    vol = float(r.std(ddof=1)) if n > 1 else math.nan
    out = {"annual_return": float(curve[-1] ** (TRADING_DAYS / n) - 1) if curve[-1] > 0 else -1.0,
           "annual_volatility": vol * math.sqrt(TRADING_DAYS),
           "sharpe": float(r.mean() / vol * math.sqrt(TRADING_DAYS)) if vol and vol > 0 else math.nan,
           "max_drawdown": max_drawdown(curve), "total_return": float(curve[-1] - 1), "days": n}
    if benchmark is not None:
        ex = r - np.asarray(benchmark, np.float64)
        te = float(ex.std(ddof=1)) if n > 1 else math.nan
        out["information_ratio"] = float(ex.mean() / te * math.sqrt(TRADING_DAYS)) if te and te > 0 else math.nan
        out["annual_excess_return"] = float(ex.mean() * TRADING_DAYS)
    return out


# --------------------------------------------------------------------------- the run


def run_backtest(pred: str | Path, *, out: str | Path, data: str | Path | None = None,
                 cfg: BacktestConfig = BacktestConfig(), progress: bool = True) -> dict[str, Any]:
    """Backtest every strategy of ``cfg`` on ``pred`` and write the outputs to ``out``; returns backtest.json."""
    out = Path(out)
    market = load_market(pred, data=data, need_risk="mv" in cfg.strategies)
    risk_model = use_risk_model(market, cfg.risk) if "mv" in cfg.strategies else None
    if cfg.benchmark is not None:
        bench, bench_name = read_benchmark_csv(cfg.benchmark, market.dates), f"index {cfg.benchmark}"
    else:
        bench, bench_name = equal_weight_benchmark(market), "equal-weighted universe"
    D, N = market.score.shape
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs have been read and checked
    if progress:
        print(f"[backtest] {D} days x {N} stocks from {market.source['predictions']}; benchmark: {bench_name}",
              flush=True)
    result: dict[str, Any] = {
        "config": {"topk": cfg.topk, "n_drop": cfg.n_drop, "buy_cost_bps": cfg.buy_cost_bps,
                   "sell_cost_bps": cfg.sell_cost_bps, "max_weight": cfg.max_weight,
                   "max_turnover": cfg.max_turnover, "risk_aversion": cfg.risk_aversion, "risk": cfg.risk},
        "source": market.source, "benchmark": {"name": bench_name, **portfolio_metrics(bench)},
        "start": market.dates[0].strftime("%Y-%m-%d"), "end": market.dates[-1].strftime("%Y-%m-%d"),
        "strategies": {}}
    if risk_model is not None:
        result["risk_model"] = risk_model  # the Σ mean-variance was built on
        if progress:
            print(f"[backtest] mean-variance risk model: {risk_model['sigma']} Σ"
                  + (f" ({_calibration_text(risk_model)})" if "c_z" in risk_model
                     else f" ({risk_model['note']})" if "note" in risk_model else ""), flush=True)
    daily: dict[str, pd.DataFrame] = {}
    for name in cfg.strategies:
        t0 = time.time()
        if name == "topk":
            w = topk_drop_weights(market.score, market.tradable, topk=cfg.topk, n_drop=cfg.n_drop)
        else:
            w = mean_variance_weights(market, risk_aversion=cfg.risk_aversion, max_weight=cfg.max_weight,
                                      max_turnover=cfg.max_turnover, progress=progress)
        frame = simulate(w, market.ret, buy_cost_bps=cfg.buy_cost_bps, sell_cost_bps=cfg.sell_cost_bps,
                         benchmark=bench)
        frame.insert(0, "datetime", market.dates)
        frame.to_csv(out / f"returns_{name}.csv", index=False)
        dd, nn = np.nonzero(w)
        pd.DataFrame({"datetime": market.dates[dd], "instrument": market.instruments[nn],
                      "weight": w[dd, nn]}).to_parquet(out / f"holdings_{name}.parquet", index=False)
        daily[name] = frame
        result["strategies"][name] = {
            "label": STRATEGY_LABELS[name],
            "gross": portfolio_metrics(frame["gross"].to_numpy(), bench),
            "net": portfolio_metrics(frame["net"].to_numpy(), bench),
            "mean_turnover": float(frame["turnover"].mean()),
            "mean_holdings": float(frame["holdings"].mean())}
        if progress:
            m = result["strategies"][name]["net"]
            print(f"[backtest] {STRATEGY_LABELS[name]}: net annual return {m['annual_return']:.2%}, Sharpe "
                  f"{m['sharpe']:.2f}, IR {m['information_ratio']:.2f}, max drawdown {m['max_drawdown']:.2%}, "
                  f"turnover {frame['turnover'].mean():.3f}/day [{time.time() - t0:.1f}s]", flush=True)
    plot_backtest(daily, market.dates, bench, out=out)
    atomic_write_json(out / "backtest.json", result)
    return result


def plot_backtest(daily: dict[str, pd.DataFrame], dates: pd.DatetimeIndex, bench: np.ndarray, *,
                  out: Path) -> None:
    """cumulative.png (strategies gross/net, benchmark; excess below) and drawdown.png."""
    plt = pyplot()

    colors = {"topk": "C0", "mv": "C2"}
    fig, ax = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for name, f in daily.items():
        lab = STRATEGY_LABELS[name]
        ax[0].plot(dates, wealth(f["net"]) - 1, color=colors[name], label=f"{lab} (net)")
        ax[0].plot(dates, wealth(f["gross"]) - 1, color=colors[name], ls="--", lw=0.9, label=f"{lab} (gross)")
        ax[1].plot(dates, wealth(f["excess"]) - 1, color=colors[name], label=f"{lab} excess (net)")
    ax[0].plot(dates, wealth(bench) - 1, color="k", lw=1.2, label="benchmark")
    ax[0].set_ylabel("cumulative return")
    ax[0].set_title("Cumulative return")
    ax[1].axhline(0, color="k", lw=0.6)
    ax[1].set_ylabel("cumulative excess")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="best")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out / "cumulative.png", dpi=100)
    plt.close(fig)

    fig, a = plt.subplots(figsize=(10, 3.2))
    for name, f in daily.items():
        dd = -drawdown(wealth(f["net"]))
        a.plot(dates, dd, color=colors[name], lw=1.3, label=f"{STRATEGY_LABELS[name]} (net)")
        a.fill_between(dates, dd, 0, color=colors[name], alpha=0.12)
    a.plot(dates, -drawdown(wealth(bench)), color="k", lw=1, ls=":", label="benchmark")
    a.set_ylabel("drawdown")
    a.set_title("Drawdown from the running peak")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out / "drawdown.png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- qlib's own backtest (optional)


def qlib_crosscheck(pred: str | Path, *, data: str | Path, out: str | Path, cfg: BacktestConfig = BacktestConfig(),
                    ours: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run qlib's TopkDropoutStrategy + SimulatorExecutor on ``pred_*.pkl`` and put it beside ours.

    Only for shard folders exported from qlib (meta.source = "qlib:<provider_uri>"). qlib is
    imported here only; its recorder (R / mlflow) is not used. qlib trades shares at the close
    with 5 % cash (risk_degree 0.95), its own costs (open_cost = buy, close_cost = sell,
    min_cost = 0) and its benchmark the equal-weighted pool, as ours. Its strategy trades a day
    after the signal and books a return on the day it is realised, so its series is shifted onto
    our dates: the shift (0..3 days) is the one that best aligns the two benchmark series (2 for
    qlib's default label). Both sides are then scored with ``portfolio_metrics`` on the common
    days. Writes ``qlib_check.json``.
    """
    data, out = Path(data), Path(out)
    meta = read_meta(data)
    if not meta.source.startswith("qlib:"):
        raise DataError(f"{data}: meta.json source is {meta.source!r}; --qlib-check needs a qlib-exported folder")
    provider = Path(meta.source.split(":", 1)[1])
    if not provider.is_dir():
        raise DataError(f"{data}/meta.json: source folder {provider} not found (a relative path resolves "
                        "against the current directory)")
    pred_path = resolve_predictions(pred)
    pkl = pred_path.with_suffix(".pkl")
    if not pkl.is_file():
        raise DataError(f"{pkl}: qlib-layout predictions not found next to {pred_path.name}")
    signal = pd.read_pickle(pkl)
    if "score" not in getattr(signal, "columns", []):
        raise DataError(f"{pkl}: expected a frame with a 'score' column")
    ours_dir = out
    if ours is None or "topk" not in ours.get("strategies", {}) or not (out / "returns_topk.csv").is_file():
        ours_dir = out / "qlib_check_topk"  # our TopK-Drop alone, beside (not over) the main outputs
        run_backtest(pred, out=ours_dir, data=data,
                     cfg=BacktestConfig(strategies=("topk",), topk=cfg.topk, n_drop=cfg.n_drop,
                                        buy_cost_bps=cfg.buy_cost_bps, sell_cost_bps=cfg.sell_cost_bps),
                     progress=False)
    mine = pd.read_csv(ours_dir / "returns_topk.csv", parse_dates=["datetime"]).set_index("datetime")

    from fvae.data.qlib_io import init_qlib

    init_qlib(provider, region=meta.extra.get("region", "us"))
    from qlib.backtest import backtest as qlib_backtest
    from qlib.backtest import executor as qlib_executor
    from qlib.contrib.strategy import TopkDropoutStrategy

    dates = signal.index.get_level_values("datetime")
    instruments = sorted(signal.index.get_level_values("instrument").unique().astype(str))
    strategy = TopkDropoutStrategy(signal=signal["score"], topk=cfg.topk, n_drop=cfg.n_drop)
    executor = qlib_executor.SimulatorExecutor(time_per_step="day", generate_portfolio_metrics=True)
    report, _ = qlib_backtest(
        start_time=dates.min(), end_time=dates.max(), strategy=strategy, executor=executor,
        benchmark=instruments, account=1e8,
        exchange_kwargs={"freq": "day", "limit_threshold": None, "deal_price": "close",
                         "open_cost": cfg.buy_cost_bps * 1e-4, "close_cost": cfg.sell_cost_bps * 1e-4,
                         "min_cost": 0.0, "codes": instruments})
    rep = report["1day"][0]  # per day: return (before costs), cost, bench, turnover

    def aligned(col: str, shift: int) -> pd.Series:
        return rep[col].shift(-shift).reindex(mine.index)

    def corr(a: pd.Series, b: pd.Series) -> float:
        ok = a.notna() & b.notna()
        return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else math.nan

    shifts = {k: corr(mine["benchmark"], aligned("bench", k)) for k in range(4)}
    shift = max(shifts, key=lambda k: -math.inf if math.isnan(shifts[k]) else shifts[k])
    q = pd.DataFrame({"gross": aligned("return", shift), "cost": aligned("cost", shift),
                      "bench": aligned("bench", shift), "turnover": aligned("turnover", shift)}).dropna()
    m = mine.loc[q.index]
    q_net = q["gross"] - q["cost"]
    result = {
        "shift_days": shift, "benchmark_correlation": shifts[shift], "days": int(len(q)),
        "daily_correlation": {"gross": corr(m["gross"], q["gross"]), "net": corr(m["net"], q_net)},
        "qlib": {"gross": portfolio_metrics(q["gross"].to_numpy(), q["bench"].to_numpy()),
                 "net": portfolio_metrics(q_net.to_numpy(), q["bench"].to_numpy()),
                 "mean_turnover": float(q["turnover"].mean())},
        "ours": {"gross": portfolio_metrics(m["gross"].to_numpy(), m["benchmark"].to_numpy()),
                 "net": portfolio_metrics(m["net"].to_numpy(), m["benchmark"].to_numpy()),
                 "mean_turnover": float(m["turnover"].mean())},
        "note": "qlib: shares at the close, 5% cash, its cost model; ours: daily target weights, fully invested"}
    atomic_write_json(out / "qlib_check.json", result)
    return result


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvae.backtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--pred", type=Path, required=True, help="pred_*.parquet or a run directory")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--data", type=Path, default=None, help="shard folder: realised returns and benchmark universe")
    p.add_argument("--strategy", choices=["topk", "mv", "all"], default="all")
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--n-drop", type=int, default=5)
    p.add_argument("--buy-cost-bps", type=float, default=5.0)
    p.add_argument("--sell-cost-bps", type=float, default=15.0)
    p.add_argument("--benchmark", type=Path, default=None, help="index return CSV with columns date, return")
    p.add_argument("--max-weight", type=float, default=0.05)
    p.add_argument("--max-turnover", type=float, default=0.3)
    p.add_argument("--risk-aversion", type=float, default=1.0)
    p.add_argument("--risk", choices=RISK_MODES, default="auto",
                   help="mean-variance's Σ: the run's calibrated one (auto: when metrics.json has it), or raw")
    p.add_argument("--qlib-check", action="store_true", help="also run qlib's own TopK-Drop backtest (qlib data only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = BacktestConfig(strategies=STRATEGIES if args.strategy == "all" else (args.strategy,),
                             topk=args.topk, n_drop=args.n_drop, buy_cost_bps=args.buy_cost_bps,
                             sell_cost_bps=args.sell_cost_bps, max_weight=args.max_weight,
                             max_turnover=args.max_turnover, risk_aversion=args.risk_aversion,
                             benchmark=args.benchmark, risk=args.risk)
        res = run_backtest(args.pred, out=args.out, data=args.data, cfg=cfg)
        if args.qlib_check:
            if args.data is None:
                raise DataError("--qlib-check: needs --data (a qlib-exported shard folder)")
            chk = qlib_crosscheck(args.pred, data=args.data, out=args.out, cfg=cfg, ours=res)
            print(f"[backtest] qlib cross-check over {chk['days']} days: net annual return qlib "
                  f"{chk['qlib']['net']['annual_return']:.2%} vs ours {chk['ours']['net']['annual_return']:.2%}; "
                  f"daily correlation {chk['daily_correlation']['gross']:.4f}", flush=True)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[backtest] wrote {args.out}/backtest.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
