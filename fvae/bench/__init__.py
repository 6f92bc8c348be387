"""Benchmarks: each prints figures; none is a timed test."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_market_args(p: argparse.ArgumentParser, *, days_help: str | None = None) -> None:
    """--data / --stocks / --days: the market a benchmark runs on (shared by the train and tune benches)."""
    p.add_argument("--data", type=Path, default=None,
                   help="shard folder: used as is if it holds meta.json, else the synthetic market is written "
                        "there and kept (default: a temporary folder, removed)")
    p.add_argument("--stocks", type=int, default=500)
    p.add_argument("--days", type=int, default=2500, help=days_help)
