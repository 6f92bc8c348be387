"""fvae.qlib_model.FactorVAE inside qlib's own workflow (what ``qrun`` runs), on the real S&P 500 slice.

The workflow is the shipped examples/workflow_config_factorvae_Alpha360.yaml, made tiny: the slice of
test_qlib_io (20 symbols, 2015-2016, region us), a 2-epoch model, fvae's own processing instead of
qlib's processors, and the recorder on a SQLite tracking store under the test's folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_qlib_io import panel, panel_file, qdir  # noqa: F401  (the imported slice, as a qlib directory)

from fvae.data import qlib_io

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "workflow_config_factorvae_Alpha360.yaml"
SEGMENTS = {"train": ["2015-04-01", "2015-12-31"], "valid": ["2016-01-04", "2016-06-30"],
            "test": ["2016-07-01", "2016-12-30"]}
TINY_MODEL = {"model": {"hidden_size": 8, "num_factors": 2, "num_portfolios": 4, "attn_heads": 1},
              "train": {"epochs": 2, "patience": 2}, "data": {"batch_days": 32, "non_overlap": False}}


def _tiny_workflow(provider: Path, tmp: Path) -> Path:
    cfg = yaml.safe_load(EXAMPLE.read_text())  # YAML anchors resolve here; the form stays qlib's
    cfg["qlib_init"] = {"provider_uri": str(provider), "region": "us", "kernels": 1,
                        "exp_manager": {"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                                        "kwargs": {"uri": f"sqlite:///{tmp / 'mlruns.db'}",
                                                   "default_exp_name": "Experiment"}}}
    task = cfg["task"]
    handler = task["dataset"]["kwargs"]["handler"]["kwargs"]
    handler.update(instruments="sp500", start_time="2015-01-02", end_time=SEGMENTS["test"][1],
                   fit_start_time=SEGMENTS["train"][0], fit_end_time=SEGMENTS["train"][1],
                   infer_processors=[], learn_processors=[])  # fvae's own processing: fast
    task["dataset"]["kwargs"]["segments"] = SEGMENTS
    task["model"]["kwargs"] = {**TINY_MODEL, "processing": "fvae", "out_dir": str(tmp / "fvae_run")}
    port = task["record"][2]["kwargs"]["config"]
    port["strategy"]["kwargs"].update(topk=5, n_drop=1)
    # the backtest's last day needs a next trading day: the calendar's last but one
    port["backtest"].update(start_time=SEGMENTS["test"][0], end_time="2016-12-29", account=1_000_000,
                            benchmark=["AAPL", "MSFT", "KO"],
                            exchange_kwargs={"codes": "sp500", "limit_threshold": None, "deal_price": "close", "open_cost": 0.0005,
                                             "close_cost": 0.0015, "min_cost": 5})
    path = tmp / "workflow.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_example_workflow_is_qlibs_benchmark_form():
    cfg = yaml.safe_load(EXAMPLE.read_text())
    assert cfg["task"]["model"]["class"] == "FactorVAE" and cfg["task"]["model"]["module_path"] == "fvae.qlib_model"
    assert cfg["task"]["dataset"]["kwargs"]["handler"]["class"] == "Alpha360" and cfg["market"] == "csi300"
    assert [r["class"] for r in cfg["task"]["record"]] == ["SignalRecord", "SigAnaRecord", "PortAnaRecord"]
    assert cfg["qlib_init"]["exp_manager"]["kwargs"]["uri"].startswith("sqlite:///")
    from fvae.qlib_model import FactorVAE

    model = FactorVAE(**cfg["task"]["model"]["kwargs"])  # the example's options are valid fvae options
    assert model.cfg.model.num_factors == 16 and model.cfg.train.lr == 1e-3


def test_unknown_options_are_one_line_errors():
    from fvae.config import ConfigError
    from fvae.qlib_model import FactorVAE

    with pytest.raises(ConfigError, match=r"FactorVAE.model: unknown key 'hiden_size'; did you mean 'hidden_size'"):
        FactorVAE(model={"hiden_size": 8})
    with pytest.raises(ConfigError, match=r"FactorVAE.train.lr: expected a number, got 'fast'"):
        FactorVAE(train={"lr": "fast"})
    with pytest.raises(ConfigError, match=r"FactorVAE.processing: expected one of \['qlib', 'fvae'\]"):
        FactorVAE(processing="sklearn")
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_epochs'"):
        FactorVAE(n_epochs=3)  # type: ignore[call-arg]


def test_qlib_workflow_trains_predicts_and_records(qdir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """qlib.cli.run.workflow (qrun) on the tiny config: the model trains with fvae's loop, and
    SignalRecord, SigAnaRecord and PortAnaRecord write their records, which read back."""
    from qlib.cli.run import workflow
    from qlib.workflow import R

    monkeypatch.chdir(tmp_path)  # MLflow's SQLite store puts artifacts under ./mlruns
    try:
        workflow(str(_tiny_workflow(qdir, tmp_path)), experiment_name="fvae_tiny")
        recorders = R.list_recorders(experiment_name="fvae_tiny")
        assert len(recorders) == 1
        rec = next(iter(recorders.values()))
        pred = rec.load_object("pred.pkl")
        label = rec.load_object("label.pkl")
        ic, ric = rec.load_object("sig_analysis/ic.pkl"), rec.load_object("sig_analysis/ric.pkl")
        report = rec.load_object("portfolio_analysis/report_normal_1day.pkl")
        model = rec.load_object("params.pkl")
    finally:
        qlib_io._QLIB_STATE.clear()  # the workflow re-initialised qlib with its own settings
    # the prediction: one finite score per stock-day of the test segment
    assert list(pred.columns) == ["score"] and pred.index.names == ["datetime", "instrument"]
    days = pred.index.get_level_values(0)
    assert days.min() == pd.Timestamp("2016-07-01") and days.max() == pd.Timestamp("2016-12-30")
    assert pred["score"].notna().all() and pred["score"].std() > 0
    assert pred.index.get_level_values(1).nunique() == 20
    # SigAnaRecord's IC is the daily correlation of the score with the raw label, recomputed here
    both = pred.join(label.iloc[:, 0].rename("label")).dropna()
    mine = both.groupby(level="datetime").apply(lambda g: g["score"].corr(g["label"]))
    pd.testing.assert_series_equal(ic.dropna().sort_index(), mine.dropna().sort_index(), check_names=False,
                                   atol=1e-6)
    assert len(ric.dropna()) == len(mine.dropna()) and all(abs(v) <= 1 for v in ric.dropna())
    assert {"return", "bench", "cost", "turnover"} <= set(report.columns) and len(report) > 100
    assert np.isfinite(report["return"]).all()
    # fvae's run directory beside qlib's records: the loop selected an epoch on validation Rank ICIR
    metrics = (tmp_path / "fvae_run" / "run" / "metrics.json")
    assert metrics.is_file() and model.result["best_epoch"] in (0, 1)
    assert math.isfinite(model.result["history"][0]["valid_rank_icir"])
    assert model.meta.layout == "window" and (model.meta.lookback, model.meta.channels) == (60, 6)
    # the handler's label says when a day's label is realised: the risk model's residual factors lag by it
    assert model.meta.label_expr.replace(" ", "") == "Ref($close,-2)/Ref($close,-1)-1", model.meta.label_expr
    assert json.loads(metrics.read_text())["risk_calibration"]["residual_lag"] == 2


def test_alpha360_frames_become_time_major_windows() -> None:
    """A handler frame in qlib's Alpha360 column order becomes fvae's window layout, each row (T=60, C=6)
    oldest first; any other set of columns is the daily layout."""
    _, names = qlib_io.alpha360_fields()
    idx = pd.MultiIndex.from_product([pd.to_datetime(["2016-01-04", "2016-01-05"]), ["A", "B"]],
                                     names=["datetime", "instrument"])
    values = np.arange(4 * 360, dtype=np.float32).reshape(4, 360)
    raw = qlib_io.raw_from_handler(pd.DataFrame(values, index=idx, columns=names), None, lookback=20)
    assert (raw.layout, raw.lookback, raw.channels) == ("window", 60, 6)
    win = raw.x[1].reshape(60, 6)
    assert win[-1, 0] == values[1, names.index("CLOSE0")] and win[0, 4] == values[1, names.index("VWAP59")]
    daily = qlib_io.raw_from_handler(pd.DataFrame(values[:, :5], index=idx, columns=list("abcde")), None, lookback=7)
    assert (daily.layout, daily.lookback, daily.channels, daily.feature_names) == ("daily", 7, 5, list("abcde"))


def test_qlib_processing_fit_predict_and_pickle(qdir: Path, tmp_path: Path) -> None:  # noqa: F811
    """processing: qlib on qlib's own processors (the benchmark's RobustZScoreNorm + Fillna, DropnaLabel +
    CSRankNorm): predict scores every test row, and the model qlib's recorder pickles predicts the same."""
    import pickle

    from qlib.data.dataset import DatasetH
    from qlib.utils import init_instance_by_config

    from fvae.qlib_model import FactorVAE

    qlib_io.init_qlib(qdir, region="us")
    seg = {"train": ["2015-04-01", "2015-12-31"], "valid": ["2016-01-04", "2016-03-31"],
           "test": ["2016-04-01", "2016-05-31"]}
    cfg = yaml.safe_load(EXAMPLE.read_text())["task"]["dataset"]
    kw = cfg["kwargs"]["handler"]["kwargs"]
    kw.update(instruments="tiny", start_time="2015-01-02", end_time=seg["test"][1], fit_start_time=seg["train"][0],
              fit_end_time=seg["train"][1])
    cfg["kwargs"]["segments"] = seg
    dataset = init_instance_by_config(cfg, accept_types=DatasetH)
    model = FactorVAE(**TINY_MODEL, processing="qlib").fit(dataset)
    pred = model.predict(dataset)
    want = dataset.prepare("test", col_set="feature").index
    assert pred.index.equals(want) and pred.notna().all() and pred.std() > 0
    again = pickle.loads(pickle.dumps(model)).predict(dataset, segment="test")
    pd.testing.assert_series_equal(again, pred)
    with pytest.raises(Exception, match="not one of"):
        model.predict(dataset, segment="holdout")
