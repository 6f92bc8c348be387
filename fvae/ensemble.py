"""A seed ensemble of finished runs: the mean of their per-day standardised scores.

    python -m fvae.ensemble RUN_DIR RUN_DIR [RUN_DIR ...] --out DIR

Each RUN_DIR is an ``fvae.train`` run (its ``pred_{valid,test}.parquet`` and ``metrics.json``), all
on the same data (``metrics.json``'s fingerprint). Per segment and day, every member's score is
standardised across the day's stocks, z_i = (s_i − mean) / std, and the ensemble's score is the mean
of the members' z over the members that scored the stock that day. Standardising first keeps a
member whose scores happen to be spread wider from outweighing the others; a day's ranking, which
Rank IC reads, is all a member contributes.

DIR receives ``pred_{seg}.parquet`` (datetime, instrument, score, label: the members' label, the
raw forward return) and ``metrics.json``: per segment the ensemble's ic, icir, rank_ic and rank_icir
(``fvae.metrics``, as ``fvae.train`` scores one run) and the members' own figures beside them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fvae.data.shards import DataError
from fvae.io import atomic_to_parquet, atomic_write_json, read_json
from fvae.metrics import daily_ic, daily_rank_ic, summarize

SEGMENTS = ("valid", "test")
KEY = ["datetime", "instrument"]


def _member(run: Path) -> dict[str, Any]:
    path = run / "metrics.json"
    if not path.is_file():
        raise DataError(f"{path} not found: expected a finished fvae.train run")
    metrics = read_json(path, error=DataError)
    if "fingerprint" not in metrics:
        raise DataError(f"{path}: no 'fingerprint': expected the metrics.json of an fvae.train run")
    return metrics


def _scores(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path} not found: every member needs the segment's predictions")
    df = pd.read_parquet(path)
    missing = [c for c in (*KEY, "score", "label") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected an fvae.train prediction file")
    day = df.groupby("datetime")["score"]
    std = day.transform("std")
    return df.assign(z=(df["score"] - day.transform("mean")) / std.where(std > 0))[[*KEY, "z", "label"]]


def ensemble(runs: list[Path], *, out: Path) -> dict[str, Any]:
    """Write the ensemble of ``runs`` to ``out`` (module docstring); returns its metrics.json."""
    if len(runs) < 2:
        raise DataError(f"an ensemble needs at least 2 runs, got {len(runs)}")
    members = [_member(r) for r in runs]
    prints = {m["fingerprint"] for m in members}
    if len(prints) > 1:
        raise DataError(f"the runs were trained on different data (fingerprints {sorted(prints)}): "
                        f"{', '.join(str(r) for r in runs)}")
    result: dict[str, Any] = {"members": [str(r) for r in runs], "fingerprint": members[0]["fingerprint"],
                              "data": members[0].get("data"), "method": "mean of per-day standardised scores"}
    for seg in SEGMENTS:
        if not all(seg in m for m in members):
            continue
        frames = [_scores(r / f"pred_{seg}.parquet").set_index(KEY) for r in runs]
        z = pd.concat([f["z"].rename(i) for i, f in enumerate(frames)], axis=1)  # (stock-days, members)
        label = pd.concat([f["label"] for f in frames], axis=1).bfill(axis=1).iloc[:, 0]
        df = pd.DataFrame({"score": z.mean(axis=1), "label": label}).dropna(subset=["score"]).reset_index()
        atomic_to_parquet(out / f"pred_{seg}.parquet", df)
        wide = df.pivot(index="datetime", columns="instrument")
        pred, ret = (torch.tensor(wide[c].to_numpy(np.float64)) for c in ("score", "label"))
        mask = torch.isfinite(pred) & torch.isfinite(ret)
        pred, ret = pred.nan_to_num(0.0), ret.nan_to_num(0.0)
        result[seg] = summarize(daily_ic(pred, ret, mask), daily_rank_ic(pred, ret, mask))
        result[seg]["members"] = [{k: m[seg][k] for k in ("ic", "icir", "rank_ic", "rank_icir")} for m in members]
    if not any(seg in result for seg in SEGMENTS):
        raise DataError(f"the runs share no segment of {SEGMENTS} in their metrics.json")
    atomic_write_json(out / "metrics.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fvae.ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="fvae.train run directories (2 or more)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    args = p.parse_args(argv)
    try:
        res = ensemble(args.runs, out=args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for seg in SEGMENTS:
        if seg in res:
            mem = [m["rank_ic"] for m in res[seg]["members"]]
            print(f"[ensemble] {seg}: RankIC {res[seg]['rank_ic']:.4f} RankICIR {res[seg]['rank_icir']:.3f} "
                  f"(members' RankIC {np.mean(mem):.4f} on average, {min(mem):.4f}..{max(mem):.4f}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
