"""Is the risk model fit? Bias statistics of the predicted covariance, and factor recovery.

FactorVAE predicts, per day, a covariance of the stocks' returns (label units)

    Σ = β diag(σ_z²) βᵀ + diag(σ_α²)        β (N, K), σ_z (K,) from the prior, σ_α (N,)

Bias statistic (as risk-model vendors check theirs): for a portfolio w_t held on day t,
the standardised return b_t = w_tᵀ y_t / sqrt(w_tᵀ Σ_t w_t); the statistic is the standard
deviation of b_t over the segment's days. Near 1 the predicted risk is right; above 1 the model
under-predicts risk, below 1 it over-predicts it. Four kinds of portfolio:

    random          long-short w ~ N(0, 1) over the day's stocks (fixed seed), the mean of 16
    factor          factor-mimicking: w_k = β (βᵀβ)⁻¹ e_k, unit exposure to factor k, none to
                    the others (the mean over k)
    alpha           the alpha factor's portfolio w = u (below: the forecast ⊥ the factors)
    mean_variance   w = Σ⁻¹ μ for the model's own forecast μ (Woodbury, no N x N inverse)

Calibration (as risk vendors scale a model's factor and specific variances): K + 1 positive scalars
multiply the predicted variances, fit on ONE segment (the validation segment in ``fvae.train``), one
per learnt factor and one for the specific variance,

    Σ_c = β diag(c_z σ_z²) βᵀ + c_α · diag(σ_α²)        i.e. σ_z,k → √c_z,k σ_z,k,  σ_α → √c_α σ_α

A portfolio w's predicted variance splits into per-factor and specific parts, each linear in its scalar,

    wᵀ Σ_c w = Σ_k c_z,k f_k + c_α s,    f_k = σ_z,k² (βᵀw)_k²,   s = Σ_i σ_α,i² w_i²

so its standardised return is b_t(c) = r_t / √(Σ_k c_z,k f_k,t + c_α s_t) with r_t = w_tᵀ y_t. The fit
solves the K + 1 equations  B_factor,k(c) = 1 (the bias statistic of factor k's mimicking portfolio)
and  B_random(c) = 1  for x = (log c_z, log c_α): residuals log B(eˣ), bounded least squares (scipy's
trust-region reflective), c clipped to CALIBRATION_RANGE and reported as ``clipped`` when a bound binds.
Factor k's mimicking portfolio carries mostly factor k's risk and random portfolios mostly specific
risk, so the equations pin down the scalars; one scalar for all factors is not enough, because a
mean-variance portfolio leans on the factors whose variance is predicted smallest, and those are the
ones most under-predicted (S&P 500: one c_z leaves the factor portfolios' biases between 0.3 and
1.5). On the fit segment the calibrated random and factor statistics are then 1 by construction, and
another segment (test) is the out-of-sample check. The mean-variance portfolio Σ_c⁻¹μ changes with c
and is only checked, never fitted.

Residual factors (the "missing factors" a risk vendor adds to a model whose factors do not explain
every co-movement). A mean-variance portfolio hedges the K learnt factors and then loads on
whatever else moves stocks together (sectors, say); a diagonal σ_α² cannot see that, so its risk is
under-predicted however c is set (≈ 2× on the S&P 500, README). Σ_c therefore carries P statistical
factors of the learnt model's residuals as well,

    Σ_c = c_z · β diag(σ_z²) βᵀ + L_t diag(λ_t) L_tᵀ + c_α · diag(σ_α²)

with L_t (N, P), λ_t (P,) the top P principal components of the residuals e_s = y_s − β_s ẑ_s of the
``window`` days s ≤ t − lag (ẑ_s the day's cross-sectional least squares of the label on the learnt
β; lag = the label's horizon, so only labels already realised on day t are used). The residuals
are orthogonal to the day's β, so L carries what β misses; λ is measured, not scaled, and c_α, fit
with it in place, takes back the specific variance that L now explains. The first lag + min_days − 1
days of a segment have too little history and get no residual factors.

Alpha factor (Saxena and Stubbs' alpha alignment factor, its variance measured). A mean-variance
portfolio leans on the forecast's own direction, and stocks that a forecast built from past prices
ranks alike also move alike beyond β and a trailing window of residuals (S&P 500: the forecast's
own portfolio carries 1.5-1.8x its predicted risk). So Σ_c carries one more factor per day,

    u_t = μ_t ⊥ [β_t | L_t], ‖u_t‖ = 1,   variance c_μ s̄_t,   s̄_t the day's mean of c_α σ_α²

with c_μ fit with c_z and c_α (K + 2 equations) so that the bias statistic of the alpha portfolio
w = u is 1 on the fit segment; "alpha" is then a fourth kind of portfolio, and the mean-variance
portfolio, still only checked, is Σ_c⁻¹μ with u in Σ_c.

Factor recovery on a synthetic market (which plants β and z): canonical correlations between a
model's factor series and the true z_t, and the R² of the true β regressed on the learnt β, both
after removing each day's cross-sectional mean (the rank-normalised label has none).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RANDOM_PORTFOLIOS = 16
RESIDUAL_FACTORS = 10  # P: principal components of the residuals (about the number of GICS sectors)
RESIDUAL_WINDOW = 120  # trading days of residuals behind each day's components
ACTIVE_KL = 0.01  # nats per day: a factor whose mean KL(q ‖ p) is below this carries no information


def risk_matvec(w: np.ndarray, beta: np.ndarray, var_z: np.ndarray, var_a: np.ndarray) -> np.ndarray:
    """Σ w with Σ = β diag(σ_z²) βᵀ + diag(σ_α²), never forming the n × n matrix: w (n,) or (n, P) → same shape."""
    col = (slice(None),) + (None,) * (w.ndim - 1)  # var_z (K,) and var_a (n,) broadcast over w's columns
    return beta @ (var_z[col] * (beta.T @ w)) + var_a[col] * w


def predicted_var(w: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray, sigma_alpha: np.ndarray) -> np.ndarray:
    """wᵀ Σ w for portfolios w (P, N) → (P,)."""
    return (w.T * risk_matvec(w.T, beta, sigma_z**2, sigma_alpha**2)).sum(0)


def mean_variance(mu: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray, sigma_alpha: np.ndarray) -> np.ndarray:
    """Σ⁻¹ μ by Woodbury: D⁻¹μ − D⁻¹β (S⁻¹ + βᵀD⁻¹β)⁻¹ βᵀD⁻¹μ with D = diag σ_α², S = diag σ_z²."""
    dinv = 1.0 / sigma_alpha**2  # (N,)
    a = dinv * mu
    inner = np.diag(1.0 / np.maximum(sigma_z**2, 1e-30)) + (beta * dinv[:, None]).T @ beta  # (K, K)
    return a - dinv * (beta @ np.linalg.solve(inner, beta.T @ a))


def residual_factors(*, y: np.ndarray, valid: np.ndarray, beta: np.ndarray, lag: int,
                     num: int = RESIDUAL_FACTORS, window: int = RESIDUAL_WINDOW,
                     min_days: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The residual factors of every day (module docstring): y, valid (D, N), beta (D, N, K) →
    L (D, N, P) with unit-norm columns and λ (D, P), the components' variances per day (label units²).
    Day t uses the residuals of days max(0, t − lag − window + 1) … t − lag; with fewer than
    ``min_days`` of them (default window // 4) its L and λ are 0. Stocks missing on a day count as
    a residual of 0 there."""
    if lag < 1 or num < 1 or window < 2:
        raise ValueError(f"residual_factors: expected lag >= 1, num >= 1 and window >= 2, got {lag}, {num}, {window}")
    min_days = max(2, window // 4 if min_days is None else min_days)
    D, N = y.shape
    resid = np.zeros((D, N))
    for d in range(D):
        v = valid[d]
        if v.sum() > beta.shape[-1]:
            b, yd = beta[d, v].astype(np.float64), y[d, v].astype(np.float64)
            resid[d, v] = yd - b @ np.linalg.lstsq(b, yd, rcond=None)[0]
    P = min(num, N)
    L, lam = np.zeros((D, N, P)), np.zeros((D, P))
    for t in range(D):
        hi = t - lag + 1  # rows [lo, hi): the realised labels
        lo = max(0, hi - window)
        if hi - lo < min_days:
            continue
        _, sv, vt = np.linalg.svd(resid[lo:hi], full_matrices=False)  # (W, N) = U S Vᵀ
        p = min(P, sv.size)
        L[t, :, :p], lam[t, :p] = vt[:p].T, sv[:p] ** 2 / (hi - lo)
    return L, lam


def alpha_loadings(mu: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """The alpha factor's loadings u (n,) of one day: the forecast μ (n,) orthogonal to the day's factor
    loadings ``factors`` (n, F) (β and the residual factors' L), scaled to ‖u‖ = 1; 0 when μ is in
    their span."""
    u = mu - factors @ np.linalg.lstsq(factors, mu, rcond=None)[0] if factors.shape[1] else mu.copy()
    norm = np.linalg.norm(u)
    return u / norm if norm > 1e-12 * max(1.0, float(np.linalg.norm(mu))) else np.zeros_like(u)


def alpha_factor(*, mu: np.ndarray, valid: np.ndarray, beta: np.ndarray,
                 residual: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """u (D, N): every day's alpha factor loadings (``alpha_loadings``; 0 off the day's stocks and on
    days with K + 2 stocks or fewer), as the prediction files carry them (``alpha_u``)."""
    u = np.zeros(mu.shape)
    for d in range(mu.shape[0]):
        v = valid[d]
        if int(v.sum()) <= beta.shape[-1] + 2:
            continue
        u[d, v] = alpha_loadings(mu[d, v].astype(np.float64), _day_factors(beta, residual, d, v))
    return u


def _day_factors(beta: np.ndarray, residual: tuple[np.ndarray, np.ndarray] | None, d: int,
                 v: np.ndarray) -> np.ndarray:
    """[β | L] (n, K + P') of day d's stocks v: the learnt factors and the day's residual factors with λ > 0."""
    b = beta[d, v].astype(np.float64)
    if residual is None:
        return b
    lv = residual[1][d] > 0
    return np.concatenate([b, residual[0][d, v][:, lv].astype(np.float64)], 1)


def _portfolio_parts(*, y: np.ndarray, valid: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray,
                     sigma_alpha: np.ndarray, seed: int, mu: np.ndarray | None = None,
                     residual: tuple[np.ndarray, np.ndarray] | None = None,
                     with_mean_variance: bool = True, c_mu: float = 0.0) -> dict[str, tuple[np.ndarray, ...]]:
    """Per kind of portfolio ("random": 16 of them, "factor": K; with ``mu`` "alpha": 1, the alpha
    factor's own portfolio u, and "mean_variance": 1 unless ``with_mean_variance`` is False), the parts
    (r, f, s, g, h) of every usable day: r = wᵀy (days, P), f (days, P, K) the learnt factors' parts of
    wᵀΣw, σ_z,k² (βᵀw)_k², s (days, P) the specific part, g (days, P) the residual factors'
    ‖diag(√λ) Lᵀw‖² (0 without ``residual``, (L, λ) of ``residual_factors``) and h (days, P) the alpha
    factor's s̄ (uᵀw)², s̄ the day's mean σ_α² (0 without ``mu``). The mean-variance portfolio is
    Σ⁻¹μ of the Σ with the alpha factor's variance c_μ s̄ in it. Shapes as in ``bias_statistics``; the
    random portfolios are the same for the same seed and valid mask, whatever σ."""
    rng = np.random.default_rng(seed)
    K = beta.shape[-1]
    rows: dict[str, list[tuple[np.ndarray, ...]]] = {"random": [], "factor": [], "alpha": [], "mean_variance": []}
    for d in range(y.shape[0]):
        v = valid[d]
        n = int(v.sum())
        if n <= K + 2:
            continue
        yd, b = y[d, v].astype(np.float64), beta[d, v].astype(np.float64)
        sa, sz = sigma_alpha[d, v].astype(np.float64), sigma_z[d].astype(np.float64)
        ports = {"random": rng.standard_normal((RANDOM_PORTFOLIOS, n))}
        try:
            ports["factor"] = np.linalg.solve(b.T @ b, b.T)  # (K, n): row k = β (βᵀβ)⁻¹ e_k
        except np.linalg.LinAlgError:
            pass
        lv = residual[1][d] > 0 if residual is not None else np.zeros(0, bool)
        ld, sl = (residual[0][d, v][:, lv], np.sqrt(residual[1][d, lv])) if lv.any() else (np.zeros((n, 0)), np.zeros(0))
        u, sbar = np.zeros(n), float(np.mean(sa**2))
        if mu is not None:
            md = mu[d, v].astype(np.float64)
            u = alpha_loadings(md, np.concatenate([b, ld], 1))
            ports["alpha"] = u[None]
            if with_mean_variance:  # Σ⁻¹μ on the whole Σ: the residual and alpha factors are factors too
                ports["mean_variance"] = mean_variance(md, np.concatenate([b, ld, u[:, None]], 1),
                                                       np.concatenate([sz, sl, [math.sqrt(c_mu * sbar)]]), sa)[None]
        for name, w in ports.items():  # w (P, n)
            rows[name].append((w @ yd, ((w @ b) * sz) ** 2, (w**2 * sa**2).sum(1), (((w @ ld) * sl) ** 2).sum(1),
                               sbar * (w @ u) ** 2))
    return {name: tuple(np.stack(part) for part in zip(*r)) for name, r in rows.items() if r}


def _bias_each(parts: tuple[np.ndarray, ...], c_z: np.ndarray | float = 1.0, c_alpha: float = 1.0,
               c_mu: float = 0.0) -> np.ndarray:
    """The bias statistic of each of the P portfolios of ``parts`` under c_z (K,) or scalar, c_α and c_μ:
    the std over days of r / √(Σ_k c_z,k f_k + g + c_α s + c_μ h); NaN with fewer than 3 days."""
    r, f, s, g, h = parts
    if r.shape[0] < 3:
        return np.full(r.shape[1], np.nan)
    b = r / np.sqrt(np.maximum((f * c_z).sum(-1) + g + c_alpha * s + c_mu * h, 1e-30))
    return b.std(axis=0, ddof=1)


def _bias(parts: tuple[np.ndarray, ...], c_z: np.ndarray | float = 1.0, c_alpha: float = 1.0,
          c_mu: float = 0.0) -> float:
    """The bias statistic of a kind of portfolio: the mean of ``_bias_each`` over its portfolios."""
    return float(np.mean(_bias_each(parts, c_z, c_alpha, c_mu)))


def bias_statistics(*, y: np.ndarray, valid: np.ndarray, mu: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray,
                    sigma_alpha: np.ndarray, seed: int = 0,
                    residual: tuple[np.ndarray, np.ndarray] | None = None, c_mu: float = 0.0) -> dict[str, float]:
    """Bias statistics over a segment: y, mu, sigma_alpha (D, N), valid (D, N), beta (D, N, K), sigma_z (D, K);
    ``residual``: (L, λ) of ``residual_factors``, in Σ as they are; ``c_mu``: the alpha factor's
    variance in Σ, c_μ s̄ (0: no alpha factor, the raw model).

    Returns {"random", "factor", "alpha", "mean_variance"} (each the std over days of the standardised
    portfolio return; NaN with fewer than 3 usable days) and "days".
    """
    parts = _portfolio_parts(y=y, valid=valid, beta=beta, sigma_z=sigma_z, sigma_alpha=sigma_alpha, seed=seed,
                             mu=mu, residual=residual, c_mu=c_mu)
    out = {name: _bias(parts[name], c_mu=c_mu) if name in parts else float("nan")
           for name in ("random", "factor", "alpha", "mean_variance")}
    out["days"] = int(parts["random"][0].shape[0]) if "random" in parts else 0
    return out


CALIBRATION_RANGE = (1e-4, 1e4)  # bounds on c_z and c_α: beyond them the raw model is not worth scaling


def calibrate_risk(*, y: np.ndarray, valid: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray,
                   sigma_alpha: np.ndarray, seed: int = 0, mu: np.ndarray | None = None,
                   residual: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Fit c_z (factor variance) and c_α (specific variance) so that the random and factor-mimicking
    bias statistics of this segment are 1 (module docstring), with the residual factors ``residual``
    (L, λ) in Σ unscaled when given; with the forecast ``mu`` also c_μ, the alpha factor's variance
    c_μ s̄ (s̄ the day's mean calibrated σ_α²), so that the alpha portfolio's bias is 1. Shapes as in
    ``bias_statistics``.

    Returns {"c_z", "c_alpha", "c_mu" (with ``mu``), "days", "clipped" (a bound of CALIBRATION_RANGE
    binds c_z or c_α), "residual" (max |log B| left at the fit)}. Raises ValueError when the segment
    has fewer than 3 usable days.
    """
    # imported here: importing fvae.risk stays cheap
    from scipy.optimize import least_squares

    parts = _portfolio_parts(y=y, valid=valid, beta=beta, sigma_z=sigma_z, sigma_alpha=sigma_alpha, seed=seed,
                             mu=mu, residual=residual, with_mean_variance=False)
    K = beta.shape[-1]
    if "factor" not in parts or parts["random"][0].shape[0] < 3 or parts["factor"][0].shape[0] < 3:
        raise ValueError(f"calibrate_risk: needs at least 3 usable days (more than K + 2 = {K + 2} "
                         "stocks each) with random and factor-mimicking portfolios")
    rand, fact, alpha = parts["random"], parts["factor"], parts.get("alpha")
    J = K + 1 + (alpha is not None)  # unknowns: log c_z (K), log c_α and log c_μ with an alpha factor

    def residual_fn(x: np.ndarray) -> np.ndarray:  # log B(e^x) of the factor, random (and alpha) portfolios: 0 at the fit
        c = np.exp(x)
        # s̄ of h is the raw σ_α²'s mean, so c_α c_μ h is the alpha factor's variance c_μ × the calibrated s̄
        cm = c[K] * c[K + 1] if alpha is not None else 0.0
        b = np.append(_bias_each(fact, c[:K], c[K], cm), _bias(rand, c[:K], c[K], cm))
        return np.log(b if alpha is None else np.append(b, _bias(alpha, c[:K], c[K], cm)))

    lo, hi = (math.log(b) for b in CALIBRATION_RANGE)
    fit = least_squares(residual_fn, np.zeros(J), bounds=(np.full(J, lo), np.full(J, hi)), method="trf",
                        x_scale=1.0, xtol=1e-12, ftol=1e-12, gtol=1e-12)
    c = np.exp(fit.x)
    # c_μ at its lower bound is an answer (the alpha portfolio's risk is already explained), not a failure
    clipped = bool(np.any(np.isclose(fit.x[:K + 1], lo, atol=1e-6) | np.isclose(fit.x[:K + 1], hi, atol=1e-6)))
    out: dict[str, Any] = {"c_z": [float(v) for v in c[:K]], "c_alpha": float(c[K])}
    if alpha is not None:
        out["c_mu"] = float(c[K + 1])
    return {**out, "days": int(rand[0].shape[0]), "clipped": clipped,
            "residual": float(np.max(np.abs(residual_fn(fit.x))))}


def apply_calibration(*, sigma_z: np.ndarray, sigma_alpha: np.ndarray, c_z: float | list[float],
                      c_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The calibrated (σ_z, σ_α) = (√c_z σ_z, √c_α σ_α): sigma_z (..., K) with c_z one scalar per factor
    (K,) or one for all (a calibration written before per-factor scalars), sigma_alpha any shape;
    β diag(σ_z²) βᵀ + diag(σ_α²) on them is Σ_c."""
    cz = np.atleast_1d(np.asarray(c_z, np.float64))
    if not (np.all(cz > 0) and np.all(np.isfinite(cz)) and c_alpha > 0 and math.isfinite(c_alpha)) \
            or cz.ndim != 1 or cz.size not in (1, sigma_z.shape[-1]):
        raise ValueError(f"risk calibration: expected positive finite c_z (one, or one per each of the "
                         f"{sigma_z.shape[-1]} factors) and c_alpha, got {c_z}, {c_alpha}")
    return sigma_z * np.sqrt(cz), sigma_alpha * math.sqrt(c_alpha)


def _demean(x: np.ndarray) -> np.ndarray:
    return x - x.mean(0, keepdims=True)


def canonical_correlations(a: np.ndarray, b: np.ndarray, *, ridge: float = 1e-8) -> np.ndarray:
    """Canonical correlations of two series a (D, P) and b (D, Q), largest first: min(P, Q) values in [0, 1]."""
    a, b = _demean(np.asarray(a, np.float64)), _demean(np.asarray(b, np.float64))

    def whiten(x: np.ndarray) -> np.ndarray:
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        return u[:, s > ridge * max(s.max(), 1e-300)]

    return np.clip(np.linalg.svd(whiten(a).T @ whiten(b), compute_uv=False), 0.0, 1.0)[: min(a.shape[1], b.shape[1])]


def oracle_factors(label: np.ndarray, valid: np.ndarray, beta_true: np.ndarray) -> np.ndarray:
    """The factor returns an oracle that knows the true β gets from the label: per day, OLS of the
    cross-sectionally demeaned label on the demeaned true β. label (D, N), beta_true (D, N, K) → (D, K)."""
    D, _, K = beta_true.shape
    out = np.full((D, K), np.nan)
    for d in range(D):
        v = valid[d]
        if v.sum() <= K + 1:
            continue
        b = _demean(beta_true[d, v].astype(np.float64))
        y = label[d, v].astype(np.float64)
        out[d] = np.linalg.lstsq(b, y - y.mean(), rcond=None)[0]
    return out


def beta_span_r2(beta_true: np.ndarray, beta: np.ndarray, valid: np.ndarray) -> float:
    """R² of the true β regressed on the learnt β with one linear map for every stock-day (both
    cross-sectionally demeaned per day), averaged over the true factors. beta_true (D, N, Kt),
    beta (D, N, K), valid (D, N)."""
    K, Kt = beta.shape[-1], beta_true.shape[-1]
    mm, mt, tt = np.zeros((K, K)), np.zeros((K, Kt)), np.zeros(Kt)
    for d in range(beta_true.shape[0]):
        v = valid[d]
        if v.sum() < 2:
            continue
        t, m = _demean(beta_true[d, v].astype(np.float64)), _demean(beta[d, v].astype(np.float64))
        mm += m.T @ m
        mt += m.T @ t
        tt += (t**2).sum(0)
    coef = np.linalg.lstsq(mm, mt, rcond=None)[0]  # (K, Kt)
    explained = np.einsum("kj,kl,lj->j", coef, mm, coef)  # per true factor: ‖m coef‖²
    return float(np.mean(explained / np.maximum(tt, 1e-30)))
