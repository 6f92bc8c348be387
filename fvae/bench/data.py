"""``python -m fvae.bench data``: fvae's native Alpha360 export against qlib's own paths.

Times, on the same qlib data:
  (a) qlib's ``Alpha360`` handler with its default processors (what a qlib
      workflow does: expression engine, then ProcessInf/ZScoreNorm/Fillna and
      DropnaLabel/CSZScoreNorm);
  (b) qlib's raw Alpha360 expressions plus the label through ``D.features``;
  (c) fvae's ``export`` (native features, fvae processing, shards), and its
      raw feature step alone, which computes what (b) computes.
Then checks that the raw features agree where both compute the same thing
(fvae drops the rows on which an instrument has no bar, qlib keeps them as
all-NaN rows), and prints speed ratios and sizes.

Without ``--provider-uri`` it first imports a slice of the S&P 500 panel in
../shared/data/sp500 (timed too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_PANEL = Path(__file__).resolve().parents[3] / "shared" / "data" / "sp500" / "sp500_daily.parquet"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvae.bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--panel", type=Path, default=DEFAULT_PANEL,
                   help="OHLCV panel to import (default: the S&P 500 panel)")
    p.add_argument("--provider-uri", type=Path, default=None, help="use this qlib data folder instead of importing")
    p.add_argument("--market", default="all", help="instrument list (with --provider-uri)")
    p.add_argument("--region", choices=["us", "cn"], default="us")
    p.add_argument("--symbols", type=int, default=100,
                   help="import the first N symbols (alphabetical) with data; 0 = all")
    p.add_argument("--start", default="2010-01-04", help="first day of the exported range")
    p.add_argument("--end", default="2020-12-31", help="last day of the exported range")
    p.add_argument("--kernels", type=int, default=os.cpu_count() or 1, help="qlib worker processes for (a) and (b)")
    p.add_argument("--skip-handler", action="store_true", help="skip (a), the slowest and most memory-hungry")
    p.add_argument("--skip-qlib", action="store_true", help="time only fvae (import and export)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to write data (default: a temporary folder, removed)")
    return p


def _say(msg: str) -> None:
    print(msg, flush=True)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    from fvae.data import qlib_io

    # export logs its step timings at INFO; show them
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[fvae]   %(message)s"))
    logging.getLogger(qlib_io.__name__).addHandler(handler)
    logging.getLogger(qlib_io.__name__).setLevel(logging.INFO)
    from fvae.data.shards import DataError

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fvae-bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir, qlib_io)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: Path, qlib_io) -> int:  # noqa: ANN001 (module)
    start, end = pd.Timestamp(args.start), pd.Timestamp(args.end)
    figures: dict[str, float] = {}
    if args.provider_uri is None:
        if not args.panel.is_file():
            print(f"error: panel {args.panel} not found; pass --panel or --provider-uri", file=sys.stderr)
            return 2
        _say(f"[import] reading {args.panel}")
        panel = pd.read_parquet(args.panel)
        dates = pd.to_datetime(panel["date"])
        # 60 trading days of history before start feed the first windows; 2 days after end the labels
        keep = (dates >= start - pd.Timedelta(days=100)) & (dates <= end + pd.Timedelta(days=10))
        panel = panel[keep]
        if args.symbols:
            chosen = sorted(panel["symbol"].unique())[: args.symbols]
            panel = panel[panel["symbol"].isin(chosen)]
        src = workdir / "panel.parquet"
        panel.to_parquet(src, index=False)
        provider, market = workdir / "qlib_data", "bench"
        if provider.exists():
            shutil.rmtree(provider)
        _say(f"[import] {len(panel):,} rows, {panel['symbol'].nunique()} symbols -> {provider}")
        t0 = time.perf_counter()
        info = qlib_io.import_ohlcv(src, out=provider, market=market)
        figures["import"] = time.perf_counter() - t0
        _say(f"[import] {figures['import']:.2f} s ({info['rows'] / figures['import']:,.0f} rows/s), "
             f"bins {_mb(_du(provider))}")
    else:
        provider, market = args.provider_uri, args.market

    qdir = qlib_io.open_qlib_dir(provider, market)
    cal = qdir.calendar[(qdir.calendar >= start) & (qdir.calendar <= end)]
    if len(cal) < 10:
        print(f"error: only {len(cal)} trading days between {start.date()} and {end.date()}", file=sys.stderr)
        return 2
    a, b = int(len(cal) * 0.6), int(len(cal) * 0.8)
    seg = {"train": (cal[0], cal[a - 1]), "valid": (cal[a], cal[b - 1]), "test": (cal[b], cal[-1])}
    _say("[segments] " + ", ".join(f"{k} {v[0].date()}..{v[1].date()}" for k, v in seg.items()))

    # (c) fvae
    _say("[fvae] raw Alpha360 + label (native)")
    t0 = time.perf_counter()
    raw = qlib_io.compute_raw(qdir, handler="Alpha360", start=cal[0], end=cal[-1], label=qlib_io.DEFAULT_LABEL,
                              lookback=60, extra_features=[], region=args.region)
    figures["fvae_raw"] = time.perf_counter() - t0
    rows, nfeat = raw.x.shape
    _say(f"[fvae] raw: {figures['fvae_raw']:.2f} s for {rows:,} rows x {nfeat} features "
         f"({_mb(raw.x.nbytes)} float32); steps {_fmt(raw.timings)}")
    fvae_raw = raw.frame().set_index(["datetime", "instrument"])
    del raw
    _say("[fvae] export: native features, robust z-score, CSRankNorm label, Parquet shards")
    shards = workdir / "shards"
    t0 = time.perf_counter()
    meta = qlib_io.export(provider_uri=provider, region=args.region, market=market, handler="Alpha360",
                          train=seg["train"], valid=seg["valid"], test=seg["test"], out=shards)
    figures["fvae_export"] = time.perf_counter() - t0
    _say(f"[fvae] export: {figures['fvae_export']:.2f} s; rows {meta.rows}; shards {_mb(_du(shards))}")

    if args.skip_qlib:
        _summary(figures, rows, nfeat)
        return 0

    # (b) qlib expressions
    fields, names = qlib_io.alpha360_fields()
    _say(f"[qlib] D.features: {len(fields)} Alpha360 expressions + label, kernels={args.kernels}")
    t0 = time.perf_counter()
    ref = qlib_io.engine_features(qdir, fields + [qlib_io.DEFAULT_LABEL], names + ["ret"], start=cal[0], end=cal[-1],
                                  region=args.region, kernels=args.kernels)
    figures["qlib_features"] = time.perf_counter() - t0
    _say(f"[qlib] D.features: {figures['qlib_features']:.2f} s for {len(ref):,} rows "
         f"({_mb(ref.memory_usage(deep=False).sum())})")
    _compare("fvae raw vs qlib D.features", fvae_raw, ref, qlib_io.alpha360_window_names() + ["ret"])
    del ref

    # (a) qlib handler
    if not args.skip_handler:
        _say(f"[qlib] Alpha360 handler (default processors), kernels={args.kernels}")
        t0 = time.perf_counter()
        h = qlib_io.handler_alpha360(qdir, start=cal[0], end=cal[-1], fit_start=seg["train"][0],
                                     fit_end=seg["train"][1], region=args.region, kernels=args.kernels)
        figures["qlib_handler"] = time.perf_counter() - t0
        _say(f"[qlib] handler: {figures['qlib_handler']:.2f} s; fetched {h.shape[0]:,} rows x {h.shape[1]} columns")
        del h
    _summary(figures, rows, nfeat)
    return 0


def _fmt(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in t.items())


def _compare(what: str, mine: pd.DataFrame, ref: pd.DataFrame, cols: list[str]) -> None:
    """Raw features where both compute them: qlib's rows with a bar (CLOSE0 not NaN).

    Column block by column block, in float32 (what both produce), to keep the
    memory at a fraction of the frames' own.
    """
    ref = ref[ref["CLOSE0"].notna()]
    same_rows = mine.index.equals(ref.index)
    n_mine, n_ref = len(mine), len(ref)
    if not same_rows:
        ref = ref.reindex(mine.index)
    max_abs = max_rel = 0.0
    nan_same, exact, compared = True, 0, 0
    for a in range(0, len(cols), 24):
        block = cols[a: a + 24]
        x = mine[block].to_numpy(np.float32)
        y = ref[block].to_numpy(np.float32)
        nx, ny = np.isnan(x), np.isnan(y)
        nan_same &= bool((nx == ny).all())
        ok = ~nx & ~ny
        diff = np.abs(x[ok].astype(np.float64) - y[ok])
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / np.maximum(np.abs(y[ok]), 1e-12)).max()))
        exact += int((diff == 0).sum())
        compared += int(diff.size)
    _say(f"[check] {what}: rows identical {same_rows} ({n_mine:,} vs {n_ref:,}); NaN pattern identical "
         f"{nan_same}; {compared:,} values: max |diff| {max_abs:.3g}, max rel {max_rel:.3g}, "
         f"bit-identical {exact / max(compared, 1) * 100:.4f}%")


def _summary(f: dict[str, float], rows: int, nfeat: int) -> None:
    _say("\n== summary ==")
    for k, v in f.items():
        _say(f"  {k:<14} {v:9.2f} s   {rows / v:12,.0f} rows/s" if k != "import" else f"  {k:<14} {v:9.2f} s")
    if "qlib_features" in f:
        _say(f"  speed-up raw features  (qlib D.features / fvae raw):   {f['qlib_features'] / f['fvae_raw']:.1f}x")
        _say(f"  speed-up to shards     (qlib D.features / fvae export): {f['qlib_features'] / f['fvae_export']:.1f}x")
    if "qlib_handler" in f:
        _say(f"  speed-up processed     (qlib handler / fvae export):   {f['qlib_handler'] / f['fvae_export']:.1f}x")
    _say(f"  {rows:,} rows x {nfeat} features = {rows * nfeat * 4 / 2**20:,.1f} MiB of float32")
