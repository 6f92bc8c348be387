"""The training benchmark times the code that ships: fit's own step and epoch, not a copy."""

from __future__ import annotations

import ast
import inspect

import torch

from fvae import train as ftrain
from fvae.bench import train as btrain


def _job(data) -> btrain.Job:
    return btrain.Job(data=str(data), device="cpu", hidden=8, factors=2, portfolios=4, batch_days=16, epochs=1,
                      warmup=0, bf16=False, compile=False, cuda_graph=False, seed=0, threads=1)


def test_bench_step_is_the_object_fit_uses(tiny_market, tmp_path, monkeypatch):
    """Count calls of fvae.train.EagerStep.step: the benchmark's timed slices and fit both land there,
    and the benchmark's step is what fvae.train.make_step builds for fit."""
    calls = []
    real = ftrain.EagerStep.step

    def counting(self, days, weight, *, global_days):
        calls.append(len(days))
        return real(self, days, weight, global_days=global_days)

    monkeypatch.setattr(ftrain.EagerStep, "step", counting)
    worker = btrain.FactorVAEWorker(_job(tiny_market))
    assert type(worker.step) is ftrain.EagerStep and worker.step.net is worker.run.model
    warm = len(calls)
    assert warm == btrain.WARMUP_STEPS_IF_NO_EPOCH
    r = worker.run_slice(epoch=0, part=0, parts=1)
    assert len(calls) - warm == r["steps"] == len(worker.batches(0)) > 0
    assert r["stock_days"] > 0 and torch.isfinite(torch.tensor(r["loss"]))

    calls.clear()
    cfg = btrain._fvae_config(_job(tiny_market), epochs=1)
    res = ftrain.fit(cfg, data=tiny_market, out=tmp_path / "fit", d=ftrain.Dist(), write_outputs=False)
    assert len(calls) == res["history"][0]["steps"]


def test_bench_copies_no_loop_and_imports_no_private_names():
    tree = ast.parse(inspect.getsource(btrain))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "fvae.train":
            assert not [a.name for a in node.names if a.name.startswith("_")], ast.unparse(node)
        if isinstance(node, ast.Attribute):  # no training step of its own
            assert node.attr not in ("backward", "clip_grad_norm_", "zero_grad"), ast.unparse(node)
