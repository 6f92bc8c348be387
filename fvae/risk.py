"""Is the risk model fit? Bias statistics of the predicted covariance, and factor recovery.

FactorVAE predicts, per day, a covariance of the stocks' returns (label units)

    Σ = β diag(σ_z²) βᵀ + diag(σ_α²)        β (N, K), σ_z (K,) from the prior, σ_α (N,)

Bias statistic (as risk-model vendors check theirs): for a portfolio w_t held on day t,
the standardised return b_t = w_tᵀ y_t / sqrt(w_tᵀ Σ_t w_t); the statistic is the standard
deviation of b_t over the segment's days. Near 1 the predicted risk is right; above 1 the model
under-predicts risk, below 1 it over-predicts it. Three kinds of portfolio:

    random          long-short w ~ N(0, 1) over the day's stocks (fixed seed), the mean of 16
    factor          factor-mimicking: w_k = β (βᵀβ)⁻¹ e_k, unit exposure to factor k, none to
                    the others (the mean over k)
    mean_variance   w = Σ⁻¹ μ for the model's own forecast μ (Woodbury, no N x N inverse)

Calibration (as risk vendors scale a model's factor and specific variances): two positive scalars
multiply the predicted variances, fit on ONE segment (the validation segment in ``fvae.train``),

    Σ_c = c_z · β diag(σ_z²) βᵀ + c_α · diag(σ_α²)        i.e. σ_z → √c_z σ_z,  σ_α → √c_α σ_α

A portfolio w's predicted variance splits into a factor and a specific part, each linear in its scalar,

    wᵀ Σ_c w = c_z f + c_α s,    f = ‖diag(σ_z) βᵀ w‖²,   s = Σ_i σ_α,i² w_i²

so its standardised return is b_t(c) = r_t / √(c_z f_t + c_α s_t) with r_t = w_tᵀ y_t. The fit solves the
two equations  B_random(c) = 1  and  B_factor(c) = 1  (B the bias statistic above, on the same
portfolios) for x = (log c_z, log c_α): residuals log B_kind(eˣ), bounded least squares (scipy's
trust-region reflective), c clipped to CALIBRATION_RANGE and reported as ``clipped`` when a bound binds.
Random portfolios carry mostly specific risk and factor-mimicking ones mostly factor risk, so the two
equations pin down the two scalars; on the fit segment the calibrated random and factor statistics
are then 1 by construction, and another segment (test) is the out-of-sample check. The
mean-variance portfolio Σ_c⁻¹μ changes with c and is only checked, never fitted.

Factor recovery on a synthetic market (which plants β and z): canonical correlations between a
model's factor series and the true z_t, and the R² of the true β regressed on the learnt β, both
after removing each day's cross-sectional mean (the rank-normalised label has none).
"""

from __future__ import annotations

import math

import numpy as np

RANDOM_PORTFOLIOS = 16
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


def _portfolio_parts(*, y: np.ndarray, valid: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray,
                     sigma_alpha: np.ndarray, seed: int, mu: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per kind of portfolio, the stacked (r, f, s) of every usable day: {"random": (3, days, 16),
    "factor": (3, days, K), "mean_variance": (3, days, 1) when ``mu`` is given}; r = wᵀy, f and s the
    factor and specific parts of wᵀΣw. Shapes as in ``bias_statistics``; the random portfolios are
    the same for the same seed and valid mask, whatever σ."""
    rng = np.random.default_rng(seed)
    K = beta.shape[-1]
    rows: dict[str, list[np.ndarray]] = {"random": [], "factor": [], "mean_variance": []}
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
        if mu is not None:
            ports["mean_variance"] = mean_variance(mu[d, v].astype(np.float64), b, sz, sa)[None]
        for name, w in ports.items():  # w (P, n)
            f = (((w @ b) * sz) ** 2).sum(1)  # (P,) ‖diag(σ_z) βᵀw‖²
            rows[name].append(np.stack([w @ yd, f, (w**2 * sa**2).sum(1)]))  # (3, P)
    return {name: np.stack(r, 1) for name, r in rows.items() if r}


def _bias(parts: np.ndarray, c_z: float = 1.0, c_alpha: float = 1.0) -> float:
    """The bias statistic of (r, f, s) (3, days, P) under c_z, c_α: the mean over the P portfolios of
    the std over days of r / √(c_z f + c_α s); NaN with fewer than 3 days."""
    r, f, s = parts
    if r.shape[0] < 3:
        return float("nan")
    b = r / np.sqrt(np.maximum(c_z * f + c_alpha * s, 1e-30))
    return float(np.mean(b.std(axis=0, ddof=1)))


def bias_statistics(*, y: np.ndarray, valid: np.ndarray, mu: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray,
                    sigma_alpha: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Bias statistics over a segment: y, mu, sigma_alpha (D, N), valid (D, N), beta (D, N, K), sigma_z (D, K).

    Returns {"random", "factor", "mean_variance"} (each the std over days of the standardised
    portfolio return; NaN with fewer than 3 usable days) and "days".
    """
    parts = _portfolio_parts(y=y, valid=valid, beta=beta, sigma_z=sigma_z, sigma_alpha=sigma_alpha, seed=seed,
                             mu=mu)
    out = {name: _bias(parts[name]) if name in parts else float("nan")
           for name in ("random", "factor", "mean_variance")}
    out["days"] = int(parts["random"].shape[1]) if "random" in parts else 0
    return out


CALIBRATION_RANGE = (1e-4, 1e4)  # bounds on c_z and c_α: beyond them the raw model is not worth scaling


def calibrate_risk(*, y: np.ndarray, valid: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray,
                   sigma_alpha: np.ndarray, seed: int = 0) -> dict[str, float | int | bool]:
    """Fit c_z (factor variance) and c_α (specific variance) so that the random and factor-mimicking
    bias statistics of this segment are 1 (module docstring). Shapes as in ``bias_statistics``.

    Returns {"c_z", "c_alpha", "days", "clipped" (a bound of CALIBRATION_RANGE binds), "residual"
    (max |log B| left at the fit)}. Raises ValueError when the segment has fewer than 3 usable days.
    """
    # imported here: importing fvae.risk stays cheap
    from scipy.optimize import least_squares

    parts = _portfolio_parts(y=y, valid=valid, beta=beta, sigma_z=sigma_z, sigma_alpha=sigma_alpha, seed=seed)
    kinds = [parts[k] for k in ("random", "factor") if k in parts]
    if len(kinds) < 2 or min(p.shape[1] for p in kinds) < 3:
        raise ValueError(f"calibrate_risk: needs at least 3 usable days (more than K + 2 = {beta.shape[-1] + 2} "
                         "stocks each) with random and factor-mimicking portfolios")

    def residual(x: np.ndarray) -> np.ndarray:  # log B_kind(e^x): 0 at the fit
        return np.log([_bias(p, math.exp(x[0]), math.exp(x[1])) for p in kinds])

    lo, hi = (math.log(b) for b in CALIBRATION_RANGE)
    fit = least_squares(residual, np.zeros(2), bounds=([lo, lo], [hi, hi]), method="trf", x_scale=1.0,
                        xtol=1e-12, ftol=1e-12, gtol=1e-12)
    c_z, c_alpha = (float(math.exp(v)) for v in fit.x)
    clipped = bool(np.any(np.isclose(fit.x, lo, atol=1e-6) | np.isclose(fit.x, hi, atol=1e-6)))
    return {"c_z": c_z, "c_alpha": c_alpha, "days": int(kinds[0].shape[1]), "clipped": clipped,
            "residual": float(np.max(np.abs(residual(fit.x))))}


def apply_calibration(*, sigma_z: np.ndarray, sigma_alpha: np.ndarray, c_z: float,
                      c_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The calibrated (σ_z, σ_α) = (√c_z σ_z, √c_α σ_α), any shapes: β diag(σ_z²) βᵀ + diag(σ_α²) on
    them is Σ_c."""
    if not (c_z > 0 and c_alpha > 0 and math.isfinite(c_z) and math.isfinite(c_alpha)):
        raise ValueError(f"risk calibration: expected positive finite c_z and c_alpha, got {c_z}, {c_alpha}")
    return sigma_z * math.sqrt(c_z), sigma_alpha * math.sqrt(c_alpha)


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
