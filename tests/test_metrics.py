"""Known answers for IC, Rank IC, ICIR and Rank ICIR on masked day tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from fvae.metrics import average_rank, daily_ic, daily_rank_ic, evaluate, summarize


def test_perfect_and_inverted_predictors():
    y = torch.tensor([[0.1, -0.2, 0.3, 0.05, 9.0], [1.0, 2.0, 3.0, 4.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, True, False]])
    assert daily_ic(y, y, mask).tolist() == pytest.approx([1.0, 1.0])
    assert daily_ic(-y, y, mask).tolist() == pytest.approx([-1.0, -1.0])
    # any monotone transform is a perfect Rank IC, not a perfect IC
    assert daily_rank_ic(torch.exp(5 * y), y, mask).tolist() == pytest.approx([1.0, 1.0])
    assert daily_ic(torch.exp(5 * y), y, mask)[0] < 0.99


def test_padding_never_counts():
    y = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0]])
    pred = torch.tensor([[1.0, 2.0, 3.0, 100.0, -100.0]])  # garbage in the padding
    mask = torch.tensor([[True, True, True, False, False]])
    assert daily_ic(pred, y, mask).item() == pytest.approx(1.0)
    assert daily_rank_ic(pred, y, mask).item() == pytest.approx(1.0)


def test_ties_get_average_ranks():
    v = torch.tensor([[3.0, 1.0, 3.0, 2.0, 7.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    assert average_rank(v, mask).tolist() == [[3.5, 1.0, 3.5, 2.0, 0.0]]


def test_matches_scipy_on_random_days():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 6, (6, 40), generator=g).double()  # many ties
    y = torch.randn(6, 40, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 40, generator=g) > 0.25
    ic, ric = daily_ic(pred, y, mask), daily_rank_ic(pred, y, mask)
    for d in range(6):
        m = mask[d].numpy()
        assert ic[d].item() == pytest.approx(pearsonr(pred[d].numpy()[m], y[d].numpy()[m])[0], abs=1e-10)
        assert ric[d].item() == pytest.approx(spearmanr(pred[d].numpy()[m], y[d].numpy()[m])[0], abs=1e-10)


def test_undefined_days_are_skipped():
    y = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    pred = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, True]])
    ic = daily_ic(pred, y, mask)
    assert ic[0].item() == pytest.approx(1.0) and math.isnan(ic[1].item()) and math.isnan(ic[2].item())
    res = evaluate(pred, y, mask)
    assert res["days"] == 1 and res["rank_ic"] == pytest.approx(1.0) and math.isnan(res["rank_icir"])


def test_icir_is_mean_over_sample_std():
    ic = torch.tensor([0.1, 0.3, 0.2, float("nan")])
    res = summarize(ic, ic)
    s = np.array([0.1, 0.3, 0.2])
    assert res["ic"] == pytest.approx(s.mean())
    assert res["icir"] == pytest.approx(s.mean() / s.std(ddof=1))
    assert res["rank_icir"] == res["icir"] and res["days"] == 3
