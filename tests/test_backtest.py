"""fvae.backtest against known answers: perfect foresight, exact costs, hand-made drawdowns,
TopK-Drop's replacement limit, the mean-variance constraints and optimum, qlib's own backtest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fvae import backtest as bt
from fvae.data.loader import load_panel
from fvae.data.shards import DataError

K_FACTORS = 3


def _write_predictions(folder: Path, *, dates: pd.DatetimeIndex, instruments: np.ndarray, ret: np.ndarray,
                       valid: np.ndarray, score: np.ndarray, seed: int = 0) -> Path:
    """A run-like folder: pred_test.parquet (with a random risk model) and factors_test.parquet."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    dd, nn = np.nonzero(valid)
    df = pd.DataFrame({"datetime": dates[dd], "instrument": instruments[nn], "score": score[dd, nn],
                       "sigma": 1.0, "sigma_alpha": rng.uniform(0.5, 1.0, len(dd)), "label": ret[dd, nn]})
    for k in range(K_FACTORS):
        df[f"beta_{k}"] = rng.normal(0, 0.5, len(dd))
    df.to_parquet(folder / "pred_test.parquet", index=False)
    fz = pd.DataFrame({"datetime": dates})
    for k in range(K_FACTORS):
        fz[f"mu_z_{k}"] = 0.0
        fz[f"sigma_z_{k}"] = rng.uniform(0.3, 0.8, len(dates))
    fz.to_parquet(folder / "factors_test.parquet", index=False)
    return folder / "pred_test.parquet"


@pytest.fixture(scope="module")
def perfect(tiny_market, tmp_path_factory) -> tuple[Path, object]:
    """Perfect foresight on the tiny market's test segment: score = the realised return."""
    panel = load_panel(tiny_market, "test")
    ret, valid = panel.ret.numpy().astype(np.float64), panel.valid.numpy()
    path = _write_predictions(tmp_path_factory.mktemp("perfect"), dates=panel.dates,
                              instruments=panel.instruments, ret=ret, valid=valid, score=ret)
    return path, panel


@pytest.fixture(scope="module")
def constant_universe(tmp_path_factory) -> Path:
    """40 stocks listed every day, noisy scores: for the replacement limit and the MV constraints."""
    rng = np.random.default_rng(3)
    D, N = 40, 40
    dates = pd.bdate_range("2020-01-01", periods=D)
    instruments = np.array([f"S{i:02d}" for i in range(N)])
    ret = rng.normal(0.0005, 0.02, (D, N))
    score = ret + rng.normal(0, 0.03, (D, N))
    return _write_predictions(tmp_path_factory.mktemp("const"), dates=dates, instruments=instruments, ret=ret,
                              valid=np.ones((D, N), bool), score=score)


def test_perfect_topk_full_rebalance_earns_mean_of_top_k(perfect, tiny_market, tmp_path):
    path, panel = perfect
    k = 10
    cfg = bt.BacktestConfig(strategies=("topk",), topk=k, n_drop=k)
    bt.run_backtest(path, out=tmp_path, data=tiny_market, cfg=cfg, progress=False)
    daily = pd.read_csv(tmp_path / "returns_topk.csv", parse_dates=["datetime"])
    ret, valid = panel.ret.numpy().astype(np.float64), panel.valid.numpy()
    for d in range(panel.num_days):
        r = ret[d, valid[d]]
        expect = np.sort(r)[::-1][: min(k, len(r))].mean()
        assert daily["gross"].iloc[d] == pytest.approx(expect, abs=1e-9)
    # the benchmark is the equal-weighted universe of the day
    bench = np.array([ret[d, valid[d]].mean() for d in range(panel.num_days)])
    np.testing.assert_allclose(daily["benchmark"], bench, atol=1e-12)


def test_costs_lower_return_by_turnover_times_rate(perfect, tiny_market, tmp_path):
    path, _ = perfect
    cfg = bt.BacktestConfig(strategies=("topk",), topk=8, n_drop=3, buy_cost_bps=7, sell_cost_bps=20)
    bt.run_backtest(path, out=tmp_path, data=tiny_market, cfg=cfg, progress=False)
    daily = pd.read_csv(tmp_path / "returns_topk.csv", parse_dates=["datetime"])
    # buys and sells recomputed independently from the holdings table
    h = pd.read_parquet(tmp_path / "holdings_topk.parquet").pivot(index="datetime", columns="instrument",
                                                                   values="weight").fillna(0.0)
    h = h.reindex(daily["datetime"]).fillna(0.0)
    delta = h.diff().fillna(h.iloc[[0]])  # the first day buys from cash
    buys = delta.clip(lower=0).sum(axis=1).to_numpy()
    sells = (-delta).clip(lower=0).sum(axis=1).to_numpy()
    np.testing.assert_allclose(daily["buys"], buys, atol=1e-12)
    np.testing.assert_allclose(daily["sells"], sells, atol=1e-12)
    np.testing.assert_allclose(daily["gross"] - daily["net"], 7e-4 * buys + 20e-4 * sells, atol=1e-15)
    assert buys[0] == pytest.approx(1.0) and sells[0] == 0.0
    # zero costs: net equals gross
    cfg0 = bt.BacktestConfig(strategies=("topk",), topk=8, n_drop=3, buy_cost_bps=0, sell_cost_bps=0)
    bt.run_backtest(path, out=tmp_path / "free", data=tiny_market, cfg=cfg0, progress=False)
    free = pd.read_csv(tmp_path / "free" / "returns_topk.csv")
    np.testing.assert_allclose(free["net"], free["gross"], atol=0)


def test_max_drawdown_of_hand_made_curve():
    assert bt.max_drawdown(np.array([1, 1.2, 0.9, 1.1, 0.6, 0.8])) == pytest.approx(0.5)
    assert bt.max_drawdown(np.array([1.0, 1.1, 1.2])) == 0.0
    curve = bt.wealth(np.array([0.2, -0.25, 0.1]))  # 1.2, 0.9, 0.99
    assert bt.max_drawdown(curve) == pytest.approx(0.25)
    m = bt.portfolio_metrics(np.array([0.01, -0.02, 0.015, 0.0]), np.zeros(4))
    assert m["max_drawdown"] == pytest.approx(0.02) and m["total_return"] == pytest.approx(
        1.01 * 0.98 * 1.015 - 1)
    assert m["information_ratio"] == pytest.approx(m["sharpe"])  # zero benchmark


def test_topk_drop_replaces_at_most_n_names_a_day(constant_universe, tmp_path):
    k, n = 10, 2
    cfg = bt.BacktestConfig(strategies=("topk",), topk=k, n_drop=n)
    bt.run_backtest(constant_universe, out=tmp_path, cfg=cfg, progress=False)
    h = pd.read_parquet(tmp_path / "holdings_topk.parquet")
    books = [set(g["instrument"]) for _, g in h.groupby("datetime")]
    assert all(len(b) == k for b in books)
    assert np.allclose(h["weight"], 1.0 / k)
    changes = [len(b - a) for a, b in zip(books[:-1], books[1:])]
    assert max(changes) <= n and sum(changes) > 0  # it trades, never more than n a day
    # qlib's rule: the book is the top k of (held ∪ best k + n − |held| non-held); the first day is the top k
    pred = pd.read_parquet(constant_universe)
    first = pred[pred["datetime"] == pred["datetime"].min()].nlargest(k, "score")
    assert books[0] == set(first["instrument"])


def test_topk_handles_days_with_fewer_than_k_stocks():
    score = np.array([[3.0, 2.0, 1.0, np.nan], [1.0, 2.0, 3.0, 4.0], [np.nan, np.nan, np.nan, np.nan]])
    ok = np.isfinite(score)
    w = bt.topk_drop_weights(score, ok, topk=5, n_drop=1)
    np.testing.assert_allclose(w[0], [1 / 3, 1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(w[1], [0.25] * 4)  # nothing sold without a replacement
    assert w[2].sum() == 0  # no tradable stock: all cash


def test_mean_variance_constraints_and_linear_limit(constant_universe, tmp_path):
    cap, tau = 0.08, 0.25
    cfg = bt.BacktestConfig(strategies=("mv",), max_weight=cap, max_turnover=tau, risk_aversion=2.0)
    bt.run_backtest(constant_universe, out=tmp_path, cfg=cfg, progress=False)
    h = pd.read_parquet(tmp_path / "holdings_mv.parquet").pivot(index="datetime", columns="instrument",
                                                                 values="weight").fillna(0.0)
    w = h.to_numpy()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-9)
    assert w.min() >= 0 and w.max() <= cap + 1e-12
    turnover = np.abs(np.diff(w, axis=0)).sum(1)
    assert turnover.max() <= tau + 1e-9 and turnover.max() > 0.9 * tau  # the limit binds
    daily = pd.read_csv(tmp_path / "returns_mv.csv")
    np.testing.assert_allclose(daily["turnover"].to_numpy()[1:], turnover, atol=1e-12)

    # λ → 0: a linear programme; all weight on the best μ names, each at the cap
    rng = np.random.default_rng(0)
    n, k = 50, K_FACTORS
    mu = rng.normal(0, 0.1, n)
    w0 = bt.solve_mean_variance(mu, rng.normal(0, 0.5, (n, k)), np.full(k, 0.5), np.full(n, 0.8),
                                risk_aversion=1e-9, max_weight=0.05)
    top = np.argsort(-mu)[:20]
    np.testing.assert_allclose(w0[top], 0.05, atol=1e-6)
    assert w0.sum() == pytest.approx(1.0) and np.delete(w0, top).max() < 1e-6
    # a cap of 0.07 leaves 0.02 for the 15th best name
    w1 = bt.solve_mean_variance(mu, rng.normal(0, 0.5, (n, k)), np.full(k, 0.5), np.full(n, 0.8),
                                risk_aversion=0.0, max_weight=0.07)
    order = np.argsort(-mu)
    np.testing.assert_allclose(w1[order[:14]], 0.07, atol=1e-6)
    assert w1[order[14]] == pytest.approx(0.02, abs=1e-6)


def test_mean_variance_matches_cvxpy_optimum():
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(1)
    n, k = 60, K_FACTORS
    mu, beta = rng.normal(0, 0.1, n), rng.normal(0, 0.5, (n, k))
    sz, sa = rng.uniform(0.4, 0.8, k), rng.uniform(0.6, 1.0, n)
    prev = np.minimum(rng.dirichlet(np.ones(n)), 0.05)
    prev *= 0.95 / prev.sum()  # 5 % left the universe
    sigma = beta @ np.diag(sz**2) @ beta.T + np.diag(sa**2)
    for lam in (0.0, 1.0, 5.0):
        mine = bt.solve_mean_variance(mu, beta, sz, sa, risk_aversion=lam, max_weight=0.06, w_prev=prev,
                                      max_turnover=0.3)
        w = cp.Variable(n)
        cp.Problem(cp.Maximize(mu @ w - lam / 2 * cp.quad_form(w, cp.psd_wrap(sigma))),
                   [w >= 0, w <= 0.06, cp.sum(w) == 1, cp.norm1(w - prev) <= 0.3]).solve()
        f = lambda x: mu @ x - lam / 2 * x @ sigma @ x  # noqa: E731
        assert np.abs(mine - prev).sum() <= 0.3 + 1e-9
        assert f(mine) >= f(w.value) - 1e-5 * max(1.0, abs(f(w.value)))


def _holdings(folder: Path) -> np.ndarray:
    """holdings_mv.parquet as (days, the 40 stocks of ``constant_universe``), 0 where not held."""
    h = pd.read_parquet(folder / "holdings_mv.parquet").pivot(index="datetime", columns="instrument", values="weight")
    return h.reindex(columns=[f"S{i:02d}" for i in range(40)]).fillna(0.0).to_numpy()


def test_mean_variance_uses_the_runs_calibrated_risk_model(constant_universe, tmp_path, capsys):
    """With metrics.json's risk_calibration next to the predictions, mean-variance's books are those of
    the raw model on prediction files whose σ_z² and σ_α² were scaled by c_z and c_alpha by hand."""
    run, scaled = tmp_path / "run", tmp_path / "scaled"
    run.mkdir()
    scaled.mkdir()
    c_z, c_alpha = 4.0, 0.25
    pred, fz = pd.read_parquet(constant_universe), pd.read_parquet(constant_universe.with_name("factors_test.parquet"))
    first = sorted(fz["datetime"])[:6]  # 6 days are enough and keep the four backtests quick
    pred, fz = pred[pred["datetime"].isin(first)], fz[fz["datetime"].isin(first)]
    pred.to_parquet(run / "pred_test.parquet", index=False)
    fz.to_parquet(run / "factors_test.parquet", index=False)
    (run / "metrics.json").write_text(json.dumps({"risk_calibration": {"c_z": c_z, "c_alpha": c_alpha, "days": 6,
                                                                       "fit_segment": "valid"}}))
    pred.assign(sigma_alpha=pred["sigma_alpha"] * np.sqrt(c_alpha)).to_parquet(scaled / "pred_test.parquet")
    sz = [f"sigma_z_{k}" for k in range(K_FACTORS)]
    fz.assign(**{c: fz[c] * np.sqrt(c_z) for c in sz}).to_parquet(scaled / "factors_test.parquet")
    mv = bt.BacktestConfig(strategies=("mv",), max_weight=0.1)
    res = bt.run_backtest(run, out=tmp_path / "cal", cfg=mv, progress=False)  # --risk auto
    assert res["config"]["risk"] == "auto"
    assert res["risk_model"] == {"sigma": "calibrated", "c_z": c_z, "c_alpha": c_alpha, "fit_segment": "valid",
                                 "from": str(run.resolve() / "metrics.json")}
    assert json.loads((tmp_path / "cal" / "backtest.json").read_text())["risk_model"]["sigma"] == "calibrated"
    by_hand = bt.run_backtest(scaled, out=tmp_path / "hand", cfg=mv, progress=False)
    assert by_hand["risk_model"] == {"sigma": "raw", "note": f"no calibration: {scaled.resolve() / 'metrics.json'} "
                                                             "not found"}
    raw = bt.run_backtest(run, out=tmp_path / "raw", cfg=bt.BacktestConfig(strategies=("mv",), max_weight=0.1,
                                                                           risk="raw"), progress=False)
    assert raw["risk_model"] == {"sigma": "raw"}
    np.testing.assert_allclose(_holdings(tmp_path / "cal"), _holdings(tmp_path / "hand"), atol=1e-9)
    assert np.abs(_holdings(tmp_path / "cal") - _holdings(tmp_path / "raw")).max() > 1e-3  # the scalars matter
    # asking for the calibrated Σ where there is none, or a broken calibration: one line naming the file
    capsys.readouterr()
    assert bt.main(["--pred", str(scaled), "--out", str(tmp_path / "o"), "--strategy", "mv", "--risk",
                    "calibrated"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --risk calibrated: ") and "metrics.json not found" in err and err.count("\n") == 1
    (run / "metrics.json").write_text(json.dumps({"risk_calibration": {"c_z": -1.0, "c_alpha": 1.0}}))
    with pytest.raises(DataError, match=r"metrics.json: risk_calibration: expected positive finite c_z"):
        bt.run_backtest(run, out=tmp_path / "bad", cfg=mv, progress=False)


def test_mean_variance_adds_the_calibrations_residual_and_alpha_factors(constant_universe, tmp_path, capsys):
    """A calibration with residual factors and an alpha factor (per-factor c_z, c_mu): the books are
    those of the raw model on prediction files whose β and σ_z carry the residual factors and the alpha
    factor as extra factors, scaled by hand; a calibration whose residual or alpha factors the files
    lack is an error naming both."""
    run, hand = tmp_path / "run", tmp_path / "hand"
    run.mkdir()
    hand.mkdir()
    c_z, c_alpha, P = [4.0, 1.0, 0.5], 0.25, 2
    pred, fz = pd.read_parquet(constant_universe), pd.read_parquet(constant_universe.with_name("factors_test.parquet"))
    first = sorted(fz["datetime"])[:6]
    pred, fz = pred[pred["datetime"].isin(first)].copy(), fz[fz["datetime"].isin(first)].copy()
    rng = np.random.default_rng(7)
    for q in range(P):
        pred[f"resid_beta_{q}"] = rng.standard_normal(len(pred)) / np.sqrt(40)
        fz[f"resid_sigma_{q}"] = [0.0, *rng.uniform(0.5, 2.0, len(fz) - 1)]  # the first day has none
    pred["alpha_u"] = rng.standard_normal(len(pred)) / np.sqrt(40)
    fz["alpha_sigma"] = rng.uniform(0.5, 2.0, len(fz))
    pred.to_parquet(run / "pred_test.parquet", index=False)
    fz.to_parquet(run / "factors_test.parquet", index=False)
    (run / "metrics.json").write_text(json.dumps({"risk_calibration": {
        "c_z": c_z, "c_alpha": c_alpha, "days": 6, "fit_segment": "valid", "residual_factors": P, "c_mu": 2.0}}))
    by_hand = pred.assign(sigma_alpha=pred["sigma_alpha"] * np.sqrt(c_alpha),
                          **{f"beta_{K_FACTORS + q}": pred[f"resid_beta_{q}"] for q in range(P)},
                          **{f"beta_{K_FACTORS + P}": pred["alpha_u"]})
    by_hand.drop(columns=[*(f"resid_beta_{q}" for q in range(P)), "alpha_u"]).to_parquet(hand / "pred_test.parquet")
    fz_hand = fz.assign(**{f"sigma_z_{k}": fz[f"sigma_z_{k}"] * np.sqrt(c) for k, c in enumerate(c_z)},
                        **{f"sigma_z_{K_FACTORS + q}": fz[f"resid_sigma_{q}"] for q in range(P)},
                        **{f"sigma_z_{K_FACTORS + P}": fz["alpha_sigma"]})
    fz_hand.drop(columns=[*(f"resid_sigma_{q}" for q in range(P)), "alpha_sigma"]).to_parquet(
        hand / "factors_test.parquet")
    mv = bt.BacktestConfig(strategies=("mv",), max_weight=0.1)
    res = bt.run_backtest(run, out=tmp_path / "cal", cfg=mv, progress=True)
    assert "mean-variance risk model: calibrated Σ (c_z 0.5..4 (3 factors), c_alpha 0.25, 2 residual factors, alpha factor c_mu 2)" \
        in capsys.readouterr().out
    assert res["risk_model"]["sigma"] == "calibrated" and res["risk_model"]["residual_factors"] == P
    assert res["risk_model"]["c_z"] == c_z and res["risk_model"]["c_mu"] == 2.0
    assert bt.run_backtest(hand, out=tmp_path / "h", cfg=mv, progress=False)["risk_model"]["sigma"] == "raw"
    np.testing.assert_allclose(_holdings(tmp_path / "cal"), _holdings(tmp_path / "h"), atol=1e-9)
    pred.drop(columns=["alpha_u"]).to_parquet(run / "pred_test.parquet", index=False)
    with pytest.raises(DataError, match=r"metrics.json: risk_calibration has an alpha factor \(c_mu\), but .*pred_test"):
        bt.run_backtest(run, out=tmp_path / "bad", cfg=mv, progress=False)
    pred.drop(columns=["resid_beta_1"]).to_parquet(run / "pred_test.parquet", index=False)
    with pytest.raises(DataError, match=r"metrics.json: risk_calibration has 2 residual factors, but .*pred_test"):
        bt.run_backtest(run, out=tmp_path / "bad", cfg=mv, progress=False)


def test_backtest_cli_writes_every_output(constant_universe, tmp_path, capsys):
    bench = pd.DataFrame({"date": pd.bdate_range("2020-01-01", periods=40).strftime("%Y-%m-%d"),
                          "return": np.linspace(-0.01, 0.01, 40)})
    bench.to_csv(tmp_path / "index.csv", index=False)
    out = tmp_path / "bt"
    rc = bt.main(["--pred", str(constant_universe.parent), "--out", str(out), "--topk", "10", "--n-drop", "2",
                  "--max-weight", "0.1", "--benchmark", str(tmp_path / "index.csv")])
    assert rc == 0
    for f in ["backtest.json", "returns_topk.csv", "returns_mv.csv", "holdings_topk.parquet",
              "holdings_mv.parquet", "cumulative.png", "drawdown.png"]:
        assert (out / f).is_file(), f
    res = json.loads((out / "backtest.json").read_text())
    for s in ("topk", "mv"):
        for side in ("gross", "net"):
            m = res["strategies"][s][side]
            assert {"annual_return", "annual_volatility", "sharpe", "information_ratio", "max_drawdown"} <= set(m)
            assert all(math.isfinite(m[x]) for x in ("annual_return", "sharpe", "information_ratio"))
        assert res["strategies"][s]["net"]["annual_return"] < res["strategies"][s]["gross"]["annual_return"]
    daily = pd.read_csv(out / "returns_topk.csv")
    np.testing.assert_allclose(daily["benchmark"], bench["return"], atol=1e-12)
    np.testing.assert_allclose(daily["excess"], daily["net"] - daily["benchmark"], atol=1e-15)
    assert "TopK-Drop" in capsys.readouterr().out


def test_bad_inputs_name_the_file_and_column(constant_universe, tmp_path):
    df = pd.read_parquet(constant_universe).drop(columns=["score"])
    df.to_parquet(tmp_path / "pred_test.parquet")
    with pytest.raises(DataError, match=r"pred_test.parquet: missing column\(s\) \['score'\]"):
        bt.load_market(tmp_path / "pred_test.parquet")
    with pytest.raises(DataError, match="prediction file not found"):
        bt.load_market(tmp_path / "nowhere")
    pd.DataFrame({"day": ["2020-01-01"], "return": [0.0]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataError, match=r"b.csv: missing column\(s\) \['date'\]"):
        bt.read_benchmark_csv(tmp_path / "b.csv", pd.DatetimeIndex(["2020-01-01"]))
    (constant_universe.parent / "factors_test.parquet").rename(tmp_path / "f.parquet")
    try:
        with pytest.raises(DataError, match="factors_test.parquet not found"):
            bt.load_market(constant_universe, need_risk=True)
    finally:
        (tmp_path / "f.parquet").rename(constant_universe.parent / "factors_test.parquet")
    with pytest.raises(ValueError, match="--n-drop"):
        bt.BacktestConfig(topk=5, n_drop=6)
    assert bt.main(["--pred", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2


SP500 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sp500" / "sp500_daily.parquet"
QLIB_SYMBOLS = ["AAPL", "AMZN", "CSCO", "GE", "INTC", "JNJ", "JPM", "KO", "MSFT", "PFE", "T", "WMT", "XOM",
                "CAT", "HD", "MRK", "PG", "VZ", "IBM", "ORCL"]


def test_qlib_crosscheck_agrees_with_qlibs_own_backtest(tmp_path, monkeypatch):
    """On a real 20-stock slice exported through qlib, qlib's TopkDropoutStrategy and ours agree."""
    if not SP500.is_file():
        pytest.skip(f"real S&P 500 panel not found at {SP500}")
    pytest.importorskip("qlib")
    from fvae.data import qlib_io
    from fvae.data.shards import read_meta, read_rows

    monkeypatch.chdir(tmp_path)
    df = pd.read_parquet(SP500, filters=[("symbol", "in", QLIB_SYMBOLS)])
    df["date"] = pd.to_datetime(df["date"])
    df = df[(df["date"] >= "2015-01-01") & (df["date"] <= "2016-12-31")]
    df.to_parquet(tmp_path / "slice.parquet", index=False)
    qlib_io.import_ohlcv(tmp_path / "slice.parquet", out=tmp_path / "us_data", market="sp500")
    meta = qlib_io.export(provider_uri=tmp_path / "us_data", region="us", market="sp500", handler="Alpha360",
                          out=tmp_path / "shards", train=("2015-03-02", "2015-12-31"),
                          valid=("2016-01-04", "2016-06-30"), test=("2016-07-01", "2016-12-30"))
    rows = read_rows(tmp_path / "shards", meta, *meta.segment_range("test"),
                     columns=["datetime", "instrument", "ret"]).dropna()
    rng = np.random.default_rng(0)
    pred = rows.rename(columns={"ret": "label"})
    pred["score"] = pred["label"] + rng.normal(0, 0.01, len(pred))  # a strong, imperfect signal
    run = tmp_path / "run"
    run.mkdir()
    pred.to_parquet(run / "pred_test.parquet", index=False)
    pred.set_index(["datetime", "instrument"])[["score"]].to_pickle(run / "pred_test.pkl")
    cfg = bt.BacktestConfig(strategies=("topk",), topk=5, n_drop=1)
    chk = bt.qlib_crosscheck(run, data=tmp_path / "shards", out=tmp_path / "bt", cfg=cfg)
    assert chk["shift_days"] == 2  # default label: signal on t, trade at t+1's close, booked on t+2
    assert chk["benchmark_correlation"] > 0.999
    assert chk["daily_correlation"]["gross"] > 0.99
    q, o = chk["qlib"]["net"], chk["ours"]["net"]
    assert q["sharpe"] == pytest.approx(o["sharpe"], rel=0.05)
    assert q["information_ratio"] == pytest.approx(o["information_ratio"], rel=0.05)
    assert (tmp_path / "bt" / "qlib_check.json").is_file()
    assert read_meta(tmp_path / "shards").source.startswith("qlib:")
