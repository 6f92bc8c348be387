"""``python -m fvae.bench {data,train,tune}``: benchmarks that print figures (never timed tests)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"data": "fvae.bench.data", "train": "fvae.bench.train", "tune": "fvae.bench.tune"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m fvae.bench {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
