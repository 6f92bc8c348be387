"""The risk model's checks on known answers: bias statistics of a true covariance, canonical
correlations, the oracle's factor returns and the β span."""

from __future__ import annotations

import numpy as np
import pytest

from fvae import risk


def _planted(D=400, N=80, K=3, seed=0):
    rng = np.random.default_rng(seed)
    beta = rng.standard_normal((D, N, K))
    sigma_z = np.tile([0.8, 0.5, 0.3], (D, 1))[:, :K]
    sigma_alpha = np.exp(rng.uniform(-0.5, 0.5, (D, N)))
    z = sigma_z * rng.standard_normal((D, K))
    y = np.einsum("dnk,dk->dn", beta, z) + sigma_alpha * rng.standard_normal((D, N))
    mu = 0.1 * rng.standard_normal((D, N))  # a forecast; the returns have mean 0 given it
    return dict(y=y, valid=np.ones((D, N), bool), mu=mu, beta=beta, sigma_z=sigma_z, sigma_alpha=sigma_alpha), z


def test_bias_statistics_are_one_for_the_true_covariance_and_scale_with_it():
    m, _ = _planted()
    b = risk.bias_statistics(**m)
    assert b["days"] == 400
    for name in ("random", "factor", "mean_variance"):
        assert b[name] == pytest.approx(1.0, abs=0.1), (name, b)
    # predicting twice the volatility everywhere halves every statistic
    wide = risk.bias_statistics(**{**m, "sigma_z": 2 * m["sigma_z"], "sigma_alpha": 2 * m["sigma_alpha"]})
    for name in ("random", "factor", "mean_variance"):
        assert wide[name] == pytest.approx(b[name] / 2, rel=1e-6)
    # a risk model without the factors under-predicts the factor-mimicking portfolios' risk
    idio = risk.bias_statistics(**{**m, "sigma_z": 1e-6 * m["sigma_z"]})
    assert idio["factor"] > 3 and idio["random"] > 1.2


def test_mean_variance_solves_the_system():
    rng = np.random.default_rng(1)
    beta, sz, sa, mu = rng.standard_normal((30, 3)), np.array([0.5, 0.2, 0.1]), rng.uniform(0.5, 1, 30), \
        rng.standard_normal(30)
    cov = beta @ np.diag(sz**2) @ beta.T + np.diag(sa**2)
    np.testing.assert_allclose(risk.mean_variance(mu, beta, sz, sa), np.linalg.solve(cov, mu), rtol=1e-8)
    w = rng.standard_normal((4, 30))
    np.testing.assert_allclose(risk.predicted_var(w, beta, sz, sa), np.einsum("pi,ij,pj->p", w, cov, w))


def test_canonical_correlations_known_answers():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((500, 3))
    mix = z @ rng.standard_normal((3, 3)) + 5.0  # any invertible mix (and a shift) of the same factors
    np.testing.assert_allclose(risk.canonical_correlations(mix, z), 1.0, atol=1e-9)
    other = rng.standard_normal((500, 3))
    assert risk.canonical_correlations(other, z).max() < 0.2
    half = np.column_stack([z[:, 0], rng.standard_normal(500)])  # only one of the factors
    cc = risk.canonical_correlations(half, z)
    assert cc[0] == pytest.approx(1.0, abs=1e-9) and cc[1] < 0.2


def test_oracle_recovers_noiseless_factors_up_to_the_daily_mean():
    m, z = _planted(D=50, N=40)
    y = np.einsum("dnk,dk->dn", m["beta"], z)
    y = y - y.mean(1, keepdims=True)  # the label has no daily mean; the oracle demeans β the same way
    np.testing.assert_allclose(risk.oracle_factors(y, m["valid"], m["beta"]), z, atol=1e-9)


def test_beta_span_r2_is_one_for_a_rotation_and_low_for_noise():
    m, _ = _planted(D=40, N=60)
    rot = m["beta"] @ np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [3.0, 0.0, 1.0]])
    assert risk.beta_span_r2(m["beta"], rot, m["valid"]) == pytest.approx(1.0, abs=1e-9)
    noise = np.random.default_rng(3).standard_normal(m["beta"].shape)
    assert risk.beta_span_r2(m["beta"], noise, m["valid"]) < 0.05


def _risk_inputs(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "mu"}


def test_calibration_recovers_the_scale_of_a_misstated_covariance():
    """Returns from a known factor model; the predicted Σ states the three factor variances at 1/4, 1
    and 9 times the truth and the specific variance at 2x: calibration on the first 300 days finds
    c_z ≈ (4, 1, 1/9), c_α ≈ 1/2, and the calibrated Σ is right on the 100 days it never saw."""
    m, _ = _planted(D=400, N=80)
    bad = {**m, "sigma_z": m["sigma_z"] * np.array([0.5, 1.0, 3.0]), "sigma_alpha": m["sigma_alpha"] * np.sqrt(2)}
    fit = {k: v[:300] for k, v in bad.items()}
    held = {k: v[300:] for k, v in bad.items()}
    cal = risk.calibrate_risk(**_risk_inputs(fit))
    # sampling: 300 days of variances, each estimated to about ±sqrt(2/300) ≈ 8 %
    np.testing.assert_allclose(cal["c_z"], [4.0, 1.0, 1 / 9], rtol=0.2)
    assert cal["c_alpha"] == pytest.approx(0.5, rel=0.12), cal
    assert cal["days"] == 300 and not cal["clipped"] and cal["residual"] < 1e-8

    def calibrated(seg: dict) -> dict:
        sz, sa = risk.apply_calibration(sigma_z=seg["sigma_z"], sigma_alpha=seg["sigma_alpha"], c_z=cal["c_z"],
                                        c_alpha=cal["c_alpha"])
        return risk.bias_statistics(**{**seg, "sigma_z": sz, "sigma_alpha": sa})

    on_fit = calibrated(fit)  # the fitted statistics are 1 by construction
    assert on_fit["random"] == pytest.approx(1.0, abs=1e-9) and on_fit["factor"] == pytest.approx(1.0, abs=1e-9)
    raw, out = risk.bias_statistics(**held), calibrated(held)
    assert raw["random"] < 0.95 and raw["mean_variance"] < 0.85, raw
    raw_each = risk._bias_each(risk._portfolio_parts(**_risk_inputs(held), seed=0)["factor"])
    np.testing.assert_allclose(raw_each, [2.0, 1.0, 1 / 3], rtol=0.2)  # each factor's own misstatement
    for name in ("random", "factor", "mean_variance"):
        assert out[name] == pytest.approx(1.0, abs=0.12), (name, out)
    # one scalar for all factors cannot do this: it leaves factor portfolios' biases far apart
    one = risk.apply_calibration(sigma_z=held["sigma_z"], sigma_alpha=held["sigma_alpha"], c_z=float(np.mean(cal["c_z"])),
                                 c_alpha=cal["c_alpha"])
    parts = risk._portfolio_parts(**{**_risk_inputs(held), "sigma_z": one[0], "sigma_alpha": one[1]}, seed=0)
    each = risk._bias_each(parts["factor"])
    assert each.max() / each.min() > 3, each


def test_calibration_of_a_correct_covariance_is_one_and_bounds_are_reported():
    m, _ = _planted(D=400, N=80)
    cal = risk.calibrate_risk(**_risk_inputs(m))
    np.testing.assert_allclose(cal["c_z"], 1.0, rtol=0.2)
    assert cal["c_alpha"] == pytest.approx(1.0, rel=0.08), cal
    # a factor variance stated 10⁸ times too small needs c_z = 10⁸: held at the bound, and said so
    tiny = risk.calibrate_risk(**_risk_inputs({**m, "sigma_z": 1e-4 * m["sigma_z"]}))
    assert tiny["clipped"] and max(tiny["c_z"]) == pytest.approx(risk.CALIBRATION_RANGE[1], rel=1e-6), tiny
    with pytest.raises(ValueError, match="at least 3 usable days"):
        risk.calibrate_risk(**_risk_inputs({k: v[:2] for k, v in m.items()}))
    with pytest.raises(ValueError, match="positive finite c_z"):
        risk.apply_calibration(sigma_z=m["sigma_z"], sigma_alpha=m["sigma_alpha"], c_z=0.0, c_alpha=1.0)
    with pytest.raises(ValueError, match="one per each of the 3 factors"):
        risk.apply_calibration(sigma_z=m["sigma_z"], sigma_alpha=m["sigma_alpha"], c_z=[1.0, 2.0], c_alpha=1.0)


def _hidden_factor(D=400, N=80, seed=4):
    """``_planted``'s market plus a factor the model does not know (a "sector": fixed loadings g, std
    0.6 a day) that the forecast leans on, as real alphas lean on sectors."""
    m, _ = _planted(D=D, N=N, seed=seed)
    rng = np.random.default_rng(seed + 1)
    g = rng.standard_normal(N)
    h = 0.6 * rng.standard_normal(D)
    m["y"] = m["y"] + np.outer(h, g)
    m["mu"] = 0.1 * g + 0.05 * rng.standard_normal((D, N))
    return m, g


def test_residual_factors_find_a_missing_factor_from_realised_labels_only():
    m, g = _hidden_factor()
    L, lam = risk.residual_factors(y=m["y"], valid=m["valid"], beta=m["beta"], lag=2, num=2, window=100)
    assert L.shape == (400, 80, 2) and lam.shape == (400, 2)
    assert not L[:2 + 25 - 1].any() and not lam[:2 + 25 - 1].any() and lam[2 + 25 - 1, 0] > 0  # too little history: none
    later = np.arange(120, 400)
    cos = np.abs(np.einsum("dn,n->d", L[later, :, 0], g)) / np.linalg.norm(g)
    assert cos.min() > 0.95, cos.min()  # the first component is the hidden loading
    # its variance: 0.36 ‖g‖² a day, less the part the day's β absorbs (3 of 80 dimensions)
    assert np.median(lam[later, 0]) == pytest.approx(0.36 * (g @ g), rel=0.25)
    assert np.median(lam[later, 1]) < 0.2 * np.median(lam[later, 0])
    # day t reads only labels realised by then, days <= t - lag: changing days >= 300 leaves L[:302] alone
    y2 = m["y"].copy()
    y2[300:] *= -3.0
    L2, lam2 = risk.residual_factors(y=y2, valid=m["valid"], beta=m["beta"], lag=2, num=2, window=100)
    np.testing.assert_array_equal(lam2[:302], lam[:302])
    assert not np.allclose(lam2[302], lam[302])
    with pytest.raises(ValueError, match="lag >= 1"):
        risk.residual_factors(y=m["y"], valid=m["valid"], beta=m["beta"], lag=0)


def test_residual_factors_put_a_missing_factors_risk_back_into_mean_variance():
    """Without the hidden factor, the forecast's mean-variance portfolio (which leans on it) carries far
    more risk than Σ_c predicts, however c is fit; with the residual factors in Σ_c it is predicted
    right on days the calibration never saw, and random and factor portfolios stay right too."""
    m, _ = _hidden_factor()
    res = risk.residual_factors(y=m["y"], valid=m["valid"], beta=m["beta"], lag=1, num=3, window=100)
    fit, held = slice(0, 300), slice(300, 400)

    def check(residual: tuple | None) -> dict:
        part = lambda seg: {k: v[seg] for k, v in m.items()}  # noqa: E731
        r_fit = None if residual is None else tuple(a[fit] for a in residual)
        r_held = None if residual is None else tuple(a[held] for a in residual)
        cal = risk.calibrate_risk(**_risk_inputs(part(fit)), residual=r_fit)
        sz, sa = risk.apply_calibration(sigma_z=m["sigma_z"][held], sigma_alpha=m["sigma_alpha"][held],
                                        c_z=cal["c_z"], c_alpha=cal["c_alpha"])
        return risk.bias_statistics(**{**part(held), "sigma_z": sz, "sigma_alpha": sa}, residual=r_held)

    without, with_resid = check(None), check(res)
    assert without["mean_variance"] > 2.0, without
    for name in ("random", "factor", "mean_variance"):
        assert with_resid[name] == pytest.approx(1.0, abs=0.15), (name, with_resid)


def test_alpha_factor_puts_the_forecasts_own_risk_into_mean_variance():
    """A forecast that leans on a co-movement no fixed loading describes (a style whose loadings g_t
    are new each day, as an alpha's are): the residual factors cannot find it, so the forecast's own
    mean-variance portfolio carries far more risk than Σ_c predicts. With the alpha factor (μ ⊥ the
    factors, its variance c_μ s̄ fit on the first 300 days so that the alpha portfolio's bias is 1),
    c_μ is the planted variance and the mean-variance portfolio is predicted right on the 100 days the
    fit never saw."""
    m, _ = _planted(D=400, N=80, seed=6)
    rng = np.random.default_rng(7)
    g = rng.standard_normal((400, 80))
    h = 0.6 * rng.standard_normal(400)
    m["y"] = m["y"] + h[:, None] * g
    m["mu"] = 0.1 * g + 0.05 * rng.standard_normal((400, 80))
    fit, held = slice(0, 300), slice(300, 400)
    part = lambda seg: {k: v[seg] for k, v in m.items()}  # noqa: E731

    def check(with_alpha: bool) -> tuple[dict, dict]:
        cal = risk.calibrate_risk(**(part(fit) if with_alpha else _risk_inputs(part(fit))))
        sz, sa = risk.apply_calibration(sigma_z=m["sigma_z"][held], sigma_alpha=m["sigma_alpha"][held],
                                        c_z=cal["c_z"], c_alpha=cal["c_alpha"])
        return cal, risk.bias_statistics(**{**part(held), "sigma_z": sz, "sigma_alpha": sa},
                                         c_mu=cal.get("c_mu", 0.0))

    (cal0, without), (cal, with_alpha) = check(False), check(True)
    assert "c_mu" not in cal0 and without["mean_variance"] > 1.5 and without["alpha"] > 2.0, without
    for name in ("random", "factor", "alpha", "mean_variance"):
        assert with_alpha[name] == pytest.approx(1.0, abs=0.15), (name, with_alpha)
    # c_μ s̄ is the planted variance on u: 0.36 (g_tᵀu_t)², s̄ the day's mean calibrated σ_α²
    u = risk.alpha_factor(mu=m["mu"][fit], valid=m["valid"][fit], beta=m["beta"][fit])
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0)
    assert np.abs(np.einsum("dnk,dn->dk", m["beta"][fit], u)).max() < 1e-9  # u ⊥ β
    planted = 0.36 * np.einsum("dn,dn->d", g[fit], u) ** 2 / (cal["c_alpha"] * (m["sigma_alpha"][fit] ** 2).mean(1))
    assert cal["c_mu"] == pytest.approx(planted.mean(), rel=0.25)
