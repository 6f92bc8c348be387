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
