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

Factor recovery on a synthetic market (which plants β and z): canonical correlations between a
model's factor series and the true z_t, and the R² of the true β regressed on the learnt β, both
after removing each day's cross-sectional mean (the rank-normalised label has none).
"""

from __future__ import annotations

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


def bias_statistics(*, y: np.ndarray, valid: np.ndarray, mu: np.ndarray, beta: np.ndarray, sigma_z: np.ndarray,
                    sigma_alpha: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Bias statistics over a segment: y, mu, sigma_alpha (D, N), valid (D, N), beta (D, N, K), sigma_z (D, K).

    Returns {"random", "factor", "mean_variance"} (each the std over days of the standardised
    portfolio return; NaN with fewer than 3 usable days) and "days".
    """
    rng = np.random.default_rng(seed)
    K = beta.shape[-1]
    z: dict[str, list[np.ndarray]] = {"random": [], "factor": [], "mean_variance": []}
    for d in range(y.shape[0]):
        v = valid[d]
        n = int(v.sum())
        if n <= K + 2:
            continue
        yd, b, sa, sz = y[d, v].astype(np.float64), beta[d, v].astype(np.float64), sigma_alpha[d, v], sigma_z[d]
        sa, sz = sa.astype(np.float64), sz.astype(np.float64)
        ports = {"random": rng.standard_normal((RANDOM_PORTFOLIOS, n))}
        try:
            ports["factor"] = np.linalg.solve(b.T @ b, b.T)  # (K, n): row k = β (βᵀβ)⁻¹ e_k
        except np.linalg.LinAlgError:
            pass
        ports["mean_variance"] = mean_variance(mu[d, v].astype(np.float64), b, sz, sa)[None]
        for name, w in ports.items():
            var = predicted_var(w, b, sz, sa)
            z[name].append((w @ yd) / np.sqrt(np.maximum(var, 1e-30)))  # (P,)
    out: dict[str, float] = {}
    for name, rows in z.items():
        if len(rows) < 3:
            out[name] = float("nan")
            continue
        arr = np.stack(rows)  # (days, P)
        out[name] = float(np.mean(arr.std(axis=0, ddof=1)))
    out["days"] = len(z["random"])
    return out


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
