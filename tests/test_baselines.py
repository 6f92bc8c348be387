"""fvae.baselines: the ridge against a direct solve and the known ceiling, the seed statistics,
and a robustness evaluation that sees the held-out stocks only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fvae import baselines as bl
from fvae.data.loader import load_panel
from fvae.data.shards import read_meta


@pytest.fixture(scope="module")
def split(tiny_market):
    return bl.load_split(tiny_market)


def test_linear_is_positive_and_below_the_ceiling(tiny_market):
    res = bl.fit_linear(tiny_market, seed=0)
    ceiling = read_meta(tiny_market).extra["ceiling_rank_ic"]["test"]
    assert 0.0 < res["test"]["rank_ic"] < ceiling
    assert res["test"]["days"] == read_meta(tiny_market).days["test"]
    assert set(res["valid"]) >= {"ic", "icir", "rank_ic", "rank_icir"}


def test_ridge_statistics_equal_a_direct_solve(split):
    """The batched sufficient statistics give the same weights as ridge on the explicit design."""
    fit = bl.fit_ridge(split, grid=(0.1,))
    x, y, _ = bl.flat_rows(split.train, np.arange(split.train.num_days))
    X, Y = x.double().numpy(), y.double().numpy()
    Xc, Yc = X - X.mean(0), Y - Y.mean()
    A = Xc.T @ Xc
    lam = 0.1 * np.linalg.eigvalsh(A).clip(min=0).mean()
    w = np.linalg.solve(A + lam * np.eye(A.shape[0]), Xc.T @ Yc)
    np.testing.assert_allclose(fit["weights"].numpy(), w, rtol=1e-6, atol=1e-9)
    assert fit["intercept"] == pytest.approx(Y.mean() - X.mean(0) @ w, abs=1e-9)
    # the window rows are the loader's (B, N, T, C) windows flattened time-major
    b = split.train.batch(np.array([5]))
    np.testing.assert_array_equal(bl.flat_rows(split.train, np.array([5]))[0][0].numpy(),
                                  b.x[0, 0].reshape(-1).numpy())


def test_mean_and_std_over_seeds():
    vals = {"valid": [0.01, 0.03, 0.05], "test": [0.02, math.nan, 0.04]}
    runs = [{seg: {m: v[i] * (j + 1) for j, m in enumerate(bl.METRICS)} for seg, v in vals.items()}
            for i in range(3)]
    agg = bl.aggregate(runs)
    for j, m in enumerate(bl.METRICS):
        v = np.array(vals["valid"]) * (j + 1)
        assert agg["valid"][m]["mean"] == pytest.approx(v.mean())
        assert agg["valid"][m]["std"] == pytest.approx(np.std(v, ddof=1))
        t = np.array([0.02, 0.04]) * (j + 1)  # the undefined seed is skipped, and reported as None
        assert agg["test"][m]["mean"] == pytest.approx(t.mean())
        assert agg["test"][m]["std"] == pytest.approx(np.std(t, ddof=1))
        assert agg["test"][m]["values"][1] is None
    one = bl.aggregate(runs[:1])
    assert one["valid"]["rank_ic"]["std"] is None and one["valid"]["rank_ic"]["mean"] == pytest.approx(0.01 * 3)
    table = bl.markdown_table({"models": {"x": agg}})
    assert "| x | 0.0900 ± 0.0600 |" in table


def test_robustness_scores_held_out_stocks_only(split, tiny_market, tmp_path):
    hold = bl.choose_holdout(split, 10, seed=0)
    assert len(hold) == 10 and hold == bl.choose_holdout(split, 10, seed=0) != bl.choose_holdout(split, 10, seed=1)
    masked = bl.load_split(tiny_market, holdout=hold)
    cols = np.isin(masked.train.instruments, hold)
    assert not masked.train.valid[:, cols].any()
    assert not masked.valid.valid[:, np.isin(masked.valid.instruments, hold)].any()
    assert masked.train.valid[:, ~cols].any()
    tcols = np.isin(masked.test.instruments, hold)
    assert torch.equal(masked.test.valid, split.test.valid) and masked.test.valid[:, tcols].any()

    # the score over held-out stocks is the daily Spearman over those stocks alone ...
    test = split.test
    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.normal(size=(test.num_days, len(test.instruments))))
    got = bl.score(pred, test, stocks=hold)
    rows = []
    for d in range(test.num_days):
        v = test.valid[d].numpy() & tcols
        if v.sum() >= 2:
            rows.append(pd.Series(pred[d].numpy()[v]).corr(pd.Series(test.ret[d].numpy()[v]), method="spearman"))
    assert got["rank_ic"] == pytest.approx(np.nanmean(rows), abs=1e-9)
    # ... so whatever is predicted for the other stocks does not matter
    other = pred.clone()
    other[:, ~torch.from_numpy(tcols)] = 1e6 * torch.from_numpy(rng.normal(size=(test.num_days, int((~tcols).sum()))))
    assert bl.score(other, test, stocks=hold) == got

    # the shard copy FactorVAE trains on: labels of held-out stocks gone before the test segment only
    copy = bl.write_holdout_copy(tiny_market, tmp_path / "copy", hold)
    tr = load_panel(copy, "train")
    assert not tr.valid[:, np.isin(tr.instruments, hold)].any()
    te = load_panel(copy, "test")
    assert torch.equal(te.valid, test.valid) and torch.equal(te.feat, test.feat)
    assert read_meta(copy).extra["holdout_stocks"] == hold


def test_cli_seeds_and_robustness(tiny_market, tmp_path, capsys):
    out = tmp_path / "bl"
    rc = bl.main(["--data", str(tiny_market), "--out", str(out), "--models", "linear,mlp,factorvae",
                  "--seeds", "0,1", "--debug", "--epochs", "2", "--robustness", "10"])
    assert rc == 0
    res = json.loads((out / "baselines.json").read_text())
    assert set(res["models"]) == {"linear", "mlp", "factorvae"} and res["seeds"] == [0, 1]
    # the ridge is deterministic; it differs across seeds here only because each seed holds out other stocks
    assert res["models"]["linear"]["test"]["rank_ic"]["std"] > 0
    assert len(res["models"]["mlp"]["test"]["rank_ic"]["values"]) == 2
    rob = res["robustness"]
    assert rob["m"] == 10 and set(rob["models"]) == {"linear", "mlp", "factorvae"}
    assert all(len(v) == 10 for v in rob["holdout_stocks"].values())
    runs = json.loads((out / "runs.json").read_text())
    for r in runs["factorvae"]:  # FactorVAE trained on the copy without the held-out stocks
        meta = read_meta(out / f"holdout_data_seed{r['seed']}")
        assert meta.extra["holdout_stocks"] == r["holdout_stocks"]
        assert math.isfinite(r["holdout"]["rank_ic"])
        # the factor model's figures are the run's own metrics.json's, at its best epoch
        m = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        best = next(h for h in m["history"] if h["epoch"] == m["best_epoch"])
        assert r["factor_model"]["active_factors"] == best["valid_active_factors"]
        assert r["factor_model"]["risk"]["test"] == m["risk"]["test"]
    fm = res["factor_model"]
    assert list(fm) == ["factorvae"]  # networks without a factor model have none
    vals = [r["factor_model"]["rank_ic_post"] for r in runs["factorvae"]]
    assert fm["factorvae"]["rank_ic_post"]["mean"] == pytest.approx(sum(vals) / 2)
    assert fm["factorvae"]["risk"]["test"]["random"]["std"] is not None
    printed = capsys.readouterr().out
    assert "| model | valid Rank IC" in printed and "Robustness" in printed
    assert bl.main(["--data", str(tiny_market), "--out", str(out), "--models", "lasso"]) == 2


def test_interrupted_call_resumes_finished_runs(tiny_market, tmp_path, capsys):
    out = tmp_path / "bl"
    args = ["--data", str(tiny_market), "--out", str(out), "--models", "linear,mlp", "--seeds", "0,1",
            "--debug", "--epochs", "1", "--day-fraction", "0.5"]
    assert bl.main(args) == 0
    first = json.loads((out / "baselines.json").read_text())
    assert first["config"]["day_fraction"] == 0.5
    # an interruption after three of the four runs: runs.json holds what was finished
    runs = json.loads((out / "runs.json").read_text())
    lost = runs["mlp"].pop()
    (out / "runs.json").write_text(json.dumps(runs))
    capsys.readouterr()
    assert bl.main(args) == 0
    printed = capsys.readouterr().out
    assert "3 of 4 runs already done" in printed
    assert printed.count("[baselines] mlp seed") == 2  # one epoch line and one result line: seed 1 only
    again = json.loads((out / "runs.json").read_text())
    assert again["mlp"][-1]["seed"] == lost["seed"]
    assert again["mlp"][-1]["test"]["rank_ic"] == pytest.approx(lost["test"]["rank_ic"], abs=1e-6)
    # other options: nothing is reused
    assert bl.main([*args[:-1], "1.0"]) == 0
    assert "starting afresh" in capsys.readouterr().out


def test_day_fraction_is_checked(tiny_market, tmp_path, capsys):
    assert bl.main(["--data", str(tiny_market), "--out", str(tmp_path), "--day-fraction", "0"]) == 2
    assert "--day-fraction: expected 0 < value <= 1, got 0.0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpu_without_cuda_is_a_one_line_error(tiny_market, tmp_path, capsys):
    assert bl.main(["--data", str(tiny_market), "--out", str(tmp_path), "--models", "mlp", "--gpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpu: no CUDA device is visible"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_split_scores_as_the_cpu_one(split, tiny_market):
    """The networks' cuda copy of a split gives the CPU's scores, holdout scoring included."""
    cuda = torch.device("cuda", 0)
    on = bl.split_on(split, cuda)
    assert bl.split_on(on, cuda) is on and on.test.feat.device.type == "cuda"
    pred = torch.randn(split.test.num_days, len(split.test.instruments), generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    stocks = list(split.test.instruments[:5])
    for kw in ({}, {"stocks": stocks}):
        cpu, gpu = bl.score(pred, split.test, **kw), bl.score(pred.to(cuda), on.test, **kw)
        assert cpu.keys() == gpu.keys() and all(math.isclose(cpu[k], gpu[k], rel_tol=1e-9) for k in cpu)
    res = bl.fit_network("gru", on, cfg=bl.DEBUG, seed=0, holdout=stocks, progress=False)
    assert math.isfinite(res["test"]["rank_ic"]) and math.isfinite(res["holdout"]["rank_ic"])


def test_tuned_model_keeps_its_extensions(tiny_market, tmp_path, capsys):
    import yaml

    tuned = tmp_path / "best_config.yaml"
    tuned.write_text(yaml.safe_dump({"model": {"hidden_size": 8, "num_factors": 2, "num_portfolios": 4,
                                               "gat_layers": 1, "gat_heads": 2},
                                     "train": {"epochs": 1}, "data": {"batch_days": 16}}))
    out = tmp_path / "bl"
    assert bl.main(["--data", str(tiny_market), "--out", str(out), "--models", "factorvae", "--seeds", "3",
                    "--debug", "--tuned-config", str(tuned)]) == 0
    res = json.loads((out / "baselines.json").read_text())
    assert list(res["models"]) == ["factorvae", "tuned"]
    assert "| tuned |" in capsys.readouterr().out
    paper = yaml.safe_load((out / "factorvae_seed3" / "config.yaml").read_text())
    mine = yaml.safe_load((out / "tuned_seed3" / "config.yaml").read_text())
    assert paper["model"]["gat_layers"] == 0
    assert mine["model"]["gat_layers"] == 1 and mine["model"]["gat_heads"] == 2 and mine["train"]["seed"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hiden_size: 8}\n")
    assert bl.main(["--data", str(tiny_market), "--out", str(out), "--tuned-config", str(bad)]) == 2
    assert "hiden_size" in capsys.readouterr().err
    assert bl.main(["--data", str(tiny_market), "--out", str(out), "--tuned-config", str(tmp_path / "no")]) == 2
    assert "--tuned-config:" in capsys.readouterr().err


def test_lightgbm_finds_the_planted_signal_with_qlibs_settings(tiny_market):
    split = bl.load_split(tiny_market)
    a = bl.fit_lightgbm(split, seed=0, progress=False)
    b = bl.fit_lightgbm(split, seed=0, progress=False)
    c = bl.fit_lightgbm(split, seed=1, progress=False)
    assert a["test"]["rank_ic"] == b["test"]["rank_ic"]  # a seed fixes the run
    assert a["test"]["rank_ic"] != c["test"]["rank_ic"]  # and column sampling depends on it
    assert 1 <= a["best_iteration"] <= bl.LGB_ROUNDS
    ceiling = split.meta.extra["ceiling_rank_ic"]["test"]
    assert a["test"]["rank_ic"] > 0.2 * ceiling, (a["test"], ceiling)
