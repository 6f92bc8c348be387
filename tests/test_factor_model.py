"""Known answer at the factor level: on a synthetic market with K planted factors, FactorVAE's default
objective learns them (posterior factor returns, exposures, a calibrated risk model), and the paper's
formulation as written collapses."""

from __future__ import annotations

import json

import pytest

from fvae.data.synthetic import SyntheticConfig, write_synthetic
from fvae.train import load_config, run_standalone

# measured on this configuration (README, "Does it learn the factors?")
SETS = ["model.hidden_size=32", "model.num_factors=4", "model.num_portfolios=32", "train.epochs=12",
        "train.patience=0"]


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    out = tmp_path_factory.mktemp("factor_market")
    write_synthetic(out, SyntheticConfig(stocks=300, days=800, seed=0))
    return out


@pytest.mark.slow
def test_default_objective_recovers_the_planted_factors(market, tmp_path):
    run_standalone(load_config(None, SETS), data=market, out=tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    fr = m["factor_recovery"]["valid"]
    post, oracle = fr["canonical_corr_posterior"], fr["canonical_corr_oracle"]
    assert len(post) == len(oracle) == 3
    # every planted factor: the posterior's factor series correlates with the truth at >= 80 % of what
    # an oracle that knows the true β extracts from the same labels
    for got, best in zip(post, oracle):
        assert got >= 0.8 * best, (post, oracle)
    assert fr["beta_r2"] >= 0.8, fr  # the learnt exposures span the true ones
    last = m["history"][-1]
    assert last["valid_active_factors"] >= 3
    # the posterior, which sees the day's returns, reconstructs them far better than the forecast
    assert last["valid_rank_ic_post"] > last["valid_rank_ic"] + 0.05, last
    # the risk model: random and factor-mimicking portfolios' realised risk within 20 % of the predicted
    for seg in ("valid", "test"):
        for name in ("random", "factor"):
            assert 0.8 <= m["risk"][seg][name] <= 1.2, (seg, m["risk"])
    # calibrated on validation (exactly 1 there by construction: one scalar per factor, one specific, and
    # 10 residual factors and the alpha factor), the out-of-sample test segment's random, factor and alpha
    # portfolios come within 15 % (1.01, 1.09 and 1.04 here) and the mean-variance portfolio within 30 %
    # (0.80: this market has no missing factor, so the residual factors are noise that adds a little
    # predicted risk; README)
    cal = m["risk_calibration"]
    assert cal["fit_segment"] == "valid" and not cal["clipped"] and len(cal["c_z"]) == 4, cal
    assert m["risk_calibrated"]["valid"]["random"] == pytest.approx(1.0, abs=1e-3)
    for name in ("random", "factor", "alpha"):
        assert 0.85 <= m["risk_calibrated"]["test"][name] <= 1.15, m["risk_calibrated"]
    assert 0.7 <= m["risk_calibrated"]["test"]["mean_variance"] <= 1.3, m["risk_calibrated"]


@pytest.mark.slow
def test_the_papers_objective_collapses_on_the_same_market(market, tmp_path):
    """The paper's loss as written (per-stock mean likelihood + γ·KL per day, unscaled portfolio
    returns): the KL goes to zero, no factor carries information, and the posterior is the prior."""
    run_standalone(load_config(None, [*SETS, "model.objective=paper", "model.scale_portfolios=false"]),
                   data=market, out=tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    last = m["history"][-1]
    assert last["valid_active_factors"] == 0 and last["kl"] < 0.01, last
    assert abs(last["valid_rank_ic_post"] - last["valid_rank_ic"]) < 0.02, last
