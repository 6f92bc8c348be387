"""On a GPU: Ray Train over NCCL with one worker, and one-worker trials packed on one GPU with the
fast path (bf16 + CUDA graphs). Skipped without CUDA; scripts/gpu_run.sh runs them on a GPU machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fvae.train import DEBUG_PRESET, load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.ray, pytest.mark.timeout(600),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_ray_train_nccl_with_one_worker(tiny_market, tmp_path, ray_session):
    from fvae.train import run_ray

    out = tmp_path / "nccl"
    run_ray(load_config(None, [*DEBUG_PRESET, "train.epochs=2"]), data=tiny_market, out=out, workers=1, gpu=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["test"]["rank_ic"]) and len(metrics["history"]) == 2


def test_packed_trials_share_one_gpu_on_the_fast_path(tiny_market, tmp_path, ray_session):
    """Two trials on half a GPU each run at once, with bf16 and CUDA graphs, and map one cached panel."""
    from fvae.tune import run_search

    summary = run_search(data=tiny_market, space_path=ROOT / "search_spaces" / "smoke.yaml", num_samples=2,
                         exp_dir=tmp_path / "exp", gpus_per_trial=0.5, grace_period=2)
    assert [t["status"] for t in summary["trials"]] == ["TERMINATED"] * 2, summary["trials"]
    spans = []
    for t in summary["trials"]:
        run = Path(t["run_dir"])
        assert math.isfinite(json.loads((run / "metrics.json").read_text())["valid"]["rank_ic"])
        timings = json.loads((run / "timings.json").read_text())
        assert timings["data_source"] == "cache"
        spans.append((timings["started_at"], timings["started_at"] + timings["trial_s"]))
        config = (run / "config.yaml").read_text()
        assert "cuda_graph: true" in config and "bf16: true" in config
    assert max(a for a, _ in spans) < min(b for _, b in spans)  # the two trials overlapped on the one GPU
