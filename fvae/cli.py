"""``fvae COMMAND [options]``: the console script. Each command is the ``python -m`` entry point of
the same name, called with the rest of the command line (``fvae train --data D --out R`` is
``python -m fvae.train --data D --out R``); both forms stay valid."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> (module whose main(argv) runs it, what it does)
    "data": ("fvae.data.__main__", "build shard folders: synthetic, import-ohlcv, export"),
    "train": ("fvae.train", "train one model (standalone or on Ray Train)"),
    "tune": ("fvae.tune", "hyperparameter search (Ray Tune + Optuna + ASHA)"),
    "report": ("fvae.report", "the HTML report of a run or a search"),
    "backtest": ("fvae.backtest", "TopK-Drop and mean-variance portfolios of a run's predictions"),
    "baselines": ("fvae.baselines", "linear, LightGBM, MLP, GRU and FactorVAE on the same data"),
    "factors": ("fvae.factors", "factor returns, correlations and sectors of a run"),
    "ensemble": ("fvae.ensemble", "a seed ensemble of finished runs (mean of per-day standardised scores)"),
    "bench": ("fvae.bench.__main__", "benchmarks that print figures: data, train, tune"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: fvae COMMAND [options]   (fvae COMMAND --help for its options)\n\ncommands:\n" + "".join(
        f"  {name:<{width}}  {what}\n" for name, (_, what) in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
