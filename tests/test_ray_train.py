"""Data-parallel correctness: Ray Train with 2 CPU workers (gloo) against one process."""

from __future__ import annotations

import json

import pytest

from fvae.data.loader import load_panel
from fvae.train import DEBUG_PRESET, load_config, run_ray, run_standalone

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_two_workers_match_one(tiny_market, tmp_path, ray_session):
    cfg = load_config(None, [*DEBUG_PRESET, "train.epochs=2", "train.patience=0"])
    single = run_standalone(cfg, data=tiny_market, out=tmp_path / "single")
    run_ray(cfg, data=tiny_market, out=tmp_path / "ddp", workers=2, gpu=False)
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    n_valid = load_panel(tiny_market, "valid").num_days
    for a, b in zip(single["history"], ddp["history"]):
        # same global batches, the gradient of the same mean over days: equal up to float reduction order
        assert b["train_days"] == a["train_days"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-3)
        assert b["rank_steps_min"] == b["rank_steps_max"] == a["steps"]
        # validation metrics are all-reduced over every validation day, not rank 0's share
        assert b["valid_days_covered"] == n_valid
        assert b["valid_rank_ic"] == pytest.approx(a["valid_rank_ic"], abs=2e-3)
    assert ddp["test"]["rank_ic"] == pytest.approx(single["test"]["rank_ic"], abs=5e-3)
