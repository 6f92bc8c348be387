"""fvae.report rendered in real headless Chromium, for a run and for a search directory;
fvae.factors against a planted factor model and real tickers.

Chromium: Debian's ``chromium`` package (``apt-get install -y chromium``) at /usr/bin/chromium;
the rendering tests are skipped without it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fvae import factors as ff
from fvae import report as rp
from fvae.train import DEBUG_PRESET, load_config, run_standalone

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=5000"]
SP500_CONSTITUENTS = ff.DEFAULT_SECTORS


@pytest.fixture(scope="module")
def tiny_run(tiny_market, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_run")
    run_standalone(load_config(None, DEBUG_PRESET), data=tiny_market, out=out)
    return out


def _chromium(html: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium)")
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", *extra,
                           html.resolve().as_uri()], capture_output=True, text=True, timeout=90, check=True)


def _render(html: Path, tmp: Path) -> tuple[str, np.ndarray]:
    """The DOM after load (scripts run) and a screenshot as an (H, W, C) array."""
    dom = _chromium(html, tmp, "--dump-dom").stdout
    shot = tmp / "shot.png"
    _chromium(html, tmp, "--window-size=1200,2400", f"--screenshot={shot}")
    import matplotlib.image

    return dom, matplotlib.image.imread(shot)


def _check_self_contained(page: str) -> None:
    srcs = re.findall(r'<img[^>]*\bsrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page


def test_run_report_renders_in_chromium(tiny_run, tmp_path):
    out = rp.build_report(tiny_run, out=tmp_path / "report.html", progress=False)
    page = out.read_text()
    _check_self_contained(page)
    dom, shot = _render(out, tmp_path)
    for sid in rp.SECTIONS:
        assert f'<section id="{sid}">' in dom, sid
    n = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert n >= 6  # training curves, cumulative, drawdown, three factor plots
    assert 'data-images-failed="0"' in dom
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == n and min(widths) >= 300
    assert dom.count('data-decoded="1"') == n
    # the screenshot shows a page, not a blank: many distinct colours, real contrast
    assert shot.shape[0] == 2400 and shot.shape[1] == 1200
    assert shot[..., :3].std() > 0.05 and len(np.unique(shot[::8, ::8, 0])) > 20
    # the backtest and the factor analysis were run because their outputs were absent
    assert (tiny_run / "backtest" / "backtest.json").is_file() and (tiny_run / "factors" / "factors.json").is_file()
    # its mean-variance books were built on the run's calibrated Σ, and the page says so
    cal = json.loads((tiny_run / "metrics.json").read_text())["risk_calibration"]
    assert json.loads((tiny_run / "backtest" / "backtest.json").read_text())["risk_model"]["sigma"] == "calibrated"
    cz = f"{min(cal['c_z']):.3g} … {max(cal['c_z']):.3g} ({len(cal['c_z'])} factors)"
    assert f"Mean-variance risk model: the calibrated Σ (c_z {cz}, c_α {cal['c_alpha']:.3g}, " \
           f"{cal['residual_factors']} residual factors, an alpha factor)" in _section(page, "equity")
    assert json.loads((tiny_run / "backtest" / "backtest.json").read_text())["risk_model"]["c_mu"] == cal["c_mu"]
    section = dom.split('<section id="search">')[1]
    assert "Not available because this is a single training run" in section
    assert "sector analysis was skipped" in dom  # synthetic tickers
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert f"{metrics['test']['rank_ic']:.4f}" in dom.split('<section id="metrics">')[1].split("</section>")[0]
    assert "ceiling: true μ (test)" in dom


def _summary(run: Path, tmp: Path) -> Path:
    """A search directory like fvae.tune's: summary.json with 9 finished trials and one failure."""
    exp = tmp / "exp"
    exp.mkdir()
    rng = np.random.default_rng(0)
    trials = []
    for i in range(9):
        lr = float(10 ** rng.uniform(-4, -2))
        hidden = int(rng.choice([16, 32, 64]))
        cond = bool(i % 2)
        value = 1.0 + 0.3 * np.log10(lr) + 0.0005 * hidden + rng.normal(0, 0.01)  # lr matters most
        trials.append({"trial_id": f"t{i:02d}", "status": "TERMINATED", "error": None, "epochs": 2,
                       "valid_rank_icir": float(value), "run_dir": str(exp / "trials" / f"t{i:02d}"),
                       "params": {"train.lr": lr, "model.hidden_size": hidden, "model.conditional_posterior": cond}})
    trials.append({"trial_id": "t09", "status": "ERROR", "error": "RuntimeError: boom", "epochs": 0,
                   "valid_rank_icir": None, "run_dir": str(exp / "trials" / "t09"), "params": {"train.lr": 1e-3}})
    best = max(trials[:9], key=lambda t: t["valid_rank_icir"])
    best["run_dir"] = str(run)
    summary = {"space": "tiny", "metric": "valid_rank_icir", "trials": trials, "asha_stopped": 3,
               "best": {"trial_id": best["trial_id"], "params": best["params"], "config": {},
                        "valid_rank_icir": best["valid_rank_icir"], "test": {"rank_ic": 0.01, "rank_icir": 0.1},
                        "checkpoint": str(run / "checkpoints" / "last" / "state.pt")}}
    (exp / "summary.json").write_text(json.dumps(summary))
    return exp


def test_search_section_ranks_by_the_summarys_metric_and_mode(tmp_path):
    """A ``mode: min`` search on nll: the best-trials table lists the lowest value first and names the metric."""
    rng = np.random.default_rng(1)
    trials = [{"trial_id": f"t{i}", "status": "TERMINATED", "epochs": 2, "value": float(v),
               "valid_rank_icir": float(rng.normal()), "params": {"train.lr": float(10 ** rng.uniform(-4, -2))}}
              for i, v in enumerate([0.9, 0.2, 0.5, 0.2])]
    summary = {"space": "tiny", "metric": "nll", "mode": "min", "trials": trials, "asha_stopped": 0,
               "best": {"trial_id": "t1", "value": 0.2, "valid_rank_icir": trials[1]["valid_rank_icir"],
                        "test": {"rank_ic": 0.01, "rank_icir": 0.1}, "params": trials[1]["params"]}}
    assert rp.search_metric(summary) == ("nll", "min")
    assert rp.search_metric({"trials": []}) == ("valid_rank_icir", "max")  # summaries from before mode
    html = rp.section_search(rp.Inputs(source=tmp_path, run_dir=None, summary=summary, metrics=None, data=None,
                                       notes={}))
    table = html.split("<h3>Best trials</h3>")[1]
    order = re.findall(r"<td>(t\d)</td>", table)
    assert order[:4] == ["t1", "t3", "t2", "t0"]  # lowest nll first, the tie broken by the lower trial id
    assert "<th>nll</th>" in table and "selection by nll (lowest is best)" in html
    assert "Best trial <b>t1</b>: nll 0.2000" in html


def test_search_report_has_importance_and_scatter(tiny_run, tmp_path):
    exp = _summary(tiny_run, tmp_path)
    imp, method = rp.param_importance(json.loads((exp / "summary.json").read_text()))
    assert set(imp) == {"train.lr", "model.hidden_size", "model.conditional_posterior"}
    assert sum(imp.values()) == pytest.approx(1.0) and max(imp, key=imp.get) == "train.lr"
    assert "optuna" in method
    out = rp.build_report(exp, out=tmp_path / "search.html", progress=False)
    page = out.read_text()
    _check_self_contained(page)
    search = page.split('<section id="search">')[1].split("</section>")[0]
    assert search.count("<img") >= 2 and "Parameter importance" in search and "boom" in search
    assert "<b>" + json.loads((exp / "summary.json").read_text())["best"]["trial_id"] + "</b>" in search
    for sid in rp.SECTIONS:  # the best trial's run fills the other sections
        assert f'<section id="{sid}">' in page
    assert "Not available" not in page.split('<section id="equity">')[1].split("</section>")[0]
    dom, _ = _render(out, tmp_path)
    assert 'data-images-failed="0"' in dom


def test_importance_reads_the_searchs_study(tiny_run, tmp_path):
    """With EXP_DIR/optuna.db the importance is the study's (its distributions and values), not one
    rebuilt from summary.json: here the study's values follow hidden_size while summary.json's follow lr."""
    import optuna
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    exp = _summary(tiny_run, tmp_path)
    summary = json.loads((exp / "summary.json").read_text())
    rebuilt, method = rp.param_importance(summary, exp_dir=exp)
    assert max(rebuilt, key=rebuilt.get) == "train.lr" and "kept no EXP_DIR/optuna.db" in method
    dists = {"train.lr": FloatDistribution(1e-5, 1e-1, log=True), "model.hidden_size": IntDistribution(16, 64),
             "model.conditional_posterior": CategoricalDistribution([False, True])}
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{exp / 'optuna.db'}", direction="maximize")
    for t in summary["trials"][:9]:
        study.add_trial(optuna.trial.create_trial(params=t["params"], distributions=dists,
                                                  value=t["params"]["model.hidden_size"] / 64,
                                                  user_attrs={"ray_trial_id": t["trial_id"]}))
    imp, method = rp.param_importance(summary, exp_dir=exp)
    assert max(imp, key=imp.get) == "model.hidden_size" and "on the search's study, EXP_DIR/optuna.db" in method
    html = rp.section_search(rp.Inputs(source=exp, run_dir=None, summary=summary, metrics=None, data=None, notes={}))
    assert "EXP_DIR/optuna.db" in html


def test_importance_fallback_without_optuna(monkeypatch, tiny_run, tmp_path):
    import optuna.importance

    def broken(*args: object, **kwargs: object) -> None:
        raise ImportError("no scikit-learn")

    monkeypatch.setattr(optuna.importance, "get_param_importances", broken)
    summary = json.loads((_summary(tiny_run, tmp_path) / "summary.json").read_text())
    imp, method = rp.param_importance(summary)
    assert "Spearman" in method and sum(imp.values()) == pytest.approx(1.0)
    assert max(imp, key=imp.get) == "train.lr"
    one = {"trials": summary["trials"][:1]}
    with pytest.raises(ValueError, match="at least 2"):
        rp.param_importance(one)


def test_missing_pieces_become_notes(tiny_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run / "metrics.json", bare / "metrics.json")
    page = rp.build_report(bare, out=tmp_path / "bare.html", progress=False).read_text()
    for sid in rp.SECTIONS:
        assert f'<section id="{sid}">' in page
    for sid in ("equity", "drawdown", "factors"):
        assert "Not available because" in page.split(f'<section id="{sid}">')[1].split("</section>")[0], sid
    with pytest.raises(rp.ReportError, match="neither a run directory"):
        rp.build_report(tmp_path, out=tmp_path / "x.html", progress=False)
    assert rp.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "y.html")]) == 2


def test_realised_factor_returns_recover_a_planted_model():
    rng = np.random.default_rng(0)
    D, N, K = 30, 50, 3
    z = rng.normal(0, 0.01, (D, K))
    rows = []
    for d in range(D):
        beta = rng.normal(0, 1, (N, K))
        ret = 0.001 * d + beta @ z[d]  # an intercept per day plus an exact factor model
        df = pd.DataFrame({"datetime": pd.Timestamp("2020-01-01") + pd.Timedelta(days=d),
                           "instrument": [f"S{i}" for i in range(N)], "label": ret})
        for k in range(K):
            df[f"beta_{k}"] = beta[:, k]
        rows.append(df)
    got, r2 = ff.realised_factor_returns(pd.concat(rows, ignore_index=True), K)
    np.testing.assert_allclose(got.to_numpy(), z, atol=1e-12)
    assert np.allclose(r2, 1.0)


def test_factor_analysis_with_real_tickers(tiny_run, tmp_path):
    if not SP500_CONSTITUENTS.is_file():
        pytest.skip(f"{SP500_CONSTITUENTS} not found")
    symbols = pd.read_csv(SP500_CONSTITUENTS)["Symbol"].tolist()
    run = tmp_path / "run"
    run.mkdir()
    pred = pd.read_parquet(tiny_run / "pred_test.parquet")
    names = {s: symbols[i] for i, s in enumerate(sorted(pred["instrument"].unique()))}
    pred["instrument"] = pred["instrument"].map(names)
    pred.to_parquet(run / "pred_test.parquet", index=False)
    shutil.copy(tiny_run / "factors_test.parquet", run / "factors_test.parquet")
    res = ff.analyze_factors(run, out=tmp_path / "fa", progress=False)
    assert res["sectors"]["available"] and (tmp_path / "fa" / "factor_sectors.png").is_file()
    assert len(res["sectors"]["sectors"]) >= 5 and set(res["sectors"]["best_sector"]) == set(res["factors"])
    for name in ("factor_returns.png", "factor_corr.png", "factor_dendrogram.png"):
        assert (tmp_path / "fa" / name).stat().st_size > 10_000
    assert sorted(res["cluster_order"]) == sorted(res["factors"])
    saved = json.loads((tmp_path / "fa" / "factors.json").read_text())
    assert saved["num_factors"] == len(res["factors"]) == 4


def _baselines_file(path: Path, models: dict[str, float], *, robustness: int = 0) -> Path:
    def agg(v: float) -> dict:
        return {k: {"mean": v, "std": 0.001, "values": [v, v, v]} for k in ("ic", "icir", "rank_ic", "rank_icir")}

    data = {"seeds": [0, 1, 2], "models": {m: {"valid": agg(v), "test": agg(v)} for m, v in models.items()}}
    if robustness:
        data["robustness"] = {"m": robustness, "models": {m: agg(v) for m, v in models.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_baselines_and_a_separate_robustness_run_are_both_shown(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _baselines_file(run / "baselines" / "baselines.json", {"lightgbm": 0.0123, "tuned": 0.0456})
    _baselines_file(run / "robustness" / "baselines.json", {"gru": 0.0789}, robustness=50)
    page = rp.build_report(run, out=tmp_path / "r.html", progress=False).read_text()
    metrics = page.split('<section id="metrics">')[1].split("</section>")[0]
    assert "lightgbm (test, 3 seeds)" in metrics and "tuned (test, 3 seeds)" in metrics
    assert "gru (test" not in metrics  # the robustness run's models trained without 50 stocks: no main rows
    assert "Robustness: 50 stocks removed from training" in metrics and "0.0789" in metrics
    _baselines_file(run / "paper_size" / "baselines.json", {"factorvae": 0.0321})  # any other experiment
    page = rp.build_report(run, out=tmp_path / "p.html", progress=False).read_text()
    metrics = page.split('<section id="metrics">')[1].split("</section>")[0]
    main_rows = metrics.split("<h3>")[0]
    assert "lightgbm (test, 3 seeds)" in main_rows and "factorvae (test" not in main_rows
    assert "Baselines in <code>paper_size</code>" in metrics and "factorvae (test, 3 seeds)" in metrics
    assert "0.0321" in metrics
    only = rp.build_report(run, out=tmp_path / "o.html", progress=False,
                           baselines=[run / "robustness" / "baselines.json"]).read_text()
    assert "gru (test, 3 seeds)" in only and "lightgbm" not in only  # a lone file gives its rows too


def test_qlib_cross_check_is_shown_beside_ours(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    rp.build_report(run, out=tmp_path / "first.html", progress=False)  # runs the backtest into run/backtest
    side = {"annual_return": 0.1234, "annual_volatility": 0.2, "sharpe": 0.61, "information_ratio": 0.1,
            "max_drawdown": -0.3}
    (run / "backtest" / "qlib_check.json").write_text(json.dumps(
        {"days": 57, "daily_correlation": {"gross": 0.987, "net": 0.954}, "note": "qlib: shares at the close",
         "ours": {"gross": side, "net": side, "mean_turnover": 0.2},
         "qlib": {"gross": dict(side, annual_return=0.0777), "net": side, "mean_turnover": 0.19}}))
    page = rp.build_report(run, out=tmp_path / "r.html", progress=False).read_text()
    equity = page.split('<section id="equity">')[1].split("</section>")[0]
    assert "qlib TopkDropoutStrategy (gross)" in equity and "7.77" in equity and "0.987" in equity
    assert "Cross-check" not in (tmp_path / "first.html").read_text()


def test_backtest_beside_a_search_is_the_one_reported(tiny_run, tmp_path):
    from fvae import backtest as bt

    exp = _summary(tiny_run, tmp_path)
    assert bt.resolve_predictions(exp) == tiny_run / "pred_test.parquet"  # the best trial's predictions
    assert bt.main(["--pred", str(exp), "--out", str(exp / "backtest"), "--strategy", "topk", "--topk", "7",
                    "--n-drop", "2"]) == 0
    page = rp.build_report(exp, out=tmp_path / "s.html", progress=False).read_text()
    equity = page.split('<section id="equity">')[1].split("</section>")[0]
    assert "k = 7, n = 2" in equity
    empty = tmp_path / "empty_search"
    empty.mkdir()
    (empty / "summary.json").write_text(json.dumps({"trials": [], "best": None}))
    with pytest.raises(bt.DataError, match="no best trial yet"):
        bt.resolve_predictions(empty)


def _section(page: str, sid: str) -> str:
    return page.split(f'<section id="{sid}">')[1].split("</section>")[0]


def _bare_run(tiny_run: Path, tmp: Path, edit: object = None) -> tuple[Path, dict]:
    """A run directory with only (a possibly edited copy of) the tiny run's metrics.json: the risk and
    posterior sections need nothing else, and no backtest or factor analysis runs."""
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    if edit is not None:
        edit(metrics)
    run = tmp / "bare_run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run, metrics


PLANTED = {"valid": {"canonical_corr_posterior": [0.9123, 0.5432], "canonical_corr_prior": [0.4567, 0.1234],
                     "canonical_corr_oracle": [0.9876, 0.8765, 0.7654], "beta_r2": 0.6789, "days": 59}}


def test_risk_posterior_and_recovery_tables_show_the_runs_numbers(tiny_run, tmp_path):
    def ensure_recovery(m: dict) -> None:  # a run from before factor_recovery: plant one
        m.setdefault("factor_recovery", PLANTED)

    run, metrics = _bare_run(tiny_run, tmp_path, ensure_recovery)
    page = rp.build_report(run, out=tmp_path / "r.html", progress=False).read_text()
    assert [s for s in rp.SECTIONS if f'<section id="{s}">' not in page] == []
    assert '<a href="#risk">' in page and '<a href="#posterior">' in page

    # risk: one row per segment with the run's own bias statistics, marked when outside [0.8, 1.25]
    risk = _section(page, "risk")
    assert '<table class="risk">' in risk and "&gt; 1 that risk is under-predicted" in risk
    for seg in ("valid", "test"):
        r = metrics["risk"][seg]
        row = re.search(rf"<tr><td>{seg}</td>(.*?)</tr>", risk).group(1)
        cells = re.findall(r"<td( class=\"off\")?>(.*?)</td>", row)
        assert len(cells) == 5
        for (off, text), key in zip(cells, ("random", "factor", "alpha", "mean_variance")):
            v = r[key]
            assert f"{v:.3f}" in text, (seg, key)
            assert bool(off) == (not 0.8 <= v <= 1.25), (seg, key, v)
        assert cells[4][1] == str(r["days"])
    # and of the calibrated Σ, with the scalars fit on the validation segment
    cal = metrics["risk_calibration"]
    cz = f"{min(cal['c_z']):.3g} … {max(cal['c_z']):.3g} ({len(cal['c_z'])} factors)"
    assert f"c_z = <b>{cz}</b>" in risk and f"c_α = <b>{cal['c_alpha']:.3g}</b>" in risk
    assert f"c_μ = <b>{cal['c_mu']:.3g}</b> (alpha factor)" in risk and "u the alpha factor" in risk
    assert f"with {cal['residual_factors']} residual factors" in risk and cal["residual_factors"] == 10
    for seg in ("valid", "test"):
        row = re.search(rf"<tr><td>{seg} \(calibrated\)</td>(.*?)</tr>", risk).group(1)
        cells = re.findall(r"<td(?: class=\"off\")?>(.*?)</td>", row)
        assert [c.split(" ")[0] for c in cells[:4]] == [f"{metrics['risk_calibrated'][seg][k]:.3f}"
                                                        for k in ("random", "factor", "alpha", "mean_variance")]

    # posterior: one row per epoch, the forecast's and the posterior's Rank IC, the verdict at the best epoch
    post = _section(page, "posterior")
    hist = metrics["history"]
    rows = re.findall(r"<tr><td>(\d+)( \(best\))?</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>",
                      post.split('<table class="posterior">')[1])
    assert [int(r[0]) for r in rows] == [h["epoch"] + 1 for h in hist]
    for r, h in zip(rows, hist):
        assert r[2:] == (f"{h['valid_rank_ic']:.4f}", f"{h['valid_rank_ic_post']:.4f}", str(h["valid_active_factors"]))
        assert bool(r[1]) == (h["epoch"] == metrics["best_epoch"])
    best = next(h for h in hist if h["epoch"] == metrics["best_epoch"])
    k, active = len(best["valid_kl_per_factor"]), best["valid_active_factors"]
    verdict = (f"Posterior collapsed: 0 of {k} factors active" if active == 0
               else f"{active} of {k} factors active at the best epoch")
    assert verdict in post
    assert f"{100 * best['valid_common_share']:.2f}%" in post
    assert post.count("<img") == 1 and "KL per factor" in post

    # factor recovery: one row per canonical pair, posterior / prior / oracle side by side, β R²
    fr = metrics["factor_recovery"]["valid"]
    table = post.split('<table class="recovery">')[1].split("</table>")[0]
    n = max(len(fr[c]) for c in ("canonical_corr_posterior", "canonical_corr_prior", "canonical_corr_oracle"))
    pairs = re.findall(r"<tr><td>pair (\d+)</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>", table)
    assert len(pairs) == n
    for i, (_, *got) in enumerate(pairs):
        for g, col in zip(got, ("canonical_corr_posterior", "canonical_corr_prior", "canonical_corr_oracle")):
            assert g == (f"{fr[col][i]:.3f}" if i < len(fr[col]) else "–"), (i, col)
    assert f"<b>{fr['beta_r2']:.3f}</b>" in post


def test_planted_values_are_marked_and_a_collapse_is_called_one(tiny_run, tmp_path):
    def edit(m: dict) -> None:
        m["risk"] = {"valid": {"random": 0.5, "factor": 1.0, "mean_variance": 2.0, "days": 11},
                     "test": {"random": None, "factor": 1.25, "mean_variance": 0.8, "days": 0}}
        m["risk_calibration"] = {"c_z": 123.456, "c_alpha": 0.002345, "days": 11, "clipped": True,
                                 "fit_segment": "valid"}
        m["risk_calibrated"] = {"valid": {"random": 1.0, "factor": 1.0, "mean_variance": 1.3, "days": 11},
                                "test": {"random": 0.9, "factor": 1.1, "mean_variance": 0.7, "days": 0}}
        m["factor_recovery"] = PLANTED
        for h in m["history"]:
            h["valid_active_factors"] = 0
            h["valid_kl_per_factor"] = [0.0, 0.001, 0.002]

    run, _ = _bare_run(tiny_run, tmp_path, edit)
    page = rp.build_report(run, out=tmp_path / "r.html", progress=False).read_text()
    risk, calibrated = _section(page, "risk").split("<h3>Calibrated risk model</h3>")
    assert risk.count('class="off"') == 2  # 0.5 and 2.0; the band's edges 0.8 and 1.25 are fine
    assert calibrated.count('class="off"') == 2 and "2 calibrated bias statistics outside [0.8, 1.25]" in calibrated
    assert "c_z = <b>123</b>" in calibrated and "c_α = <b>0.00234</b>" in calibrated
    assert "held at a bound" in calibrated and "fit on the valid segment" in calibrated
    assert '<td class="off"><span title="risk over-predicted">0.500 ▼</span></td>' in risk
    assert '<td class="off"><span title="risk under-predicted">2.000 ▲</span></td>' in risk
    assert "<td>1.000</td>" in risk and "<td>–</td>" in risk  # an undefined statistic (null) is a dash
    assert "2 bias statistics outside [0.8, 1.25]" in risk
    post = _section(page, "posterior")
    assert '<p class="verdict bad">Posterior collapsed: 0 of 3 factors active' in post
    assert "<td>pair 3</td><td>–</td><td>–</td><td>0.765</td>" in post  # the oracle has a third pair
    assert "<b>0.679</b>" in post


def test_a_run_without_the_new_fields_still_renders(tiny_run, tmp_path):
    new_keys = ("valid_rank_ic_post", "valid_kl_per_factor", "valid_active_factors", "valid_common_share")

    def old(m: dict) -> None:
        m.pop("risk", None)
        m.pop("factor_recovery", None)
        for h in m["history"]:
            for k in new_keys:
                h.pop(k, None)

    run, metrics = _bare_run(tiny_run, tmp_path, old)
    _baselines_file(run / "baselines.json", {"lightgbm": 0.0123})  # a file from before selected_by
    page = rp.build_report(run, out=tmp_path / "old.html", progress=False).read_text()
    for sid in rp.SECTIONS:
        assert f'<section id="{sid}">' in page
    risk, post = _section(page, "risk"), _section(page, "posterior")
    assert '<table class="risk">' not in risk and "Not available because metrics.json has no bias statistics" in risk
    assert '<table class="posterior">' not in post and "<img" not in post and "verdict" not in post
    assert "no posterior diagnostics" in post
    assert '<table class="recovery">' not in post and "no factor recovery" in post
    assert "building this section failed" not in page
    metrics_sec = _section(page, "metrics")
    assert "selected by" not in metrics_sec and "lightgbm (test, 3 seeds)" in metrics_sec
    assert f"{metrics['test']['rank_ic']:.4f}" in metrics_sec


def test_baselines_table_has_a_selected_by_column(tmp_path):
    path = _baselines_file(tmp_path / "run" / "baselines.json", {"linear": 0.0123, "lightgbm": 0.0456, "gru": 0.01})
    data = json.loads(path.read_text())
    data["selected_by"] = {"linear": "λ by valid Rank ICIR", "lightgbm": "rounds by valid L2 (qlib's rule)"}
    path.write_text(json.dumps(data))
    metrics = {"valid": {"ic": 0.01, "icir": 0.1, "rank_ic": 0.02, "rank_icir": 0.2, "days": 60},
               "ceiling_rank_ic": {"test": 0.15}, "best_epoch": 0, "epochs_run": 1}
    inp = rp.Inputs(source=path.parent, run_dir=path.parent, summary=None, metrics=metrics, data=None, notes={})
    html = rp.section_metrics(inp, [path])
    table = html.split('<table class="metrics">')[1].split("</table>")[0]
    assert "<th>days</th><th>selected by</th></tr>" in table
    rows = dict(re.findall(r"<tr><td>(.*?)</td>(?:<td>.*?</td>){5}<td>(.*?)</td></tr>", table))
    assert rows["linear (valid, 3 seeds)"] == rows["linear (test, 3 seeds)"] == "λ by valid Rank ICIR"
    assert rows["lightgbm (test, 3 seeds)"] == "rounds by valid L2 (qlib&#x27;s rule)"
    assert rows["gru (test, 3 seeds)"] == "–"  # a model the file gives no rule for
    assert rows["FactorVAE (valid)"] == "epoch by valid Rank ICIR" and rows["ceiling: true μ (test)"] == "–"
    del data["selected_by"]
    path.write_text(json.dumps(data))
    table = rp.section_metrics(inp, [path]).split('<table class="metrics">')[1].split("</table>")[0]
    assert "selected by" not in table and "epoch by valid Rank ICIR" not in table
    assert re.search(r"<tr><td>linear \(test, 3 seeds\)</td>(<td>[^<]*</td>){5}</tr>", table)


def test_a_long_history_is_tabulated_on_a_sample_of_epochs():
    hist = [{"epoch": e, "valid_rank_ic": 0.01, "valid_rank_ic_post": 0.1, "valid_active_factors": 2,
             "valid_common_share": 0.3, "valid_kl_per_factor": [0.1, 0.2]} for e in range(80)]
    shown = rp._epoch_rows(hist, 37)
    epochs = [h["epoch"] for h in shown]
    assert len(shown) <= rp.MAX_EPOCH_ROWS and epochs == sorted(set(epochs))
    assert {0, 37, 79} <= set(epochs)
    assert rp._epoch_rows(hist[:10], 3) == hist[:10]
    html = rp.section_posterior(rp.Inputs(source=Path("."), run_dir=None, summary=None,
                                          metrics={"history": hist, "best_epoch": 37}, data=None, notes={}))
    assert f"{len(shown)} of 80 epochs shown" in html and "<td>38 (best)</td>" in html
    assert "2 of 2 factors active at the best epoch" in html
