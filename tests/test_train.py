"""The standalone training loop: outputs, resume equivalence, TensorBoard, non-finite losses."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fvae import config as fconfig
from fvae.model import FactorVAE
from fvae.train import DEBUG_PRESET, Config, NonFiniteLossError, load_config, load_state, run_standalone


def _cfg(*extra: str) -> Config:
    return load_config(None, [*DEBUG_PRESET, *extra])


@pytest.fixture(scope="module")
def debug_run(tiny_market, tmp_path_factory):
    out = tmp_path_factory.mktemp("debug_run")
    result = run_standalone(_cfg(), data=tiny_market, out=out)
    return out, result


def test_run_writes_every_output(debug_run, tiny_market):
    out, result = debug_run
    for name in ["config.yaml", "best.pt", "metrics.json", "curves.png", "checkpoints/last/state.pt",
                 "pred_valid.parquet", "pred_test.parquet", "pred_test.pkl", "factors_test.parquet"]:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for seg in ("valid", "test"):
        assert set(metrics[seg]) >= {"ic", "icir", "rank_ic", "rank_icir"}
        assert all(math.isfinite(metrics[seg][k]) for k in ("ic", "rank_ic"))
    assert len(metrics["history"]) == 2 and metrics["ceiling_rank_ic"]["test"] > 0
    # the saved config re-runs: it reads back to the same Config
    assert fconfig.load(Config, path=out / "config.yaml") == _cfg()


def test_predictions_cover_every_test_stock_day(debug_run, tiny_market):
    out, _ = debug_run
    from fvae.data.shards import read_meta

    meta = read_meta(tiny_market)
    pred = pd.read_parquet(out / "pred_test.parquet")
    assert len(pred) == meta.rows["test"]
    assert not pred.duplicated(["datetime", "instrument"]).any()
    assert {"score", "sigma", "beta_0", "beta_3"} <= set(pred.columns) and (pred["sigma"] > 0).all()
    # qlib's pred.pkl layout: MultiIndex (datetime, instrument), one 'score' column
    pkl = pd.read_pickle(out / "pred_test.pkl")
    assert list(pkl.index.names) == ["datetime", "instrument"] and list(pkl.columns) == ["score"]
    assert np.allclose(pkl["score"].to_numpy(), pred["score"].to_numpy())
    # metrics.json's test Rank IC is the mean daily Spearman of these very predictions
    daily = pred.groupby("datetime").apply(lambda g: g["score"].corr(g["label"], method="spearman"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["rank_ic"] == pytest.approx(daily.mean(), abs=1e-6)


def test_tensorboard_event_files_read_back(debug_run):
    out, _ = debug_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/nll", "train/kl", "train/lr", "valid/rank_icir", "valid/ic"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/nll")] == [1, 2]
    hp = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hp and "_hparams_/session_start_info" in hp
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model.hidden_size"].number_value == 16


def test_resume_gives_the_same_result(tiny_market, tmp_path):
    """Interrupted after epoch 2 of 4 and resumed == uninterrupted, exactly."""
    cfg = _cfg("train.epochs=4", "train.patience=0")
    full = run_standalone(cfg, data=tiny_market, out=tmp_path / "full")

    def interrupt(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_standalone(cfg, data=tiny_market, out=tmp_path / "cut", on_epoch_end=interrupt)
    state = load_state(tmp_path / "cut" / "checkpoints" / "last")
    assert state["epoch"] == 1 and state["fingerprint"] and state["config"]["train"]["epochs"] == 4
    resumed = run_standalone(cfg, data=tiny_market, out=tmp_path / "cut", resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    a = torch.load(tmp_path / "full" / "best.pt")["model"]
    b = torch.load(tmp_path / "cut" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"]["rank_ic"] == full["test"]["rank_ic"]


def test_resume_refuses_other_data(tiny_market, tmp_path):
    from fvae.data.shards import DataError
    from fvae.data.synthetic import SyntheticConfig, write_synthetic

    other = tmp_path / "other"
    write_synthetic(other, SyntheticConfig(stocks=60, days=300, seed=2))
    run_standalone(_cfg("train.epochs=1"), data=tiny_market, out=tmp_path / "run")
    with pytest.raises(DataError, match="fingerprint differs"):
        run_standalone(_cfg("train.epochs=2"), data=other, out=tmp_path / "run", resume=True)


def _nan_every_other_step(monkeypatch):
    original = FactorVAE.forward
    calls = {"n": 0}

    def forward(self, x, y, mask):
        parts = original(self, x, y, mask)
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            parts.loss = parts.loss * float("nan")
        return parts

    monkeypatch.setattr(FactorVAE, "forward", forward)


def test_nonfinite_loss_raises_when_asked(tiny_market, tmp_path, monkeypatch):
    _nan_every_other_step(monkeypatch)
    with pytest.raises(NonFiniteLossError, match="train.nonfinite=raise"):
        run_standalone(_cfg("train.nonfinite=raise"), data=tiny_market, out=tmp_path / "r")


def test_nonfinite_steps_are_skipped_counted_and_capped(tiny_market, tmp_path, monkeypatch):
    _nan_every_other_step(monkeypatch)
    res = run_standalone(_cfg("train.epochs=1", "train.max_skipped_fraction=0.6"), data=tiny_market,
                         out=tmp_path / "s")
    row = res["history"][0]
    assert row["skipped_steps"] == row["steps"] // 2 and math.isfinite(row["loss"])
    with pytest.raises(NonFiniteLossError, match="max_skipped_fraction"):
        run_standalone(_cfg("train.epochs=1"), data=tiny_market, out=tmp_path / "t")


def test_golden_loss_debug_config(tiny_market, tmp_path):
    """The debug preset's first-epoch numbers are pinned: a change to the data, model, loader or
    loop that alters them shows up here. Update GOLDEN only for an intended change."""
    res = run_standalone(_cfg("train.epochs=1"), data=tiny_market, out=tmp_path / "g")
    row = res["history"][0]
    got = tuple(round(row[k], 6) for k in ("loss", "nll", "kl", "valid_rank_ic"))
    assert got == pytest.approx(GOLDEN, abs=1e-5), got


GOLDEN = (1.735141, 1.449383, 0.285758, 0.030232)


def test_resumed_finished_run_reports_its_last_epoch(tiny_market, tmp_path):
    """A Tune trial restored after its run had finished must still hand Tune a metric."""
    from fvae.train import Dist, fit

    cfg = _cfg("train.epochs=1")
    run_standalone(cfg, data=tiny_market, out=tmp_path / "r")
    state = load_state(tmp_path / "r" / "checkpoints" / "last")
    reports = []
    fit(cfg, data=tiny_market, out=tmp_path / "r", d=Dist(), resume=state,
        report=lambda metrics, ckpt: reports.append(metrics), write_outputs=False)
    assert len(reports) == 1 and reports[0]["valid_rank_icir"] == state["history"][-1]["valid_rank_icir"]
