"""Cross-sectional signal metrics on masked day tensors, on CPU or GPU.

Per day d, over the real stocks of that day:
    IC_d      = Pearson(ŷ_d, y_d)
    RankIC_d  = Pearson(rank(ŷ_d), rank(y_d)), ties given their average rank (Spearman)
Over days:
    ICIR = mean_d IC_d / std_d IC_d    (sample std, ddof = 1, as pandas and qlib compute it)
Days with fewer than two real stocks or a constant side are undefined (NaN) and skipped.
"""

from __future__ import annotations

import math

import torch


def _pearson(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(a.dtype)  # (D, N)
    n = m.sum(1)  # (D,)
    safe_n = n.clamp_min(1)
    am = (a * m).sum(1) / safe_n
    bm = (b * m).sum(1) / safe_n
    da = (a - am[:, None]) * m
    db = (b - bm[:, None]) * m
    cov = (da * db).sum(1)
    var = (da * da).sum(1) * (db * db).sum(1)
    ok = (n >= 2) & (var > 0)
    return torch.where(ok, cov / var.clamp_min(1e-30).sqrt(), torch.full_like(cov, math.nan))


def average_rank(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n per row among masked entries, ties averaged; 0 at padding. (D, N) -> (D, N)."""
    D, N = v.shape
    key = torch.where(mask, v, torch.full_like(v, math.inf))
    sorted_v, order = torch.sort(key, dim=1, stable=True)  # padding sorts last
    new_group = torch.ones_like(sorted_v, dtype=torch.bool)
    new_group[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    gid = torch.cumsum(new_group.to(torch.long), dim=1) - 1 + torch.arange(D, device=v.device)[:, None] * N
    pos = torch.arange(1, N + 1, device=v.device, dtype=v.dtype).expand(D, N)
    total = torch.zeros(D * N, device=v.device, dtype=v.dtype).scatter_add_(0, gid.reshape(-1), pos.reshape(-1))
    count = torch.zeros(D * N, device=v.device, dtype=v.dtype).scatter_add_(
        0, gid.reshape(-1), torch.ones_like(pos).reshape(-1))
    avg_sorted = (total / count.clamp_min(1))[gid]  # (D, N)
    ranks = torch.empty_like(avg_sorted).scatter_(1, order, avg_sorted)
    return torch.where(mask, ranks, torch.zeros_like(ranks))


def daily_ic(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson IC per day: (D, N) x3 -> (D,), NaN where undefined."""
    pred, y = pred.double(), y.double()
    return _pearson(pred, y, mask)


def daily_rank_ic(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spearman Rank IC per day with averaged ties: (D, N) x3 -> (D,)."""
    pred, y = pred.double(), y.double()
    return _pearson(average_rank(pred, mask), average_rank(y, mask), mask)


def summarize(ic: torch.Tensor, rank_ic: torch.Tensor) -> dict[str, float]:
    """Mean and IR over the defined days of per-day IC and Rank IC series."""

    def mean_ir(s: torch.Tensor) -> tuple[float, float]:
        s = s[torch.isfinite(s)].double()
        if s.numel() == 0:
            return math.nan, math.nan
        mean = s.mean().item()
        if s.numel() < 2:
            return mean, math.nan
        std = s.std(unbiased=True).item()
        return mean, (mean / std if std > 0 else math.nan)

    ic_mean, icir = mean_ir(ic)
    ric_mean, ricir = mean_ir(rank_ic)
    return {"ic": ic_mean, "icir": icir, "rank_ic": ric_mean, "rank_icir": ricir,
            "days": int(torch.isfinite(rank_ic).sum().item())}


def evaluate(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """IC, ICIR, Rank IC and Rank ICIR of predictions on (D, N) day tensors."""
    return summarize(daily_ic(pred, y, mask), daily_rank_ic(pred, y, mask))
