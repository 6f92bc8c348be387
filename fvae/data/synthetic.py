"""A synthetic market with a planted, known signal: the embedded default dataset.

Returns follow a dynamic factor model, the one FactorVAE assumes:

    y_{i,t} = α_{i,t} + β_{i,t} · z_t + ε_{i,t},   z_t ~ N(μ_z, diag σ_z²),  ε ~ N(0, σ_ε²)

where y_{i,t} is stock i's return from day t to t+1, known only after t. The
exposures β and the alpha α depend on each stock's own recent history, so they
can be learnt from the features observed up to day t:

    s_{i,t}  latent characteristics, AR(1) with persistence φ                 (C-1 channels)
    x_{i,t}  = [s_{i,t} + observation noise, y_{i,t-1}]                      (C channels, observed)
    m_{i,t}  = mean of x_{i,t-L+1..t}[:C-1]                                   (what the model must infer)
    β_{i,t}  = b + m_{i,t} W_β                                                (K)
    α_{i,t}  = a (0.3 tanh(m_{i,t} w_α) + 2 m_{i,t,0} m_{i,t,1})              (mostly an interaction:
                                                                              a linear model misses it)

The expected return μ_{i,t} = α_{i,t} + β_{i,t} μ_z is the best any model can
predict. Its mean daily Rank IC against the realised return is recorded per
segment in meta.json as ``ceiling_rank_ic``: the figure a learnt model is judged
against. The noise σ_ε keeps that ceiling low (about 0.15), as in real markets.

Stocks enter and leave the cross-section: a share of them list late or delist
early, so days have different N. Everything is a function of the seed.

``days`` is the length of the three segments; T−1 more days are drawn before them
and written as history, so the first training day's window is complete.
The truth is written with the shards: ``beta_true_k`` columns (β per stock-day) in
the shards, and ``truth.parquet`` (datetime, z_true_k: the realised factor returns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import lfilter
from scipy.stats import rankdata

from fvae.data.process import cs_rank_norm, process_features
from fvae.data.shards import TRUTH_FILE, Meta, write_shards
from fvae.io import atomic_to_parquet


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    stocks: int = 300
    days: int = 1000
    seed: int = 0
    factors: int = 3  # K true factors
    channels: int = 6  # C observed features per day (the last is the previous return)
    lookback: int = 20  # T, the window the loader builds; the signal needs L <= T days
    smooth: int = 10  # L, days averaged into m_{i,t}
    persistence: float = 0.95  # φ of the latent characteristics
    obs_noise: float = 1.0  # observation noise on the characteristics
    snr: float = 1.0  # scales α and μ_z; 1.0 gives a ceiling Rank IC near 0.15
    churn: float = 0.3  # share of stocks that enter late or leave early
    split: tuple[float, float] = (0.6, 0.2)  # train and valid shares of the days; test gets the rest
    start: str = "2010-01-04"

    def __post_init__(self) -> None:
        if self.stocks < 2:
            raise ValueError(f"stocks: expected at least 2, got {self.stocks}")
        if self.smooth < 1:
            raise ValueError(f"smooth: expected >= 1, got {self.smooth}")
        if self.lookback < self.smooth:
            raise ValueError(f"lookback: expected at least {self.smooth} (the days the planted signal averages), "
                             f"got {self.lookback}")
        if self.days < 3 * self.lookback:
            raise ValueError(f"days: expected at least 3 x lookback ({self.lookback}) = {3 * self.lookback}, "
                             f"got {self.days}")
        if self.factors < 1:
            raise ValueError(f"factors: expected >= 1, got {self.factors}")
        if self.channels < 3:
            raise ValueError(f"channels: expected >= 3, got {self.channels}")
        if not (math.isfinite(self.snr) and self.snr >= 0):
            raise ValueError(f"snr: expected a finite number >= 0, got {self.snr}")
        if not 0.0 <= self.churn < 1.0:
            raise ValueError(f"churn: expected 0 <= churn < 1, got {self.churn}")


def _rank_ic_by_day(pred: np.ndarray, y: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Spearman correlation per day (row) over valid entries; (D,) with NaN where undefined."""
    out = np.full(pred.shape[0], np.nan)
    for d in range(pred.shape[0]):
        v = valid[d]
        if v.sum() < 3:
            continue
        a, b = rankdata(pred[d, v]), rankdata(y[d, v])
        out[d] = np.corrcoef(a, b)[0, 1]
    return out


def generate(cfg: SyntheticConfig) -> tuple[pd.DataFrame, dict]:
    """Draw the panel. Returns (rows, truth) where rows has one row per active stock-day."""
    rng = np.random.default_rng(cfg.seed)
    D, N, K, C, L = cfg.days + cfg.lookback - 1, cfg.stocks, cfg.factors, cfg.channels, cfg.smooth
    Cs = C - 1  # characteristic channels; the last channel is the previous return

    # latent characteristics: AR(1) per stock and channel, stationary with unit variance
    c = np.sqrt(1 - cfg.persistence**2)
    eta = rng.standard_normal((D, N, Cs))
    eta[0] /= c  # so that s_0 = eta_0 starts in the stationary distribution
    s = lfilter([c], [1.0, -cfg.persistence], eta, axis=0)  # s_t = φ s_{t-1} + c η_t
    obs = s + cfg.obs_noise * rng.standard_normal((D, N, Cs))  # (D, N, Cs)

    # m_{i,t}: trailing mean of the observed characteristics over L days
    csum = np.cumsum(obs, axis=0)
    m = csum.copy()
    m[L:] = csum[L:] - csum[:-L]
    m /= np.minimum(np.arange(1, D + 1), L)[:, None, None]

    W_beta = rng.standard_normal((Cs, K)) * 0.3  # (Cs, K)
    b_beta = np.concatenate([[1.0], np.zeros(K - 1)])  # factor 0 is the market
    beta = b_beta + m @ W_beta  # (D, N, K)
    w_alpha = rng.standard_normal(Cs) / np.sqrt(Cs)
    a = 0.0025 * cfg.snr
    alpha = a * (0.3 * np.tanh(m @ w_alpha) + 2.0 * m[..., 0] * m[..., 1])  # (D, N)

    sigma_z = np.array([0.010] + [0.005] * (K - 1))
    mu_z = cfg.snr * np.array([0.0008] + [0.001 * (-1) ** k for k in range(1, K)])
    z = mu_z + sigma_z * rng.standard_normal((D, K))  # (D, K)
    sigma_eps = 0.02
    mu_true = alpha + beta @ mu_z  # (D, N) expected return
    y = alpha + np.einsum("dnk,dk->dn", beta, z) + sigma_eps * rng.standard_normal((D, N))

    prev = np.vstack([np.zeros((1, N)), y[:-1]])  # y_{t-1}, known on day t
    x = np.concatenate([obs, prev[..., None] / sigma_eps], axis=-1).astype(np.float32)  # (D, N, C)

    # listing windows: some stocks enter late, some leave early
    first = np.zeros(N, dtype=int)
    last = np.full(N, D - 1)
    churn = rng.random(N) < cfg.churn
    enters = churn & (rng.random(N) < 0.5)
    leaves = churn & ~enters
    first[enters] = rng.integers(cfg.lookback, int(D * 0.7), enters.sum())
    last[leaves] = rng.integers(int(D * 0.3), D - cfg.lookback, leaves.sum())
    day = np.arange(D)[:, None]
    active = (day >= first) & (day <= last)  # (D, N)

    dates = pd.bdate_range(cfg.start, periods=D)
    names = np.array([f"SYN{i:04d}" for i in range(N)])
    dd, nn = np.nonzero(active)
    feature_names = [f"F{c}" for c in range(C)]
    df = pd.DataFrame({"datetime": dates[dd], "instrument": names[nn]})
    feats = pd.DataFrame(x[dd, nn].astype(np.float64), columns=feature_names)
    df = pd.concat([df, feats], axis=1)
    df["ret"] = y[dd, nn]
    df["mu_true"] = mu_true[dd, nn]
    for k in range(K):
        df[f"beta_true_{k}"] = beta[dd, nn, k].astype(np.float32)
    truth = {"dates": dates, "active": active, "mu_true": mu_true, "y": y, "z": z, "beta": beta}
    return df, truth


def segments_for(cfg: SyntheticConfig, dates: pd.DatetimeIndex) -> dict[str, list[str]]:
    """Train, valid and test over the last ``cfg.days`` of ``dates`` (the T−1 before are history)."""
    dates = dates[len(dates) - cfg.days:]
    D = len(dates)
    n_train = int(D * cfg.split[0])
    n_valid = int(D * cfg.split[1])
    cut = [0, n_train, n_train + n_valid, D]
    names = ("train", "valid", "test")
    return {n: [dates[cut[i]].strftime("%Y-%m-%d"), dates[cut[i + 1] - 1].strftime("%Y-%m-%d")]
            for i, n in enumerate(names)}


def write_synthetic(out: str | Path, cfg: SyntheticConfig) -> Meta:
    """Generate the market, process it like real data and write shards + meta.json."""
    df, truth = generate(cfg)
    dates = truth["dates"]
    segments = segments_for(cfg, dates)
    feature_names = [f"F{c}" for c in range(cfg.channels)]

    train_start, train_end = (pd.Timestamp(t) for t in segments["train"])
    in_train = (df["datetime"] >= train_start) & (df["datetime"] <= train_end)
    norm = process_features(df, feature_names, in_train.to_numpy())
    df["label"] = cs_rank_norm(df["ret"], df["datetime"])

    ic = _rank_ic_by_day(truth["mu_true"], truth["y"], truth["active"])
    ceiling = {}
    for name, (a, b) in segments.items():
        sel = (dates >= pd.Timestamp(a)) & (dates <= pd.Timestamp(b))
        ceiling[name] = round(float(np.nanmean(ic[sel])), 6)

    meta = Meta(source="synthetic", handler="synthetic", market="synthetic", layout="daily",
                lookback=cfg.lookback, channels=cfg.channels, feature_names=feature_names,
                label_expr="y_{t} = alpha + beta z + eps (return from day t to t+1)",
                segments=segments, norm=norm,
                extra={"ceiling_rank_ic": ceiling,
                       "generator": {k: (list(v) if isinstance(v, tuple) else v)
                                     for k, v in cfg.__dict__.items()}})
    z = pd.DataFrame(truth["z"], columns=[f"z_true_{k}" for k in range(cfg.factors)])
    z.insert(0, "datetime", dates)
    atomic_to_parquet(Path(out) / TRUTH_FILE, z)  # before meta.json, which completes the folder
    return write_shards(out, df, meta)
