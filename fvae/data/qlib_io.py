"""qlib in and out: OHLCV panel -> qlib binary data, qlib data -> fvae shards.

This is the only module of fvae that imports qlib, and it does so lazily, so
that ``python -m fvae.data import-ohlcv`` and importing this module cost
nothing.

Import (``import_ohlcv``). pyqlib's wheel ships no ``dump_bin`` script, so the
qlib day format is written here, vectorised over the whole panel:

    calendars/day.txt                  trading days, YYYY-MM-DD, sorted
    instruments/<market>.txt           SYMBOL<TAB>first day<TAB>last day
    features/<symbol>/<field>.day.bin  little-endian float32: the calendar index
                                       of the symbol's first day, then one value
                                       per calendar day up to its last day (NaN
                                       for days without a bar)

with qlib's price conventions: ``factor = adjusted_close / close``; open, high,
low, close (and vwap) are adjusted (raw x factor); ``volume = raw / factor``;
``change`` is the adjusted close's return on the previous bar.

Export (``export``). Alpha360 and the default label are computed natively from
the bin files (a dense days x instruments array per field; one gather per lag),
which gives the same numbers as qlib's expression engine without its
per-instrument, per-expression Python work. Alpha158, extra ``NAME=EXPR``
features and any other label go through qlib's engine (``D.features``).
Processing is fvae's own (``fvae.data.process``), not qlib's processors.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from fvae.data.process import CLIP, cs_rank_norm, robust_zscore_apply, robust_zscore_fit
from fvae.data.shards import DataError, Meta, check_out_folder, write_shards
from fvae.io import atomic_write_bytes, atomic_write_json
from fvae.progress import bar

DEFAULT_LABEL = "Ref($close, -2)/Ref($close, -1) - 1"
IMPORT_INFO = "fvae_import.json"
FIELDS = ("open", "high", "low", "close", "volume", "factor", "change", "vwap")
VWAP_APPROX = "(high+low+close)/3"
HANDLERS = ("Alpha360", "Alpha158")
VWAP_CHOICES = ("require", "approx", "drop")  # what export does when the qlib directory has no $vwap
_VWAP_APPROX_EXPR = "(($high+$low+$close)/3)"
_FIELD_REF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
REGIONS = ("us", "cn")

# Alpha360: 60 days of 6 price/volume series, each divided by today's close
# (volume by today's volume). qlib's own column order is field-major
# (CLOSE59..CLOSE0, OPEN59..OPEN0, ...); the shards store it time-major.
ALPHA360_LOOKBACK = 60
ALPHA360_SERIES = ("CLOSE", "OPEN", "HIGH", "LOW", "VWAP", "VOLUME")
_ALPHA360_FIELD = {"CLOSE": "close", "OPEN": "open", "HIGH": "high", "LOW": "low", "VWAP": "vwap",
                   "VOLUME": "volume"}
_VOLUME_EPS = np.float32(1e-12)  # the "+1e-12" of Alpha360DL, in the bins' float32 as qlib computes it

_ALIASES = {
    "symbol": ("symbol", "instrument", "ticker"),
    "date": ("date", "datetime"),
    "adjusted_close": ("adjusted_close", "adj_close", "adjclose"),
}
_REQUIRED = ("open", "high", "low", "close", "volume")
_NUMERIC = ("open", "high", "low", "close", "volume", "adjusted_close", "vwap")
_MARKET_OK = re.compile(r"^[A-Za-z0-9_\-]+$")
_SYMBOL_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-^=&]*$")
_QLIB_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_NORM_CHUNK = 60  # feature columns normalised at a time (bounds the float64 working copy)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- import


def import_ohlcv(input_path: str | Path, *, out: str | Path, market: str = "all") -> dict[str, Any]:
    """Convert an OHLCV panel into a qlib day-frequency data directory at ``out``.

    ``input_path`` is a long Parquet/CSV table with symbol and date columns, or a
    folder of per-symbol CSV files (symbol = file stem). Column names are
    case-insensitive; ``symbol``/``instrument``/``ticker`` and ``date``/``datetime``
    are accepted; ``adjusted_close`` (or ``adj_close``) and ``vwap`` are optional.

    Everything is read and checked before anything is written, so a bad input
    leaves ``out`` untouched. An existing ``out`` is replaced only if it is an
    earlier fvae import (it holds ``fvae_import.json``); the calendar, the file
    qlib needs first, is removed first and written last, so an interrupted
    import never looks complete. Returns the summary also written to
    ``out/fvae_import.json``.
    """
    input_path = Path(input_path)
    out = Path(out)
    if not _MARKET_OK.match(market):
        raise DataError(f"--market: {market!r} is not a valid instrument list name (letters, digits, _ or -)")
    panel, notes = _read_panel(input_path)
    where = str(input_path)
    warnings, checks = _check_prices(panel, where=where)

    # calendar and per-row calendar index
    dates = panel["date"].to_numpy(dtype="datetime64[ns]")
    calendar = np.unique(dates)
    cal_idx = np.searchsorted(calendar, dates).astype(np.int64)
    symbols = panel["symbol"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, symbols[1:] != symbols[:-1]])
    ends = np.r_[starts[1:], len(panel)]

    values = _qlib_fields(panel, starts)  # (len(FIELDS), rows) float32

    # ---- from here on we write
    _prepare_out(out)
    info: dict[str, Any] = {
        "status": "incomplete",
        "source": str(input_path.resolve()),
        "market": market,
    }
    atomic_write_json(out / IMPORT_INFO, info)
    feat_dir = out / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    inst_lines = []
    for a, b in bar(zip(starts, ends), desc=f"[fvae.data] import into {out.name}", total=len(starts), unit="symbol"):
        sym = str(symbols[a])
        idx = cal_idx[a:b]
        first, last = int(idx[0]), int(idx[-1])
        block = np.full((len(FIELDS), last - first + 2), np.nan, dtype="<f4")
        block[:, 0] = first
        block[:, 1 + idx - first] = values[:, a:b]
        sym_dir = feat_dir / code_to_fname(sym).lower()
        sym_dir.mkdir(exist_ok=True)
        for k, name in enumerate(FIELDS):
            _atomic_write(sym_dir / f"{name}.day.bin", block[k].tobytes())
        inst_lines.append(f"{sym}\t{_iso(calendar[first])}\t{_iso(calendar[last])}\n")

    (out / "instruments").mkdir(exist_ok=True)
    _atomic_write(out / "instruments" / f"{market.lower()}.txt", "".join(inst_lines).encode())
    info = {
        "status": "complete",
        "source": str(input_path.resolve()),
        "market": market,
        "rows": int(len(panel)),
        "symbols": int(len(starts)),
        "days": int(len(calendar)),
        "start": _iso(calendar[0]),
        "end": _iso(calendar[-1]),
        "fields": list(FIELDS),
        "factor": notes["factor"],
        "vwap_approx": notes["vwap_approx"],
        "price_checks": checks,
        "warnings": warnings,
        "written_by": "fvae.data.qlib_io.import_ohlcv",
    }
    atomic_write_json(out / IMPORT_INFO, info)
    (out / "calendars").mkdir(exist_ok=True)
    _atomic_write(out / "calendars" / "day.txt",
                  "".join(f"{d}\n" for d in np.datetime_as_string(calendar, unit="D")).encode())
    log.info("imported %s rows of %s symbols from %s into %s", len(panel), len(starts), where, out)
    return info


def code_to_fname(code: str) -> str:
    """qlib's ``qlib.utils.code_to_fname``: Windows device names get a ``_qlib_`` prefix.

    Copied rather than imported so that import_ohlcv does not pull in qlib.
    """
    return f"_qlib_{code}" if code.upper() in _QLIB_RESERVED else code


def _read_panel(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read, validate and canonicalise the input; one DataError names what is wrong.

    Returns a frame with columns symbol (upper case), date (datetime64, day),
    open, high, low, close, volume, adjusted_close, vwap (float64; vwap NaN where
    the input has none) and vwap_given (bool), sorted by (symbol, date), plus
    notes for fvae_import.json.
    """
    if not path.exists():
        raise DataError(f"{path}: input not found (expected a Parquet/CSV file or a folder of per-symbol CSV files)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith((".csv", ".csv.gz")))
        if not files:
            raise DataError(f"{path}: folder holds no *.csv files (expected one CSV per symbol)")
        parts = []
        for f in files:
            stem = f.name[: -len(".csv.gz")] if f.name.lower().endswith(".gz") else f.stem
            raw = _read_csv(f)
            parts.append(_canonical(raw, where=str(f), symbol=stem))
        panel = pd.concat(parts, ignore_index=True)
    else:
        name = path.name.lower()
        if name.endswith((".parquet", ".pq")):
            raw = _read_parquet(path)
        elif name.endswith((".csv", ".csv.gz")):
            raw = _read_csv(path)
        else:
            raise DataError(f"{path}: unknown file type (expected .parquet, .csv or a folder of .csv files)")
        panel = _canonical(raw, where=str(path), symbol=None)
    if panel.empty:
        raise DataError(f"{path}: no rows")
    panel = panel.sort_values(["symbol", "date"], kind="stable").reset_index(drop=True)
    dup = panel.duplicated(["symbol", "date"]).to_numpy()
    if dup.any():
        first = int(np.argmax(dup))
        raise DataError(f"{path}: {int(dup.sum())} duplicate (symbol, date) row(s), first "
                        f"{panel['symbol'].iat[first]} on {panel['date'].iat[first].date()}")
    has_adj = panel["adj_given"].to_numpy()
    given = panel["vwap_given"].to_numpy()
    notes = {
        "factor": ("adjusted_close / close" if has_adj.all() else
                   "1.0 (no adjusted close column)" if not has_adj.any() else
                   f"adjusted_close / close; 1.0 for {int((~has_adj).sum())} rows without one"),
        "vwap_approx": (None if given.all() else
                        VWAP_APPROX if not given.any() else
                        f"{VWAP_APPROX} for {int((~given).sum())} rows without vwap"),
    }
    return panel, notes


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: unreadable Parquet file ({e})") from None
    # date32 columns become Python date objects in pandas; cast in Arrow, which is much faster
    cols = []
    for i, fld in enumerate(table.schema):
        col = table.column(i)
        if pa.types.is_date(fld.type):
            col = col.cast(pa.timestamp("ns"))
        cols.append(col)
    return pa.table(cols, names=table.column_names).to_pandas()


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV file; symbol columns as text, so that codes like 000001 keep their zeros."""
    try:
        header = pd.read_csv(path, nrows=0).columns
        text = {c: str for c in header if _norm_name(c) in _ALIASES["symbol"]}
        return pd.read_csv(path, dtype=text)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (expected a header and rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: unreadable CSV file ({str(e).splitlines()[0]})") from None


def _canonical(raw: pd.DataFrame, *, where: str, symbol: str | None) -> pd.DataFrame:
    """Rename, type-check and convert one input table; see ``_read_panel``."""
    norm = {c: _norm_name(c) for c in raw.columns}
    by_name: dict[str, str] = {}
    for orig, n in norm.items():
        canon = next((k for k, al in _ALIASES.items() if n in al), n)
        if canon in by_name:
            raise DataError(f"{where}: columns {by_name[canon]!r} and {orig!r} both mean '{canon}'; keep one")
        by_name[canon] = orig
    need = (["symbol"] if symbol is None else []) + ["date", *_REQUIRED]
    missing = [c for c in need if c not in by_name]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} (have {list(raw.columns)[:12]})")

    out = pd.DataFrame(index=raw.index)
    if symbol is None:
        sym = raw[by_name["symbol"]]
        if sym.isna().any():
            row = int(np.argmax(sym.isna().to_numpy()))
            raise DataError(f"{where}: column {by_name['symbol']!r} has a missing symbol on row {row}")
        sym = sym.astype(str).str.strip().str.upper()
    else:
        sym = pd.Series(symbol.strip().upper(), index=raw.index)
    out["symbol"] = sym
    bad_sym = ~sym.str.match(_SYMBOL_OK)
    if bad_sym.any():
        raise DataError(f"{where}: symbol {sym[bad_sym].iloc[0]!r} is not usable as a qlib instrument "
                        f"(letters, digits and . _ - ^ = & only)")
    out["date"] = _parse_dates(raw[by_name["date"]], where=where, column=by_name["date"], symbols=sym)
    for c in _NUMERIC:
        if c in by_name:
            out[c] = _numeric(raw[by_name[c]], where=where, column=by_name[c], symbols=sym, dates=out["date"])
    out["adj_given"] = "adjusted_close" in by_name
    if "adjusted_close" not in by_name:
        out["adjusted_close"] = out["close"]
    out["vwap_given"] = "vwap" in by_name
    if "vwap" not in by_name:
        out["vwap"] = np.nan
    return out


def _norm_name(column: object) -> str:
    """Column names compare case-insensitively, with spaces and dashes as underscores ("Adj Close")."""
    return re.sub(r"[\s\-]+", "_", str(column).strip().lower())


def _parse_dates(col: pd.Series, *, where: str, column: str, symbols: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(col):
        parsed = col
    else:
        if pd.api.types.is_integer_dtype(col):  # 20150102, not nanoseconds since 1970
            parsed = pd.to_datetime(col.astype(str), format="%Y%m%d", errors="coerce")
        else:
            parsed = pd.to_datetime(col, errors="coerce")
        bad = parsed.isna() & col.notna()
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            raise DataError(f"{where}: column {column!r} holds unparseable date(s), first {col.iat[i]!r} "
                            f"({symbols.iat[i]}); expected dates like 2015-01-02")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)
    if parsed.isna().any():
        i = int(np.argmax(parsed.isna().to_numpy()))
        raise DataError(f"{where}: column {column!r} has a missing date ({symbols.iat[i]})")
    return parsed.dt.normalize().astype("datetime64[ns]")


def _numeric(col: pd.Series, *, where: str, column: str, symbols: pd.Series, dates: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
        conv = pd.to_numeric(col, errors="coerce")
        bad = conv.isna() & col.notna()
        if pd.api.types.is_bool_dtype(col) or bad.any():
            i = int(np.argmax(bad.to_numpy())) if bad.any() else 0
            raise DataError(f"{where}: column {column!r} is not numeric (dtype {col.dtype}), first bad value "
                            f"{col.iat[i]!r} ({symbols.iat[i]} on {dates.iat[i].date()}); expected numbers")
        col = conv
    return col.astype(np.float64)


_PRICES = ("open", "high", "low", "close", "adjusted_close", "vwap")


def _check_prices(panel: pd.DataFrame, *, where: str) -> tuple[list[str], dict[str, int]]:
    """Prices and volumes that cannot be right: an error for what no reading can fix (inf, negative,
    a symbol without a single close, no volume at all); a one-line warning, with its count, for what
    is read as a missing bar (zero prices, high < low: set to NaN) or kept (a symbol that never
    traded a share). ``panel`` is changed in place. Returns (warnings, counts) for fvae_import.json."""
    def first(bad: np.ndarray) -> str:
        i = int(np.argmax(bad))
        return f"{panel['symbol'].iat[i]} on {panel['date'].iat[i].date()}"

    for c in (*_PRICES, "volume"):
        v = panel[c].to_numpy()
        for bad, what in ((np.isinf(v), "inf"), (v < 0, "negative")):
            if bad.any():
                raise DataError(f"{where}: column {c!r} holds {int(bad.sum())} {what} value(s), first {first(bad)}; "
                                "expected finite numbers >= 0 (leave a missing value empty)")
    nan_close = panel["close"].isna().groupby(panel["symbol"], sort=False).all()
    if nan_close.any():
        dead = nan_close.index[nan_close.to_numpy()]
        raise DataError(f"{where}: symbol {dead[0]!r} has no 'close' on any of its rows"
                        f"{f' (and {len(dead) - 1} more symbols)' if len(dead) > 1 else ''}; "
                        "drop it or give its prices")
    volume = panel["volume"].to_numpy()
    if not (volume > 0).any():
        raise DataError(f"{where}: column 'volume' is 0 or missing on every row; the volume features would be "
                        "constant (expected traded volumes)")
    warnings: list[str] = []
    zero = np.zeros(len(panel), dtype=bool)
    for c in _PRICES:
        z = (panel[c] == 0).to_numpy()
        if z.any():
            panel.loc[z, c] = np.nan
            zero |= z
    if zero.any():
        warnings.append(f"{where}: {int(zero.sum())} row(s) with a zero price (first {first(zero)}): those prices "
                        "are set to NaN (a zero close makes the whole bar missing)")
    inverted = (panel["high"] < panel["low"]).to_numpy()
    if inverted.any():
        panel.loc[inverted, ["high", "low"]] = np.nan
        warnings.append(f"{where}: {int(inverted.sum())} row(s) with high < low (first {first(inverted)}): their "
                        "high and low are set to NaN")
    never = (panel["volume"].fillna(0) == 0).groupby(panel["symbol"], sort=False).all()
    if never.any():
        names = never.index[never.to_numpy()]
        warnings.append(f"{where}: {len(names)} symbol(s) with volume 0 on every row (first {names[0]}): kept, "
                        "their volume features are constant")
    return warnings, {"zero_price_rows": int(zero.sum()), "high_below_low_rows": int(inverted.sum()),
                      "zero_volume_symbols": int(never.sum())}


def _qlib_fields(panel: pd.DataFrame, starts: np.ndarray) -> np.ndarray:
    """The FIELDS rows of values, with qlib's adjustment conventions, as float32.

    Computed in float64 and cast once, like qlib's dump_bin. ``close`` is the
    adjusted close itself (raw x adjusted/raw, without the rounding), and
    ``change`` is the adjusted close over the symbol's previous bar's (qlib's
    collectors forward-fill the close, so a gap is bridged).
    """
    raw_close = panel["close"].to_numpy()
    adj = panel["adjusted_close"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = adj / raw_close
    factor[~np.isfinite(factor) | (factor <= 0)] = np.nan
    close = np.where(np.isnan(factor), np.nan, adj)
    op = panel["open"].to_numpy() * factor
    hi = panel["high"].to_numpy() * factor
    lo = panel["low"].to_numpy() * factor
    with np.errstate(divide="ignore", invalid="ignore"):
        volume = panel["volume"].to_numpy() / factor
    vwap = panel["vwap"].to_numpy() * factor
    approx = ~panel["vwap_given"].to_numpy()
    vwap[approx] = ((hi + lo + close) / 3.0)[approx]

    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(panel)]))
    prev = pd.Series(close).groupby(group).ffill().groupby(group).shift(1).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        change = close / prev - 1.0
    change[~np.isfinite(change)] = np.nan

    cols = {"open": op, "high": hi, "low": lo, "close": close, "volume": volume, "factor": factor,
            "change": change, "vwap": vwap}
    return np.stack([cols[f] for f in FIELDS]).astype(np.float32)


def _prepare_out(out: Path) -> None:
    """Make ``out`` ready for a fresh import, refusing to clobber data we did not write."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / IMPORT_INFO).is_file():
            raise DataError(f"--out {out}: folder is not empty and holds no {IMPORT_INFO}; "
                            "refusing to overwrite data fvae did not write (use an empty folder)")
        cal = out / "calendars" / "day.txt"
        if cal.exists():
            cal.unlink()  # first: from now on the folder is visibly incomplete
        import shutil

        for sub in ("features", "instruments", "calendars"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)


_atomic_write = atomic_write_bytes  # one name to patch in the interruption test


def _iso(day: np.datetime64 | pd.Timestamp) -> str:
    return str(np.datetime64(day, "D"))


# --------------------------------------------------------------------------- reading qlib data


@dataclass(kw_only=True)
class QlibDir:
    """A qlib day-frequency data directory as export sees it."""

    root: Path
    calendar: pd.DatetimeIndex
    spans: dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]]  # the market's instruments and membership spans
    market: str
    import_info: dict[str, Any]


def open_qlib_dir(provider_uri: str | Path, market: str) -> QlibDir:
    """Read the calendar and the market's instrument list, checking both exist."""
    root = Path(provider_uri).expanduser()
    if not root.is_dir():
        raise DataError(f"--provider-uri {root}: folder not found")
    cal_path = root / "calendars" / "day.txt"
    if not cal_path.is_file():
        raise DataError(f"--provider-uri {root}: no calendars/day.txt (not a qlib day data folder, "
                        "or an interrupted import)")
    try:
        calendar = pd.DatetimeIndex(pd.to_datetime(pd.read_csv(cal_path, header=None, dtype=str)[0].str.strip()))
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{cal_path}: unreadable calendar ({str(e).splitlines()[0] if str(e) else 'empty'})") from None
    if len(calendar) == 0 or not calendar.is_monotonic_increasing:
        raise DataError(f"{cal_path}: calendar must hold sorted dates")
    inst_path = root / "instruments" / f"{market.lower()}.txt"
    if not inst_path.is_file():
        have = sorted(p.stem for p in (root / "instruments").glob("*.txt"))
        raise DataError(f"--market {market!r}: no instruments/{market.lower()}.txt in {root} (have {have})")
    spans: dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]] = {}
    if inst_path.stat().st_size > 0:
        try:
            df = pd.read_csv(inst_path, sep="\t", header=None, usecols=[0, 1, 2], dtype=str,
                             names=["instrument", "start", "end"])
            df["start"] = pd.to_datetime(df["start"])
            df["end"] = pd.to_datetime(df["end"])
        except (ValueError, pd.errors.ParserError) as e:
            raise DataError(f"{inst_path}: unreadable instrument list ({str(e).splitlines()[0]}); "
                            "expected SYMBOL<TAB>start<TAB>end lines") from None
        for row in df.itertuples(index=False):
            spans.setdefault(str(row.instrument), []).append((row.start, row.end))
    info_path = root / IMPORT_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return QlibDir(root=root, calendar=calendar, spans=spans, market=market, import_info=info)


def read_bin(path: str | Path) -> tuple[int, np.ndarray]:
    """One qlib .bin file: (calendar index of the first value, float32 values)."""
    raw = np.fromfile(path, dtype="<f4")
    if raw.size == 0:
        return 0, raw
    return int(raw[0]), raw[1:]


def dense_field(qdir: QlibDir, instruments: Sequence[str], field: str, lo: int, hi: int) -> np.ndarray:
    """(hi - lo + 1, len(instruments)) float32 of ``$field`` on calendar indices lo..hi; NaN where absent.

    lo may be negative and hi past the calendar's end (padding for lags and
    leads): those rows stay NaN, as qlib's Ref yields NaN there. All of each
    instrument's stored data is used, whatever its membership span: qlib's
    expressions also look back past the start of a span.
    """
    out = np.full((hi - lo + 1, len(instruments)), np.nan, dtype=np.float32)
    for j, inst in enumerate(instruments):
        path = qdir.root / "features" / code_to_fname(inst).lower() / f"{field}.day.bin"
        if not path.is_file():
            continue
        start, vals = read_bin(path)
        a, b = max(start, lo), min(start + len(vals) - 1, hi)
        if a <= b:
            out[a - lo: b - lo + 1, j] = vals[a - start: b - start + 1]
    return out


# --------------------------------------------------------------------------- export


def alpha360_fields() -> tuple[list[str], list[str]]:
    """qlib's Alpha360 expressions and names, in qlib's (field-major) order, built as Alpha360DL does."""
    fields, names = [], []
    for s in ALPHA360_SERIES:
        denom = "($volume+1e-12)" if s == "VOLUME" else "$close"
        var = f"${_ALPHA360_FIELD[s]}"
        for i in range(ALPHA360_LOOKBACK - 1, 0, -1):
            fields.append(f"Ref({var}, {i})/{denom}")
            names.append(f"{s}{i}")
        fields.append(f"{var}/{denom}")
        names.append(f"{s}0")
    return fields, names


def alpha360_window_names(series: Sequence[str] = ALPHA360_SERIES) -> list[str]:
    """The shard column order: time-major, oldest first, so a row reshapes to (T=60, C=6)
    (C=5 for ``series`` without VWAP: ``--vwap drop``)."""
    return [f"{s}{t}" for t in range(ALPHA360_LOOKBACK - 1, -1, -1) for s in series]


def alpha158_fields() -> tuple[list[str], list[str]]:
    """qlib's Alpha158 expressions and names (the Alpha158 handler's default config)."""
    from qlib.contrib.data.loader import Alpha158DL

    fields, names = Alpha158DL.get_feature_config()
    return list(fields), list(names)


@dataclass(kw_only=True)
class Segments:
    """train/valid/test as trading days of the calendar (first and last, inclusive)."""

    train: tuple[pd.Timestamp, pd.Timestamp]
    valid: tuple[pd.Timestamp, pd.Timestamp]
    test: tuple[pd.Timestamp, pd.Timestamp]

    def as_meta(self) -> dict[str, list[str]]:
        return {k: [_iso(a), _iso(b)] for k, (a, b) in
                (("train", self.train), ("valid", self.valid), ("test", self.test))}


def check_segments(calendar: pd.DatetimeIndex, *, train: Sequence[Any], valid: Sequence[Any],
                   test: Sequence[Any]) -> Segments:
    """Parse and check the segments against the calendar; snap each to its trading days."""
    snapped = {}
    prev_end: pd.Timestamp | None = None
    prev_name = ""
    for name, seg in (("train", train), ("valid", valid), ("test", test)):
        if len(seg) != 2:
            raise DataError(f"--{name}: expected (start, end), got {seg!r}")
        try:
            a, b = pd.Timestamp(seg[0]), pd.Timestamp(seg[1])
        except (ValueError, TypeError):
            raise DataError(f"--{name}: {seg[0]!r}:{seg[1]!r} are not dates like 2015-01-02") from None
        if pd.isna(a) or pd.isna(b):
            raise DataError(f"--{name}: {seg!r} are not dates like 2015-01-02")
        if a > b:
            raise DataError(f"--{name}: start {a.date()} is after end {b.date()}")
        for d in (a, b):
            if d < calendar[0] or d > calendar[-1]:
                raise DataError(f"--{name}: {d.date()} is outside the calendar "
                                f"{calendar[0].date()}..{calendar[-1].date()}")
        days = calendar[(calendar >= a) & (calendar <= b)]
        if len(days) == 0:
            raise DataError(f"--{name}: {a.date()}..{b.date()} holds no trading days")
        if prev_end is not None and days[0] <= prev_end:
            raise DataError(f"--{name}: starts {days[0].date()}, not after the end of --{prev_name} "
                            f"{prev_end.date()}; segments must be ordered and disjoint")
        snapped[name] = (days[0], days[-1])
        prev_end, prev_name = days[-1], name
    return Segments(**snapped)


@dataclass(kw_only=True)
class RawFeatures:
    """Unprocessed features and raw label of one market over a date range, as arrays.

    Kept as arrays rather than a DataFrame: Alpha360 has 360 float32 columns,
    and pandas' per-column assignment would fragment and copy them.
    """

    datetime: np.ndarray  # (rows,) datetime64[ns], sorted by (datetime, instrument)
    instrument: np.ndarray  # (rows,) object
    x: np.ndarray  # (rows, F) float32, columns in feature_names order
    ret: np.ndarray  # (rows,) float32: the raw label
    feature_names: list[str]
    layout: str  # "window" or "daily"
    lookback: int
    channels: int
    label_native: bool
    dropped_no_bar: int  # rows qlib would emit on days the instrument had no bar (no $close)
    timings: dict[str, float]
    vwap: str | None = None  # what was done for an absent $vwap (approx/drop), for meta.json

    def frame(self) -> pd.DataFrame:
        """datetime, instrument, the features and ret as one DataFrame (for checks and comparisons)."""
        return pd.concat([pd.DataFrame({"datetime": self.datetime, "instrument": self.instrument}),
                          pd.DataFrame(self.x, columns=self.feature_names, copy=False),
                          pd.DataFrame({"ret": self.ret})], axis=1)


def _rows(qdir: QlibDir, lo: int, hi: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, int]:
    """The (day, instrument) rows to export on calendar indices lo..hi.

    qlib's D.features emits, for each instrument of the market, the days inside
    its membership spans (clipped to the query) on which its bin files have a
    value slot. We keep those and drop the days without a bar (no $close): every
    Alpha360 feature is NaN there and would become an all-zero input.

    Returns instruments (sorted), close (hi-lo+1, I), row day offsets, row
    instrument indices (sorted by day, then instrument) and the count dropped.
    """
    cal = qdir.calendar
    start, end = cal[lo], cal[hi]
    instruments = []
    member_rows = []
    for inst in sorted(qdir.spans):
        clipped = [(max(start, s), min(end, e)) for s, e in qdir.spans[inst]]
        clipped = [(s, e) for s, e in clipped if s <= e]
        if clipped:
            instruments.append(inst)
            member_rows.append(clipped)
    if not instruments:
        raise DataError(f"--market {qdir.market!r}: no instruments between {start.date()} and {end.date()} "
                        f"in {qdir.root / 'instruments' / (qdir.market.lower() + '.txt')}")
    days = cal[lo: hi + 1]
    member = np.zeros((len(days), len(instruments)), dtype=bool)
    for j, spans in enumerate(member_rows):
        for s, e in spans:
            member[:, j] |= (days >= s) & (days <= e)
    close = dense_field(qdir, instruments, "close", lo, hi)
    # qlib's row exists wherever the bin has a slot (value or NaN between first and last day)
    slot = np.zeros_like(member)
    for j, inst in enumerate(instruments):
        path = qdir.root / "features" / code_to_fname(inst).lower() / "close.day.bin"
        if path.is_file():
            first, vals = read_bin(path)
            a, b = max(first, lo), min(first + len(vals) - 1, hi)
            if a <= b:
                slot[a - lo: b - lo + 1, j] = True
    keep = member & ~np.isnan(close)
    d, i = np.nonzero(keep)
    return instruments, close, d, i, int((member & slot).sum() - keep.sum())


def compute_raw(qdir: QlibDir, *, handler: str, start: pd.Timestamp, end: pd.Timestamp, label: str,
                lookback: int, extra_features: Sequence[str], region: str, kernels: int = 1,
                vwap: str = "require") -> RawFeatures:
    """Unprocessed features plus the raw label (``ret``) on trading days start..end.

    A field the handler needs that no instrument of the market has (no ``<field>.day.bin``) is an
    error naming it; for ``$vwap``, ``vwap`` chooses: ``approx`` uses (high+low+close)/3,
    ``drop`` leaves out the features that read it (``RawFeatures.vwap`` says which was done)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cal = qdir.calendar
    lo = int(cal.searchsorted(start, "left"))
    hi = int(cal.searchsorted(end, "right")) - 1
    instruments, close, d, i, dropped = _rows(qdir, lo, hi)
    if len(d) == 0:
        raise DataError(f"--market {qdir.market!r}: no instrument has a bar between {start.date()} and {end.date()}")
    dt = cal[lo: hi + 1][d].to_numpy(dtype="datetime64[ns]")
    inst = np.asarray(instruments, dtype=object)[i]
    extras = _parse_extra(extra_features)
    label_native = _same_expr(label, DEFAULT_LABEL)
    timings["rows"] = time.perf_counter() - t0

    engine_fields: list[str] = []
    engine_names: list[str] = []
    if handler not in HANDLERS:
        raise DataError(f"--handler: {handler!r} is not one of {list(HANDLERS)}")
    need = set(_ALPHA360_FIELD.values()) if handler == "Alpha360" else \
        {f for e in alpha158_fields()[0] for f in _FIELD_REF.findall(e)}  # (--feature's: checked below)
    vwap_note = _check_fields(qdir, instruments, need, handler=handler, vwap=vwap)
    if handler == "Alpha360":
        if extras:
            raise DataError("--feature: extra features need the daily layout (--handler Alpha158); "
                            "Alpha360 rows are fixed 60 x 6 windows")
        t0 = time.perf_counter()
        series = tuple(s for s in ALPHA360_SERIES if not (s == "VWAP" and vwap == "drop"))
        x = _alpha360_native(qdir, instruments, lo, hi, d, i, close, series=series, vwap_approx=vwap == "approx")
        names = alpha360_window_names(series)
        timings["alpha360_native"] = time.perf_counter() - t0
        x = x.reshape(len(d), -1)
        layout, t_len, channels = "window", ALPHA360_LOOKBACK, len(series)
    else:
        fields, names = alpha158_fields()
        if vwap == "drop":
            names = [n for n, f in zip(names, fields) if "$vwap" not in f]
            fields = [f for f in fields if "$vwap" not in f]
        elif vwap == "approx":
            fields = [f.replace("$vwap", _VWAP_APPROX_EXPR) for f in fields]
        clash = sorted(set(names) & {n for n, _ in extras})
        if clash:
            raise DataError(f"--feature: name(s) {clash} already used by Alpha158")
        engine_fields, engine_names = fields + [e for _, e in extras], names + [n for n, _ in extras]
        names = list(engine_names)
        x = None
        layout, t_len, channels = "daily", lookback, len(names)
    if not label_native:
        engine_fields.append(label)
        engine_names.append("ret")

    if engine_fields:
        t0 = time.perf_counter()
        what = "--label" if handler == "Alpha360" else "--handler/--feature/--label"
        got = engine_features(qdir, engine_fields, engine_names, start=cal[lo], end=cal[hi], region=region,
                              kernels=kernels, what=what)
        got = got.reindex(pd.MultiIndex.from_arrays([dt, inst]))
        timings["qlib_engine"] = time.perf_counter() - t0
        if handler == "Alpha158":
            x = got[names].to_numpy(dtype=np.float32, copy=True)
        ret = got["ret"].to_numpy(dtype=np.float32) if not label_native else None
    else:
        ret = None
    if label_native:
        t0 = time.perf_counter()
        ret = _label_native(qdir, instruments, lo, hi, d, i)
        timings["label_native"] = time.perf_counter() - t0
    assert x is not None and ret is not None
    # qlib reads a field with no .bin file as all-NaN, silently: catch typos in user expressions here
    if not np.isfinite(ret).any():
        raise DataError(f"--label: {label!r} has no finite value on any row (a field without .bin files, "
                        "or a range too short for its window?)")
    for k, (name, expr) in enumerate(extras):
        if np.isnan(x[:, len(names) - len(extras) + k]).all():
            raise DataError(f"--feature: {name}={expr} is NaN on every row (a field without .bin files?)")
    return RawFeatures(datetime=dt, instrument=inst, x=x, ret=ret, feature_names=list(names), layout=layout,
                       lookback=t_len, channels=channels, label_native=label_native, dropped_no_bar=dropped,
                       timings=timings, vwap=vwap_note)


def _check_fields(qdir: QlibDir, instruments: list[str], fields: set[str], *, handler: str, vwap: str) -> str | None:
    """Raise for a field ``handler`` needs that no instrument has a .bin file of (for ``$vwap``, unless
    ``vwap`` is approx or drop); return what meta.json records of the ``vwap`` choice (None: require)."""
    if vwap not in VWAP_CHOICES:
        raise DataError(f"--vwap: {vwap!r} is not one of {list(VWAP_CHOICES[1:])}")
    absent = set()
    for field in sorted(fields):
        if not any((qdir.root / "features" / code_to_fname(inst).lower() / f"{field}.day.bin").is_file()
                   for inst in instruments):
            absent.add(field)
            where = f"{qdir.root / 'features'} has no {field}.day.bin for any instrument of market {qdir.market!r}"
            if field != "vwap":
                raise DataError(f"--handler {handler}: needs ${field}, but {where}; supply the field")
            if vwap == "require":
                raise DataError(f"--handler {handler}: needs $vwap, but {where}; choose --vwap approx "
                                f"({VWAP_APPROX}, recorded in meta.json), --vwap drop (leave out the VWAP "
                                "features, recorded), or supply the field")
    if vwap == "require" or "vwap" not in fields:
        return None
    why = "the qlib directory has no $vwap" if "vwap" in absent else "asked for, although the directory has $vwap"
    return (f"approx: {VWAP_APPROX} ({why})" if vwap == "approx" else
            f"drop: the VWAP features are left out ({why})")


def _alpha360_native(qdir: QlibDir, instruments: list[str], lo: int, hi: int, d: np.ndarray, i: np.ndarray,
                     close: np.ndarray, *, series: Sequence[str] = ALPHA360_SERIES,
                     vwap_approx: bool = False) -> np.ndarray:
    """(rows, 60, C) float32: Alpha360 from the bins, time-major, oldest first (C = len(series)).

    Feature (lag L, series S) of row (day t, instrument j) is S[t - L, j] / close[t, j]
    (volume: / (volume[t, j] + 1e-12)), in float32 like qlib's float32 series. With
    ``vwap_approx`` the VWAP series is (high + low + close) / 3.
    """
    pad = ALPHA360_LOOKBACK - 1
    out = np.empty((len(d), ALPHA360_LOOKBACK, len(series)), dtype=np.float32)
    today_close = close[d, i]
    for c, s in enumerate(bar(series, desc="[fvae.data] Alpha360 fields", unit="field")):
        if s == "VWAP" and vwap_approx:
            arr = sum(dense_field(qdir, instruments, f, lo - pad, hi) for f in ("high", "low", "close")) / np.float32(3)
        else:
            arr = dense_field(qdir, instruments, _ALPHA360_FIELD[s], lo - pad, hi)  # padded for the lags
        if s == "VOLUME":
            denom = arr[d + pad, i] + _VOLUME_EPS
        else:
            denom = today_close
        with np.errstate(divide="ignore", invalid="ignore"):
            for lag in range(ALPHA360_LOOKBACK):
                np.divide(arr[d + pad - lag, i], denom, out=out[:, pad - lag, c])
    return out


def _label_native(qdir: QlibDir, instruments: list[str], lo: int, hi: int, d: np.ndarray,
                  i: np.ndarray) -> np.ndarray:
    """Ref($close, -2)/Ref($close, -1) - 1 in float32: the return from t+1's close to t+2's."""
    close = dense_field(qdir, instruments, "close", lo, hi + 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (close[d + 2, i] / close[d + 1, i]) - np.float32(1)


def _same_expr(a: str, b: str) -> bool:
    return re.sub(r"\s+", "", a) == re.sub(r"\s+", "", b)


def _parse_extra(extra: Sequence[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for item in extra:
        name, sep, expr = item.partition("=")
        name, expr = name.strip(), expr.strip()
        if not sep or not name or not expr:
            raise DataError(f"--feature: {item!r} is not NAME=EXPR (e.g. RET1=$close/Ref($close,1)-1)")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise DataError(f"--feature: name {name!r} must be an identifier")
        if name in {n for n, _ in out} or name in ("datetime", "instrument", "label", "ret"):
            raise DataError(f"--feature: name {name!r} is used twice or reserved")
        out.append((name, expr))
    return out


_QLIB_STATE: dict[str, Any] = {}


def init_qlib(provider_uri: str | Path, *, region: str, kernels: int = 1) -> None:
    """qlib.init for this provider, once per (provider, region, kernels); qlib's state is process-global.

    The recorder (``R``/mlflow) is never used; its experiment manager gets a
    sqlite uri under the temp folder so nothing is created in the working dir.
    Re-initialising with another provider clears qlib's memory caches.
    """
    import qlib
    from qlib.constant import REG_CN, REG_US

    if region not in REGIONS:
        raise DataError(f"--region: {region!r} is not one of {list(REGIONS)}")
    key = (str(Path(provider_uri).expanduser().resolve()), region, kernels)
    if _QLIB_STATE.get("key") == key:
        return
    mlruns = Path(tempfile.gettempdir()) / "fvae-qlib-mlruns.db"
    hook = sys.excepthook  # qlib.init installs a hook that logs every uncaught error as a failed experiment
    qlib.init(provider_uri=key[0], region=REG_US if region == "us" else REG_CN, kernels=kernels,
              logging_level=logging.WARNING, clear_mem_cache=True,
              exp_manager={"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                           "kwargs": {"uri": f"sqlite:///{mlruns}", "default_exp_name": "fvae"}})
    sys.excepthook = hook
    _QLIB_STATE["key"] = key


def engine_features(qdir: QlibDir, fields: list[str], names: list[str], *, start: pd.Timestamp,
                    end: pd.Timestamp, region: str, kernels: int = 1, what: str = "--feature") -> pd.DataFrame:
    """qlib's ``D.features`` over the market: a (datetime, instrument)-indexed frame with columns ``names``."""
    init_qlib(qdir.root, region=region, kernels=kernels)
    from qlib.data import D
    from qlib.data.cache import H

    H.clear()  # qlib caches calendars, instrument lists and series per process; the files may have changed
    uniq = list(dict.fromkeys(fields))
    try:
        df = D.features(D.instruments(qdir.market), uniq, start_time=start, end_time=end, freq="day")
    except (SyntaxError, NameError, AttributeError, TypeError, ValueError, KeyError) as e:
        raise DataError(f"{what}: qlib could not evaluate the expressions ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    df.columns = uniq
    df = df[fields]
    df.columns = names
    df = df.swaplevel(0, 1).sort_index()
    df.index = df.index.set_names(["datetime", "instrument"])
    return df


def process_raw(raw: RawFeatures, train_mask: np.ndarray | None,
                norm: dict[str, Any] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """fvae's processing: features robust-z-scored on train rows, ``label`` = CSRankNorm(ret).

    The same arithmetic as ``fvae.data.process.process_features`` (whose stats
    dict it returns too), applied a block of columns at a time: Alpha360 has
    360 columns, and a float64 copy of all of them would need twice the memory
    of the float32 features again. ``raw.x`` is overwritten. Returns the
    shard frame (datetime, instrument, features, label, ret) and meta.norm.
    With ``norm`` (an earlier call's meta.norm) its statistics are applied
    instead of fitted (``train_mask`` unused).
    """
    x = raw.x
    medians, scales = [], []
    for a in bar(range(0, x.shape[1], _NORM_CHUNK), desc="[fvae.data] normalise features", unit="block"):
        block = x[:, a: a + _NORM_CHUNK].astype(np.float64)
        if norm is not None:
            median = np.asarray(norm["median"][a: a + _NORM_CHUNK], dtype=np.float64)
            scale = np.asarray(norm["scale"][a: a + _NORM_CHUNK], dtype=np.float64)
        else:
            median, scale = robust_zscore_fit(block[train_mask])
            empty = np.flatnonzero(np.isnan(median))
            if len(empty):  # an all-NaN column would be filled with 0 on every row: say it instead
                bad = [raw.feature_names[a + j] for j in empty]
                raise DataError(f"--train: feature(s) {bad[:4]}{' ...' if len(bad) > 4 else ''} are NaN on every "
                                "training row (a field the handler needs is missing, or the train segment is "
                                "shorter than their window); fix the data or the segment")
        x[:, a: a + _NORM_CHUNK] = robust_zscore_apply(block, median, scale)
        medians.append(median)
        scales.append(scale)
    ret = raw.ret.astype(np.float64)
    ret[~np.isfinite(ret)] = np.nan
    label = cs_rank_norm(pd.Series(ret), raw.datetime)
    frame = pd.concat([pd.DataFrame({"datetime": raw.datetime, "instrument": raw.instrument}),
                       pd.DataFrame(x, columns=raw.feature_names, copy=False),
                       pd.DataFrame({"label": label, "ret": ret.astype(np.float32)})], axis=1)
    median, scale = np.concatenate(medians), np.concatenate(scales)
    norm = {"method": "robust_zscore", "fit_segment": "train", "clip": CLIP, "fillna": 0.0,
            "median": [float(v) for v in median], "scale": [float(v) for v in scale],
            "label": "cs_rank_norm"}
    return frame, norm


def export(*, provider_uri: str | Path, region: str, market: str, handler: str, train: Sequence[Any],
           valid: Sequence[Any], test: Sequence[Any], out: str | Path, label: str = DEFAULT_LABEL,
           lookback: int = 20, extra_features: Sequence[str] = (), kernels: int = 1, vwap: str = "require") -> Meta:
    """Compute ``handler``'s features and the label for ``market`` and write shards to ``out``.

    Rows run from the first trading day of ``train`` to the last of ``test``, plus, for the daily
    layout, the ``lookback`` − 1 trading days before ``train`` (history for the first windows);
    normalisation statistics come from the train rows only. ``lookback`` is the
    window the loader builds for the daily layout (Alpha158); Alpha360 rows are
    60-day windows already. ``kernels`` is qlib's worker count for the
    expression engine (Alpha158, extra features, non-default labels). ``vwap``: what to do when
    the directory has no ``$vwap`` (``require``: an error naming the choices; ``approx``; ``drop``).
    """
    if handler not in HANDLERS:
        raise DataError(f"--handler: {handler!r} is not one of {list(HANDLERS)}")
    if region not in REGIONS:
        raise DataError(f"--region: {region!r} is not one of {list(REGIONS)}")
    if lookback < 1:
        raise DataError(f"--lookback: {lookback} must be at least 1")
    if not label or not label.strip():
        raise DataError("--label: empty expression")
    check_out_folder(out)
    qdir = open_qlib_dir(provider_uri, market)
    seg = check_segments(qdir.calendar, train=train, valid=valid, test=test)
    # the daily layout's windows need T-1 trading days before the first training day: export them
    # as history rows (outside every segment, normalised with the train statistics)
    first = int(qdir.calendar.searchsorted(seg.train[0], "left"))
    start = qdir.calendar[max(0, first - (lookback - 1))] if handler != "Alpha360" else seg.train[0]
    raw = compute_raw(qdir, handler=handler, start=start, end=seg.test[1], label=label,
                      lookback=lookback, extra_features=extra_features, region=region, kernels=kernels, vwap=vwap)
    train_mask = (raw.datetime >= seg.train[0].to_datetime64()) & (raw.datetime <= seg.train[1].to_datetime64())
    if not train_mask.any():
        raise DataError(f"--train: {_iso(seg.train[0])}..{_iso(seg.train[1])} holds no rows for market {market!r}")
    t0 = time.perf_counter()
    frame, norm = process_raw(raw, train_mask)
    raw.timings["process"] = time.perf_counter() - t0
    extra: dict[str, Any] = {"region": region, "label": "native" if raw.label_native else "qlib expression engine",
                             "dropped_rows_without_bar": raw.dropped_no_bar}
    if handler == "Alpha158" or extra_features:
        extra["qlib_features"] = "qlib.data.D.features"
    if qdir.import_info.get("vwap_approx"):
        extra["vwap_approx"] = qdir.import_info["vwap_approx"]
    if raw.vwap:
        extra["vwap"] = raw.vwap
    if qdir.import_info.get("warnings"):
        extra["import_warnings"] = qdir.import_info["warnings"]
    meta = Meta(source=f"qlib:{provider_uri}", handler=handler, market=market, layout=raw.layout,
                lookback=raw.lookback, channels=raw.channels, feature_names=raw.feature_names,
                label_expr=label, segments=seg.as_meta(), norm=norm, extra=extra)
    t0 = time.perf_counter()
    meta = write_shards(out, frame, meta)
    raw.timings["write"] = time.perf_counter() - t0
    log.info("export timings %s", {k: round(v, 2) for k, v in raw.timings.items()})
    return meta


def handler_alpha360(qdir: QlibDir, *, start: pd.Timestamp, end: pd.Timestamp, fit_start: pd.Timestamp,
                     fit_end: pd.Timestamp, region: str, kernels: int) -> pd.DataFrame:
    """qlib's own Alpha360 handler with its default processors, fetched (the reference the benchmark times)."""
    init_qlib(qdir.root, region=region, kernels=kernels)
    from qlib.contrib.data.handler import Alpha360

    h = Alpha360(instruments=qdir.market, start_time=start, end_time=end, fit_start_time=fit_start,
                 fit_end_time=fit_end)
    return h.fetch()


# --------------------------------------------------------------------------- qlib's DatasetH -> fvae


def handler_layout(columns: Sequence[str], *, lookback: int) -> tuple[list[str], str, int, int]:
    """(shard feature order, layout, T, C) of a qlib handler's feature columns.

    Alpha360's 360 columns are 60-day windows of 6 series: reordered time-major, oldest first
    (the window layout, as ``export`` writes it). Any other set (Alpha158, a custom handler) is
    C features of the day, and the loader builds ``lookback``-day windows (the daily layout).
    """
    cols = [str(c) for c in columns]
    if sorted(cols) == sorted(alpha360_fields()[1]):
        return alpha360_window_names(), "window", ALPHA360_LOOKBACK, len(ALPHA360_SERIES)
    if lookback < 1:
        raise DataError(f"lookback: {lookback} must be at least 1")
    return cols, "daily", lookback, len(cols)


def raw_from_handler(feature: pd.DataFrame, ret: pd.Series | None, *, lookback: int) -> RawFeatures:
    """A qlib handler's (datetime, instrument)-indexed feature frame (the "feature" column group)
    and raw label as RawFeatures, rows sorted by (datetime, instrument); ``ret`` None: all NaN."""
    feature = feature.sort_index()
    names, layout, t_len, channels = handler_layout(feature.columns, lookback=lookback)
    cols = pd.Index([str(c) for c in feature.columns])
    x = feature.to_numpy(dtype=np.float32)[:, cols.get_indexer(names)]
    r = (np.full(len(feature), np.nan, dtype=np.float32) if ret is None else
         ret.reindex(feature.index).to_numpy(dtype=np.float32))
    return RawFeatures(datetime=feature.index.get_level_values(0).to_numpy(dtype="datetime64[ns]"),
                       instrument=feature.index.get_level_values(1).to_numpy(dtype=object).astype(str).astype(object),
                       x=np.ascontiguousarray(x), ret=r, feature_names=names, layout=layout, lookback=t_len,
                       channels=channels, label_native=False, dropped_no_bar=0, timings={})
