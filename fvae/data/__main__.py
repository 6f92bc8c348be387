"""``python -m fvae.data {synthetic,import-ohlcv,export}``: build shard folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _range(text: str) -> tuple[str, str]:
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"expected START:END dates, got {text!r}")
    a, b = text.split(":", 1)
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvae.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthetic", help="write a synthetic market with a planted signal")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--stocks", type=int, default=300)
    s.add_argument("--days", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--factors", type=int, default=3, help="number of true factors K")
    s.add_argument("--lookback", type=int, default=20, help="window length T the loader builds")
    s.add_argument("--snr", type=float, default=1.0, help="signal scale; 1.0 gives a ceiling Rank IC near 0.15")

    i = sub.add_parser("import-ohlcv", help="convert an OHLCV panel into qlib's binary format")
    i.add_argument("input", type=Path, help="a long Parquet/CSV table, or a folder of per-symbol CSV files")
    i.add_argument("--out", type=Path, required=True, help="qlib data directory to write")
    i.add_argument("--market", default="all", help="instrument list name (instruments/<market>.txt)")

    e = sub.add_parser("export", help="compute Alpha360/Alpha158 features and labels into shards")
    e.add_argument("--provider-uri", type=Path, required=True)
    e.add_argument("--region", choices=["us", "cn"], required=True)
    e.add_argument("--market", required=True)
    e.add_argument("--handler", choices=["Alpha360", "Alpha158"], required=True)
    e.add_argument("--train", type=_range, required=True, metavar="START:END")
    e.add_argument("--valid", type=_range, required=True, metavar="START:END")
    e.add_argument("--test", type=_range, required=True, metavar="START:END")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--label", default=None, help="qlib label expression (default Ref($close,-2)/Ref($close,-1)-1)")
    e.add_argument("--lookback", type=int, default=20, help="window length T for the daily (Alpha158) layout")
    e.add_argument("--feature", action="append", default=[], metavar="NAME=EXPR",
                   help="extra qlib expression feature (Alpha158 layout only); repeatable")
    e.add_argument("--vwap", choices=["approx", "drop"], default=None,
                   help="when the qlib data has no $vwap: approx = (high+low+close)/3, drop = leave out the "
                        "VWAP features (either is recorded in meta.json); default: an error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fvae.data.shards import DataError

    try:
        if args.command == "synthetic":
            from fvae.data.shards import check_out_folder
            from fvae.data.synthetic import SyntheticConfig, write_synthetic

            try:
                cfg = SyntheticConfig(stocks=args.stocks, days=args.days, seed=args.seed, factors=args.factors,
                                      lookback=args.lookback, snr=args.snr)
            except ValueError as e:  # SyntheticConfig names its fields; here they are flags
                raise DataError(f"--{e}") from None
            check_out_folder(args.out)
            meta = write_synthetic(args.out, cfg)
            print(f"wrote {sum(meta.rows.values())} rows to {args.out}; ceiling Rank IC {meta.extra['ceiling_rank_ic']}")
        elif args.command == "import-ohlcv":
            from fvae.data.qlib_io import import_ohlcv

            info = import_ohlcv(args.input, out=args.out, market=args.market)
            for w in info.get("warnings", []):
                print(f"warning: {w}", file=sys.stderr)
            print(f"wrote qlib data to {args.out}: {info}")
        elif args.command == "export":
            from fvae.data.qlib_io import DEFAULT_LABEL, export

            meta = export(provider_uri=args.provider_uri, region=args.region, market=args.market,
                          handler=args.handler, train=args.train, valid=args.valid, test=args.test,
                          out=args.out, label=args.label or DEFAULT_LABEL, lookback=args.lookback,
                          extra_features=args.feature, vwap=args.vwap or "require")
            print(f"wrote {sum(meta.rows.values())} rows to {args.out} ({meta.handler}, T={meta.lookback}, C={meta.channels})")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
