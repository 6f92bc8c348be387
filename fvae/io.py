"""Files that are either whole or absent, and the one place matplotlib is set up.

Every file fvae writes goes through :func:`atomic_write`: the content is written
to ``.NAME.tmp-PID`` beside the target, flushed to disk, then renamed over it, so
a reader (or a run resumed after ``kill -9``) never sees half a file. A leftover
``.*.tmp-*`` is an interrupted write and is safe to delete.

For tests of exactly that: with ``FVAE_STOP_BEFORE_RENAME=NAME`` in its environment, a process
stops itself (SIGSTOP) once a file named NAME is written but not yet renamed into place, so that
a test can kill it at that moment.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "atomic_to_parquet", "atomic_to_pickle", "strict_json", "read_json", "pyplot"]

STOP_BEFORE_RENAME = "FVAE_STOP_BEFORE_RENAME"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then fsynced and renamed onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if os.environ.get(STOP_BEFORE_RENAME) == path.name:
            os.kill(os.getpid(), signal.SIGSTOP)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def strict_json(obj: Any) -> Any:
    """NaN/inf -> None and keys -> str, so what is written is strict JSON (an undefined ICIR
    or Sharpe becomes null rather than the non-standard NaN that other readers reject)."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "strftime"):  # pandas.Timestamp, datetime.date
        return o.strftime("%Y-%m-%d")
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path, *, error: type[Exception]) -> Any:
    """The JSON document in ``path``; ``error("PATH: not valid JSON (...)")`` when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON (see :func:`strict_json`), indented, written atomically."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_to_parquet(path: str | Path, df: Any) -> Path:  # noqa: ANN401 (pandas.DataFrame)
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def atomic_to_pickle(path: str | Path, obj: Any) -> Path:  # noqa: ANN401 (a pandas object)
    return atomic_write(path, lambda tmp: obj.to_pickle(tmp))


def pyplot() -> Any:  # noqa: ANN401 (the matplotlib.pyplot module)
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and Ray workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
