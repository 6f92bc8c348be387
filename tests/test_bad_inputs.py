"""Bad inputs, one test each (issue 15, section 2): one ``error:`` line naming what and where, exit 2,
and nothing written; or, for a legal but suspicious input, one ``warning:`` line that is recorded.

The CLIs run in this process (``main(argv)``); no test here starts Ray: every check runs before it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from fvae import backtest, baselines, factors, report
from fvae import train as ftrain
from fvae import tune as ftune
from fvae.data import __main__ as fdata

ROOT = Path(__file__).resolve().parents[1]


def fails(capsys: pytest.CaptureFixture, main, argv: list, *needles: str) -> str:
    """``main(argv)`` exits 2 with exactly one stderr line, ``error: ...``, holding every needle."""
    rc = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def train_argv(data: Path, out: Path, *extra: str) -> list:
    # a quarter of the training days, one epoch: a run in seconds
    return ["--data", data, "--out", out, "--debug", "--set", "train.epochs=1", "--set", "data.day_fraction=0.25",
            *extra]


@pytest.fixture(scope="module")
def run_dir(tiny_market, tmp_path_factory) -> Path:
    """A finished one-epoch debug run of the tiny market."""
    out = tmp_path_factory.mktemp("bad_inputs") / "run"
    assert ftrain.main([str(a) for a in train_argv(tiny_market, out)]) == 0
    return out


def shard_copy(tiny_market: Path, tmp_path: Path, edit) -> tuple[Path, Path]:
    """A copy of the tiny market whose last shard file is rewritten by ``edit(table) -> table``."""
    data = tmp_path / "data"
    shutil.copytree(tiny_market, data)
    last = data / json.loads((data / "meta.json").read_text())["shards"][-1]["file"]
    pq.write_table(edit(pq.read_table(last)), last)
    return data, last


def _feature(tiny_market: Path) -> str:
    return json.loads((tiny_market / "meta.json").read_text())["feature_names"][0]


# --------------------------------------------------------------------------- shards (#1, #2, #3, #26)


def test_01_string_feature_column(tiny_market, tmp_path, capsys):
    f = _feature(tiny_market)
    data, last = shard_copy(tiny_market, tmp_path,
                            lambda t: t.set_column(t.schema.get_field_index(f), f, pc.cast(t.column(f), pa.string())))
    fails(capsys, ftrain.main, train_argv(data, tmp_path / "run"), str(last), f"'{f}'", "string", "expected float")
    assert not (tmp_path / "run").exists()


def test_02_feature_column_missing_from_one_file(tiny_market, tmp_path, capsys):
    f = _feature(tiny_market)
    data, last = shard_copy(tiny_market, tmp_path, lambda t: t.drop([f]))
    fails(capsys, ftrain.main, train_argv(data, tmp_path / "run"), str(last), f"column '{f}' is missing")
    assert not (tmp_path / "run").exists()


def test_03_deleted_shard_fails_before_training(tiny_market, tmp_path, capsys):
    data, last = shard_copy(tiny_market, tmp_path, lambda t: t)
    last.unlink()  # the test segment's shard: read only after the last epoch before
    fails(capsys, ftrain.main, train_argv(data, tmp_path / "run"), str(last), "missing")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("column", ["label", "ret"])
def test_26_inf_label_or_return(tiny_market, tmp_path, capsys, column):
    def edit(t: pa.Table) -> pa.Table:
        v = t.column(column).to_numpy().copy()
        v[5] = np.inf
        return t.set_column(t.schema.get_field_index(column), column, pa.array(v, pa.float32()))

    data, last = shard_copy(tiny_market, tmp_path, edit)
    fails(capsys, ftrain.main, train_argv(data, tmp_path / "run"), str(last), f"'{column}'", "1 inf")
    assert not (tmp_path / "run").exists()


def test_run_failing_on_its_data_leaves_no_folder(tiny_market, tmp_path, capsys):
    # found while the panel is read, after the run folder was made: the folder goes again
    fails(capsys, ftrain.main, train_argv(tiny_market, tmp_path / "run", "--set", "data.handler=Alpha360"),
          "data.handler asks for 'Alpha360'")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- fvae.train options (#4-#9, #27)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_04_non_finite_learning_rate(tiny_market, tmp_path, capsys, value):
    fails(capsys, ftrain.main, train_argv(tiny_market, tmp_path / "run", "--set", f"train.lr={value}"),
          "train.lr", "finite")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_05_gpu_without_a_gpu(tiny_market, tmp_path, capsys):
    fails(capsys, ftrain.main, train_argv(tiny_market, tmp_path / "run", "--gpu"), "--gpu", "no CUDA device")
    assert not (tmp_path / "run").exists()


def test_05b_cuda_graph_without_a_gpu(tiny_market, tmp_path, capsys):
    fails(capsys, ftrain.main, train_argv(tiny_market, tmp_path / "run", "--set", "train.cuda_graph=true"),
          "train.cuda_graph", "--gpu")


def test_06_out_is_a_file(tiny_market, tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    fails(capsys, ftrain.main, train_argv(tiny_market, tmp_path / "run"), "--out", "not a folder")
    assert (tmp_path / "run").read_text() == "not a folder"


def test_07_resume_with_another_config_names_the_keys(tiny_market, run_dir, capsys):
    before = (run_dir / "checkpoints" / "last" / "state.pt").stat().st_mtime_ns
    msg = fails(capsys, ftrain.main, train_argv(tiny_market, run_dir, "--resume", "--set", "model.hidden_size=32"),
                "--resume", "model.hidden_size (checkpoint 16, now 32)")
    assert "state_dict" not in msg
    assert (run_dir / "checkpoints" / "last" / "state.pt").stat().st_mtime_ns == before


def test_08_config_file_section_that_is_not_a_mapping(tiny_market, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train: 5\n")
    msg = fails(capsys, ftrain.main, train_argv(tiny_market, tmp_path / "run", "--config", tmp_path / "c.yaml"),
                str(tmp_path / "c.yaml"), "'train' must be a section", "got 5")
    assert "--set" not in msg


def test_09_negative_workers(tiny_market, tmp_path, capsys):
    fails(capsys, ftrain.main, train_argv(tiny_market, tmp_path / "run", "--workers", "-2"), "--workers", "got -2")
    assert not (tmp_path / "run").exists()


def test_27_finished_run_folder_is_refused_without_resume(tiny_market, run_dir, capsys):
    before = (run_dir / "metrics.json").read_bytes()
    fails(capsys, ftrain.main, train_argv(tiny_market, run_dir, "--set", "model.hidden_size=8"),
          str(run_dir), "already holds a training run", "--resume", "--overwrite")
    assert (run_dir / "metrics.json").read_bytes() == before


def test_27_overwrite_replaces_the_run_whole_and_an_interrupted_one_leaves_it(run_dir, tiny_market, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "stale.txt").write_text("from the old run")
    old = {p: p.read_bytes() for p in (out / "metrics.json", out / "best.pt")}
    again = [str(a) for a in train_argv(tiny_market, out, "--overwrite", "--set", "train.seed=7")]

    def killed(row, *, epochs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed after the new run's first epoch
        m.setattr(ftrain, "_print_epoch", killed)
        assert ftrain.main(again) == 130  # Ctrl-C: one line, the exit status of SIGINT
    assert {p: p.read_bytes() for p in old} == old and (out / "stale.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]

    assert ftrain.main(again) == 0
    assert not (out / "stale.txt").exists()  # nothing of the old run is left to mix with the new one
    assert (out / "metrics.json").read_bytes() != old[out / "metrics.json"]
    assert ftrain.load_state(out / "checkpoints" / "last")["config"]["train"]["seed"] == 7
    assert torch.load(out / "best.pt", weights_only=False)["config"]["train"]["seed"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


# --------------------------------------------------------------------------- fvae.data (#10, #11, #19-#25)


@pytest.mark.parametrize("argv, needle", [
    (["--stocks", "0"], "--stocks: expected at least 2, got 0"),
    (["--stocks", "10", "--days", "15"], "--days: expected at least 3 x lookback (20) = 60, got 15"),
])
def test_10_11_synthetic_sizes(tmp_path, capsys, argv, needle):
    fails(capsys, fdata.main, ["synthetic", "--out", tmp_path / "syn", *argv], needle)
    assert not (tmp_path / "syn").exists()


def test_19_export_into_a_training_run_folder(run_dir, tmp_path, capsys):
    before = sorted(p.name for p in run_dir.iterdir())
    fails(capsys, fdata.main, ["export", "--provider-uri", tmp_path / "qlib", "--region", "us", "--market", "m",
                               "--handler", "Alpha360", "--train", "2015-01-01:2015-06-30",
                               "--valid", "2015-07-01:2015-09-30", "--test", "2015-10-01:2015-12-31",
                               "--out", run_dir], f"--out {run_dir}", "holds a training run")
    fails(capsys, fdata.main, ["synthetic", "--out", run_dir, "--stocks", "10", "--days", "100"],
          "holds a training run")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def _ohlcv() -> pd.DataFrame:
    """Three symbols over 30 business days of clean prices."""
    rng = np.random.default_rng(0)
    days = pd.bdate_range("2015-01-02", periods=30)
    parts = []
    for sym in ("AAA", "BBB", "CCC"):
        c = 10 * np.exp(np.cumsum(rng.normal(0, 0.01, len(days))))
        parts.append(pd.DataFrame({"symbol": sym, "date": days, "open": c, "high": c * 1.01, "low": c * 0.99,
                                   "close": c, "volume": rng.integers(1000, 2000, len(days)).astype(float)}))
    return pd.concat(parts, ignore_index=True)


def _set(df: pd.DataFrame, rows, cols, value) -> pd.DataFrame:
    df.loc[rows, cols] = value
    return df


@pytest.mark.parametrize("edit, needles", [
    (lambda d: _set(d, 5, "low", -1.0), ["'low'", "1 negative", "AAA on 2015-01-09"]),
    (lambda d: _set(d, 5, "close", np.inf), ["'close'", "1 inf", "AAA on 2015-01-09"]),
    (lambda d: _set(d, 35, "open", -np.inf), ["'open'", "1 inf", "BBB on 2015-01-09"]),
    (lambda d: _set(d, slice(None), "volume", 0.0), ["'volume' is 0 or missing on every row"]),
    (lambda d: _set(d, d["symbol"] == "CCC", "close", np.nan), ["symbol 'CCC'", "no 'close'"]),
], ids=["negative", "inf", "minus_inf", "all_zero_volume", "all_nan_close"])
def test_20_25_import_ohlcv_prices_that_cannot_be_right(tmp_path, capsys, edit, needles):
    src = tmp_path / "ohlcv.parquet"
    edit(_ohlcv()).to_parquet(src)
    fails(capsys, fdata.main, ["import-ohlcv", src, "--out", tmp_path / "q", "--market", "m"], str(src), *needles)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("edit, needle, count", [
    (lambda d: _set(d, [5, 6], "close", 0.0), "2 row(s) with a zero price", ("zero_price_rows", 2)),
    (lambda d: _set(d, 7, ["high", "low"], [9.0, 11.0]), "1 row(s) with high < low", ("high_below_low_rows", 1)),
    (lambda d: _set(d, d["symbol"] == "BBB", "volume", 0.0), "1 symbol(s) with volume 0 on every row",
     ("zero_volume_symbols", 1)),
], ids=["zero_price", "high_below_low", "never_traded"])
def test_20_25_import_ohlcv_suspicious_prices_warn_once_and_are_recorded(tmp_path, capsys, edit, needle, count):
    from fvae.data.qlib_io import read_bin

    src = tmp_path / "ohlcv.parquet"
    edit(_ohlcv()).to_parquet(src)
    assert fdata.main(["import-ohlcv", str(src), "--out", str(tmp_path / "q"), "--market", "m"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: ") and needle in err[0], err
    info = json.loads((tmp_path / "q" / "fvae_import.json").read_text())
    assert info["status"] == "complete" and info["price_checks"][count[0]] == count[1]
    assert len(info["warnings"]) == 1 and needle in info["warnings"][0]
    if count[0] == "zero_price_rows":  # the zero close became a missing bar, not a price of 0
        _, close = read_bin(tmp_path / "q" / "features" / "aaa" / "close.day.bin")
        assert np.isnan(close[5:7]).all() and np.isfinite(close[:5]).all()


# --------------------------------------------------------------------------- fvae.tune (#12-#14)


@pytest.mark.parametrize("argv, needle", [
    (["--num-samples", "0"], "--num-samples: expected at least 1 trial, got 0"),
    (["--num-samples", "-3"], "--num-samples: expected at least 1 trial, got -3"),
    (["--workers-per-trial", "0"], "--workers-per-trial: expected at least 1 Ray Train worker, got 0"),
], ids=["num_samples_0", "num_samples_negative", "workers_per_trial_0"])
def test_13_14_search_options_before_ray_starts(tmp_path, capsys, argv, needle):
    # no --data: a synthetic market would be generated into --out; the options fail first
    fails(capsys, ftune.main, ["--space", ROOT / "search_spaces" / "smoke.yaml", "--out", tmp_path / "exp", *argv],
          needle)
    assert not (tmp_path / "exp").exists()


def test_12_unknown_metric_in_a_space_file(tmp_path, capsys):
    text = (ROOT / "search_spaces" / "smoke.yaml").read_text().replace("metric: valid_rank_icir",
                                                                      "metric: valid_rank_icirr")
    (tmp_path / "space.yaml").write_text(text)
    fails(capsys, ftune.main, ["--space", tmp_path / "space.yaml", "--num-samples", "1", "--out", tmp_path / "exp"],
          "space.yaml", "valid_rank_icirr", "did you mean 'valid_rank_icir'")
    assert not (tmp_path / "exp").exists()


# --------------------------------------------------------------------------- backtest, report (#15-#18)


@pytest.fixture
def pred(run_dir, tmp_path):
    """Write an edited copy of the run's test predictions; returns its path."""
    def write(edit) -> Path:
        path = tmp_path / "pred_test.parquet"
        edit(pd.read_parquet(run_dir / "pred_test.parquet")).to_parquet(path)
        return path

    return write


def _bt(path: Path, out: Path, *data) -> list:
    return ["--pred", path, "--out", out, "--strategy", "topk", "--topk", "5", "--n-drop", "1", *data]


def test_15_backtest_on_all_nan_predictions(pred, tmp_path, capsys):
    path = pred(lambda d: d.assign(score=np.nan))
    fails(capsys, backtest.main, _bt(path, tmp_path / "bt"), str(path), "'score' has no finite value")
    assert not (tmp_path / "bt").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.assign(datetime=d["datetime"] + pd.Timedelta(days=3650)), "no realised return"),
    (lambda d: d.assign(instrument="X" + d["instrument"].astype(str)), "none of its"),
], ids=["no_common_days", "no_common_instruments"])
def test_16_17_backtest_on_predictions_from_other_data(pred, tiny_market, tmp_path, capsys, edit, needle):
    path = pred(edit)
    fails(capsys, backtest.main, _bt(path, tmp_path / "bt", "--data", tiny_market), str(path), needle,
          "were the predictions made on this data?")
    assert not (tmp_path / "bt").exists()


def test_18_report_with_a_missing_baselines_file(run_dir, tmp_path, capsys):
    fails(capsys, report.main, [run_dir, "--out", tmp_path / "r.html", "--baselines", tmp_path / "nope.json"],
          f"--baselines {tmp_path / 'nope.json'}", "not found")
    assert not (tmp_path / "r.html").exists()


# --------------------------------------------------------------------------- smaller leftovers


def test_factors_with_a_bad_sectors_csv_write_nothing(run_dir, tmp_path, capsys):
    (tmp_path / "sectors.csv").write_text("ticker,industry\nAAA,Tech\n")
    fails(capsys, factors.main, [run_dir, "--out", tmp_path / "factors", "--sectors", tmp_path / "sectors.csv"],
          "sectors.csv", "Symbol and Sector")
    assert not (tmp_path / "factors").exists()
    fails(capsys, factors.main, [tmp_path / "no_run"], "pred_test.parquet", "not found")
    assert not (tmp_path / "no_run").exists()


def test_baselines_robustness_with_an_impossible_m_writes_nothing(tiny_market, tmp_path, capsys):
    fails(capsys, baselines.main, ["--data", tiny_market, "--out", tmp_path / "bl", "--models", "linear",
                                   "--seeds", "0", "--robustness", "500"], "--robustness", "got 500")
    assert not (tmp_path / "bl").exists()
