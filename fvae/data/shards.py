"""The shard format: one row per stock-day in Arrow/Parquet files, plus meta.json.

A shard folder holds

    meta.json                 what the shards are (see ``Meta``); written last
    shards/YYYY.parquet       rows of one calendar year, sorted by (datetime, instrument)

Columns of every shard: ``datetime`` (timestamp[ns]), ``instrument`` (string),
the feature columns named in ``meta.feature_names`` (float32), ``label``
(float32, the training target after processing) and ``ret`` (float32, the raw
label: the realised forward return that backtests use). Extra float columns are
allowed (the synthetic market adds ``mu_true``).

Two layouts:
- ``window``: each row already holds a T x C window (Alpha360); the feature
  columns are ordered time-major, oldest first, so a row reshapes to (T, C).
- ``daily``: each row holds C features of that day (Alpha158, synthetic); the
  loader builds T-day windows from consecutive days, never storing them T times.

Writes are atomic: each file is written under a temporary name and renamed, and
meta.json, written last, is what makes a folder complete. A folder without it
is an interrupted export, and reading it is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fvae.io import atomic_write_bytes, atomic_write_json, read_json
from fvae.progress import bar

TRUTH_FILE = "truth.parquet"  # a synthetic market's realised factor returns z_t, beside its shards

FORMAT_VERSION = 1
META_FILE = "meta.json"
SHARD_DIR = "shards"
SEGMENTS = ("train", "valid", "test")
KEY_COLUMNS = ("datetime", "instrument")
TARGET_COLUMNS = ("label", "ret")


class DataError(ValueError):
    """Bad input data; the message names the file or field and what was expected."""


@dataclass(kw_only=True)
class Meta:
    """What a shard folder holds. Serialised as meta.json."""

    source: str  # "synthetic" or "qlib:<provider_uri>"
    handler: str  # "Alpha360", "Alpha158", "synthetic", ...
    market: str
    layout: Literal["window", "daily"]
    lookback: int  # T
    channels: int  # C
    feature_names: list[str]
    label_expr: str
    segments: dict[str, list[str]]  # name -> [first day, last day], ISO dates, inclusive
    norm: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    days: dict[str, int] = field(default_factory=dict)
    instruments: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def segment_range(self, name: str) -> tuple[pd.Timestamp, pd.Timestamp]:
        if name not in self.segments:
            raise DataError(f"meta.json: no segment '{name}' (have {sorted(self.segments)})")
        a, b = self.segments[name]
        return pd.Timestamp(a), pd.Timestamp(b)


def read_meta(folder: str | Path) -> Meta:
    folder = Path(folder)
    path = folder / META_FILE
    if not folder.is_dir():
        raise DataError(f"{folder}: shard folder not found")
    if not path.is_file():
        raise DataError(f"{path}: missing; the folder is not a finished export (was it interrupted?)")
    raw = read_json(path, error=DataError)
    names = {f.name for f in dataclasses.fields(Meta)}
    missing = [f.name for f in dataclasses.fields(Meta) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in raw]
    if missing:
        raise DataError(f"{path}: missing field(s) {missing}")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise DataError(f"{path}: unknown field(s) {unknown}")
    meta = Meta(**raw)
    if meta.format_version != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {meta.format_version}, this fvae reads {FORMAT_VERSION}")
    expect = meta.lookback * meta.channels if meta.layout == "window" else meta.channels
    if len(meta.feature_names) != expect:
        raise DataError(f"{path}: {len(meta.feature_names)} feature_names, layout '{meta.layout}' "
                        f"with T={meta.lookback}, C={meta.channels} expects {expect}")
    return meta


def check_frame(df: pd.DataFrame, feature_names: list[str], *, where: str) -> None:
    """Validate a stock-day frame before it becomes shards; raise one clear DataError."""
    need = list(KEY_COLUMNS) + list(feature_names) + list(TARGET_COLUMNS)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing[:5]}")
    if df.empty:
        raise DataError(f"{where}: no rows")
    if not pd.api.types.is_datetime64_any_dtype(df["datetime"]):
        raise DataError(f"{where}: column 'datetime' has dtype {df['datetime'].dtype}, expected datetime64")
    for c in list(feature_names) + list(TARGET_COLUMNS):
        if not pd.api.types.is_float_dtype(df[c]):
            raise DataError(f"{where}: column '{c}' has dtype {df[c].dtype}, expected float")
    dup = df.duplicated(list(KEY_COLUMNS))
    if dup.any():
        row = df.iloc[int(np.argmax(dup.to_numpy()))]
        raise DataError(f"{where}: {int(dup.sum())} duplicate (datetime, instrument) rows, "
                        f"first {row['instrument']} on {row['datetime'].date()}")
    cols = list(feature_names) + list(TARGET_COLUMNS)
    for i in range(0, len(cols), 64):  # a block of columns at a time: Alpha360 frames are GBs wide
        block = cols[i:i + 64]
        values = df[block].to_numpy(dtype=np.float32)
        inf = np.isinf(values)
        if inf.any():
            col = block[int(np.argmax(inf.any(axis=0)))]
            raise DataError(f"{where}: column '{col}' holds {int(inf.sum())} inf values; expected finite or NaN")
        all_nan = np.isnan(values).all(axis=0)
        for j, c in enumerate(block):
            if all_nan[j] and c in feature_names:
                raise DataError(f"{where}: feature '{c}' is NaN on every row")


RUN_MARKERS = ("metrics.json", "checkpoints", "best.pt", "config.yaml", "tb", "ray")  # what fvae.train writes


def check_out_folder(out: str | Path) -> None:
    """``--out`` of an export: a new or empty folder, or an earlier shard folder (it is replaced);
    never a training run's folder or other data."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    run = [m for m in RUN_MARKERS if (out / m).exists()]
    if run:
        raise DataError(f"--out {out}: holds a training run ({run[0]}); refusing to write shards into it "
                        "(use an empty folder)")
    if not ((out / META_FILE).is_file() or (out / SHARD_DIR).is_dir()):
        raise DataError(f"--out {out}: folder is not empty and holds no {META_FILE} or {SHARD_DIR}/; refusing "
                        "to overwrite data fvae did not write (use an empty folder)")


def write_shards(folder: str | Path, df: pd.DataFrame, meta: Meta) -> Meta:
    """Write ``df`` (one row per stock-day) as yearly shards plus meta.json.

    ``meta`` supplies everything but the bookkeeping fields (rows, days,
    instruments, shards, fingerprint), which are filled in here. Returns the
    finished Meta.
    """
    folder = Path(folder)
    check_frame(df, meta.feature_names, where=str(folder))
    extra_cols = [c for c in df.columns
                  if c not in KEY_COLUMNS and c not in TARGET_COLUMNS and c not in set(meta.feature_names)]
    cols = list(KEY_COLUMNS) + list(meta.feature_names) + list(TARGET_COLUMNS) + extra_cols
    df = df[cols].sort_values(list(KEY_COLUMNS), kind="stable").reset_index(drop=True)
    df["instrument"] = df["instrument"].astype(str)
    for c in cols[2:]:
        df[c] = df[c].astype(np.float32)

    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / META_FILE
    if meta_path.exists():  # an interrupted rewrite must not look complete
        meta_path.unlink()
    shard_dir = folder / SHARD_DIR
    shard_dir.mkdir(exist_ok=True)
    for old in shard_dir.glob("*.parquet"):
        old.unlink()

    digest = hashlib.sha256()
    digest.update(json.dumps([meta.layout, meta.lookback, meta.channels, meta.feature_names]).encode())
    shards = []
    years = df["datetime"].dt.year.to_numpy()
    for year in bar(np.unique(years), desc=f"[fvae.data] shards of {folder.name}", unit="shard"):
        part = df[years == year]
        table = pa.Table.from_pandas(part, preserve_index=False)
        sink = pa.BufferOutputStream()
        # dictionary-encode the symbols only: on float columns it makes files larger and slower
        pq.write_table(table, sink, compression="zstd", use_dictionary=["instrument"], row_group_size=1 << 17)
        data = sink.getvalue().to_pybytes()
        name = f"{int(year)}.parquet"
        atomic_write_bytes(shard_dir / name, data)
        digest.update(hashlib.sha256(data).digest())
        shards.append({"file": f"{SHARD_DIR}/{name}",
                       "start": part["datetime"].iloc[0].strftime("%Y-%m-%d"),
                       "end": part["datetime"].iloc[-1].strftime("%Y-%m-%d"),
                       "rows": int(len(part))})

    meta = dataclasses.replace(meta)
    meta.shards = shards
    meta.fingerprint = digest.hexdigest()
    meta.instruments = int(df["instrument"].nunique())
    meta.rows, meta.days = {}, {}
    for name, (a, b) in meta.segments.items():
        seg = df[(df["datetime"] >= pd.Timestamp(a)) & (df["datetime"] <= pd.Timestamp(b))]
        if seg.empty:
            raise DataError(f"{folder}: segment '{name}' {a}..{b} holds no rows")
        meta.rows[name] = int(len(seg))
        meta.days[name] = int(seg["datetime"].nunique())
    atomic_write_json(meta_path, dataclasses.asdict(meta))
    return meta


def check_shards(folder: str | Path, meta: Meta) -> None:
    """Every shard meta.json lists is there, has the columns and types of the format and the rows
    meta.json says, and holds no inf label or return: checked from the files' footers and their
    two target columns, before any training, so that a bad shard is not found after the last epoch.
    """
    folder = Path(folder)
    if not meta.shards:
        raise DataError(f"{folder / META_FILE}: lists no shards")
    for s in meta.shards:
        path = folder / s["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in meta.json is missing (re-export the folder)")
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: unreadable shard ({_first_line(e)})") from None
        schema = pf.schema_arrow
        _check_schema(path, schema, meta)
        if pf.metadata.num_rows != s["rows"]:
            raise DataError(f"{path}: {pf.metadata.num_rows} rows, meta.json says {s['rows']}")
        try:
            table = pf.read(columns=list(TARGET_COLUMNS))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: unreadable shard ({_first_line(e)})") from None
        for c in TARGET_COLUMNS:
            inf = int(pc.sum(pc.is_inf(table.column(c))).as_py() or 0)
            if inf:
                raise DataError(f"{path}: column '{c}' holds {inf} inf value(s); expected finite values "
                                "(NaN marks a missing one)")


def _check_schema(path: Path, schema: pa.Schema, meta: Meta) -> None:
    """One line naming the file and the first column that is missing or of the wrong type."""
    names = set(schema.names)
    for c in (*KEY_COLUMNS, *meta.feature_names, *TARGET_COLUMNS):
        if c not in names:
            what = "a feature in meta.json" if c in meta.feature_names else "a column of every shard"
            raise DataError(f"{path}: column '{c}' is missing ({what})")
    t = schema.field("datetime").type
    if not pa.types.is_timestamp(t):
        raise DataError(f"{path}: column 'datetime' has type {t}, expected timestamp")
    t = schema.field("instrument").type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(f"{path}: column 'instrument' has type {t}, expected string")
    for c in (*meta.feature_names, *TARGET_COLUMNS):
        t = schema.field(c).type
        if not pa.types.is_floating(t):
            raise DataError(f"{path}: column '{c}' has type {t}, expected float")


def _read_error(path: Path, columns: list[str] | None, e: BaseException) -> str:
    """Why a shard could not be read, in one line: Arrow's message for a missing column is the
    file's whole schema, one line per column."""
    try:
        missing = [c for c in columns or [] if c not in pq.read_schema(path).names]
    except (pa.ArrowInvalid, OSError):
        missing = []
    return f"column(s) {missing[:5]} missing" if missing else f"unreadable shard ({_first_line(e)})"


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def read_rows(folder: str | Path, meta: Meta, start: pd.Timestamp, end: pd.Timestamp,
              columns: list[str] | None = None) -> pd.DataFrame:
    """Rows with start <= datetime <= end from the shards that overlap that range."""
    folder = Path(folder)
    parts = []
    for s in meta.shards:
        if pd.Timestamp(s["end"]) < start or pd.Timestamp(s["start"]) > end:
            continue
        path = folder / s["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in meta.json is missing")
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: {_read_error(path, columns, e)}") from None
        if table.num_rows != s["rows"]:
            raise DataError(f"{path}: {table.num_rows} rows, meta.json says {s['rows']}")
        parts.append(table.to_pandas())
    if not parts:
        return pd.DataFrame(columns=columns or [])
    df = pd.concat(parts, ignore_index=True)
    return df[(df["datetime"] >= start) & (df["datetime"] <= end)].reset_index(drop=True)


def verify_fingerprint(folder: str | Path, meta: Meta) -> None:
    """Recompute the content fingerprint and raise if a shard changed since export."""
    folder = Path(folder)
    digest = hashlib.sha256()
    digest.update(json.dumps([meta.layout, meta.lookback, meta.channels, meta.feature_names]).encode())
    for s in meta.shards:
        digest.update(hashlib.sha256((folder / s["file"]).read_bytes()).digest())
    if digest.hexdigest() != meta.fingerprint:
        raise DataError(f"{folder}: content fingerprint differs from meta.json; shards changed after export")
