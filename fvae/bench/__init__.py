"""Benchmarks: each prints figures; none is a timed test."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def add_market_args(p: argparse.ArgumentParser, *, days_help: str | None = None) -> None:
    """--data / --stocks / --days: the market a benchmark runs on (shared by the train and tune benches)."""
    p.add_argument("--data", type=Path, default=None,
                   help="shard folder: used as is if it holds meta.json, else the synthetic market is written "
                        "there and kept (default: a temporary folder, removed)")
    p.add_argument("--stocks", type=int, default=500)
    p.add_argument("--days", type=int, default=2500, help=days_help)


def prepare_market(args: argparse.Namespace, workdir: Path, *, ignored: str = "--stocks/--days",
                   **synthetic: Any) -> Path:  # noqa: ANN401 (SyntheticConfig fields)
    """The shard folder to time on: ``--data`` as is when it is complete, else a synthetic market of
    ``--stocks`` x ``--days`` (plus the ``synthetic`` SyntheticConfig fields) written there or in ``workdir``."""
    from fvae.data.synthetic import SyntheticConfig, write_synthetic

    folder = args.data if args.data is not None else workdir / "data"
    if (folder / "meta.json").is_file():
        print(f"[data] using {folder} as is ({ignored} do not apply)", flush=True)
        return folder
    cfg = SyntheticConfig(stocks=args.stocks, days=args.days, seed=args.seed, **synthetic)
    print(f"[data] synthetic market {cfg.stocks} stocks x {cfg.days} days, T={cfg.lookback}, C={cfg.channels} "
          f"-> {folder}", flush=True)
    t0 = time.perf_counter()
    meta = write_synthetic(folder, cfg)
    print(f"[data] written in {time.perf_counter() - t0:.1f} s; rows {meta.rows}; "
          f"ceiling Rank IC {meta.extra['ceiling_rank_ic']}", flush=True)
    return folder
