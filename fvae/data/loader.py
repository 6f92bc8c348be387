"""The day loader: a cached day x stock panel, non-overlapping day batches, rank shards.

One sample is one trading day's whole cross-section. A segment is read from
the shards once into dense tensors (on the CPU, or on the GPU when training
there); a batch is then a gather, with no file I/O per step:

    x (B, N, T, C)   features of the B days' windows, N = most real stocks on any of the B days
    y (B, N)         processed label (cross-sectional rank-normalised)
    mask (B, N)      True for real stocks; padded entries of x and y are 0

Non-overlapping batching: day d's window covers days d-T+1..d. Grouping days by
d mod S for a stride S >= T drawn each epoch (with a random phase), and cutting
each group into runs at a random start, gives batches whose days are S apart, so
their windows never overlap; every day lands in exactly one batch per epoch, and
the batches change from epoch to epoch. The training loop divides each batch's
summed loss by the nominal batch size, so a day in a short batch weighs the same. Any subsampling of days (``day_fraction`` < 1) is explicit and
reported, never a side effect of batching.

The panel cache: a segment's dense arrays are written once as ``.npy`` files in
``<shard folder>/.cache/panel-<key>/`` (key: the shards' content fingerprint, the
segment, the extra columns and this module's cache version) and memory-mapped by every
later load. Trials packed on one node then share one copy of the panel in the page
cache, and none of them parses the Parquet again. The first loader builds it under a
file lock (packed trials starting together build it once) and renames it into place,
so a cache folder is complete or absent. A read-only shard folder is read without it.

Data-parallel sharding: each global batch is split across ranks (rank r takes
days r, r+W, ...), so every rank runs the same number of steps and the ranks'
days are disjoint. A rank whose share is empty gets a stand-in day with weight 0.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fvae.data.shards import DataError, Meta, read_meta, read_rows


@dataclass(kw_only=True)
class LoaderConfig:
    batch_days: int = 32  # B: trading days per global batch
    non_overlap: bool = True  # days of a batch have disjoint lookback windows
    day_fraction: float = 1.0  # < 1 trains on a random share of days each epoch (reported)
    handler: str | None = None  # if set, the shard folder must hold this feature set

    def __post_init__(self) -> None:
        if self.batch_days < 1:
            raise ValueError(f"data.batch_days: expected >= 1, got {self.batch_days}")
        if not 0.0 < self.day_fraction <= 1.0:
            raise ValueError(f"data.day_fraction: expected 0 < value <= 1, got {self.day_fraction}")


@dataclass
class Batch:
    x: torch.Tensor  # (B, N, T, C)
    y: torch.Tensor  # (B, N)
    mask: torch.Tensor  # (B, N) bool
    ret: torch.Tensor  # (B, N) raw forward return
    day: torch.Tensor  # (B,) index into Panel.dates
    stock: torch.Tensor  # (B, N) index into Panel.instruments
    weight: torch.Tensor  # (B,) 1 for real days, 0 for a rank's stand-in day


@dataclass
class Panel:
    """One segment as dense tensors. ``feat`` is (H + D, N, C) for the daily layout,
    with H = T - 1 days of history before the segment, or (D, N, T*C) for the window layout."""

    name: str
    layout: str
    lookback: int  # T
    channels: int  # C
    dates: pd.DatetimeIndex  # (D,)
    instruments: np.ndarray  # (N,)
    feat: torch.Tensor
    label: torch.Tensor  # (D, N)
    ret: torch.Tensor  # (D, N)
    valid: torch.Tensor  # (D, N) bool
    history: int = 0  # H
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # (D, N) extra columns
    incomplete_days: int = 0  # first days whose window reaches before the shards' first row (not valid)
    source: str = "parquet"  # this load: "parquet" (no cache), "built" (read, then cached) or "cache" (mapped)

    @property
    def num_days(self) -> int:
        return len(self.dates)

    def to(self, device: torch.device | str) -> Panel:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Panel(name=self.name, layout=self.layout, lookback=self.lookback, channels=self.channels,
                     dates=self.dates, instruments=self.instruments, feat=move(self.feat),
                     label=move(self.label), ret=move(self.ret), valid=move(self.valid),
                     history=self.history, extra={k: move(v) for k, v in self.extra.items()},
                     incomplete_days=self.incomplete_days, source=self.source)

    def batch(self, days: np.ndarray | torch.Tensor, weight: np.ndarray | torch.Tensor | None = None) -> Batch:
        dev = self.feat.device
        day = torch.as_tensor(np.asarray(days), dtype=torch.long, device=dev)  # (B,)
        valid = self.valid[day]  # (B, Nall)
        count = valid.sum(1)  # (B,)
        n = max(int(count.max().item()), 1)
        # real stocks first, in panel order; stable so the layout is deterministic
        stock = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, N)
        mask = torch.arange(n, device=dev)[None, :] < count[:, None]  # (B, N)
        w = torch.ones(len(day), device=dev) if weight is None else torch.as_tensor(
            np.asarray(weight), dtype=torch.float32, device=dev)
        return self._gather(day, stock, mask, w)

    def dense_batch(self, days: np.ndarray, weight: np.ndarray | None = None, *, size: int) -> Batch:
        """A batch of fixed shape, for CUDA graphs: ``size`` day slots x every stock, in panel order.

        The ``len(days)`` days come first; the other slots repeat day 0 with weight 0 and no real
        stock. x (size, Nall, T, C), y / mask / ret (size, Nall); padded entries are 0 as in ``batch``.
        """
        if not 1 <= len(days) <= size:
            raise ValueError(f"dense_batch: {len(days)} days for {size} slots")
        dev = self.feat.device
        n, N = len(days), len(self.instruments)
        day = torch.zeros(size, dtype=torch.long, device=dev)
        day[:n] = torch.as_tensor(np.asarray(days), dtype=torch.long, device=dev)
        w = torch.zeros(size, device=dev)
        w[:n] = 1.0 if weight is None else torch.as_tensor(np.asarray(weight), dtype=torch.float32, device=dev)
        mask = self.valid[day] & (torch.arange(size, device=dev) < n)[:, None]  # (size, N)
        stock = torch.arange(N, device=dev).expand(size, N)
        return self._gather(day, stock, mask, w)

    def _gather(self, day: torch.Tensor, stock: torch.Tensor, mask: torch.Tensor, w: torch.Tensor) -> Batch:
        """The batch of ``day`` (B,) x panel columns ``stock`` (B, N); entries outside ``mask`` are 0."""
        B, n = stock.shape
        if self.layout == "daily":
            T = self.lookback
            tidx = day[:, None] + self.history + torch.arange(-T + 1, 1, device=day.device)[None, :]  # (B, T)
            x = self.feat[tidx[:, :, None], stock[:, None, :]]  # (B, T, N, C)
            x = x.permute(0, 2, 1, 3)  # (B, N, T, C)
        else:
            x = self.feat[day[:, None], stock].view(B, n, self.lookback, self.channels)  # (B, N, T, C)
        rows = day[:, None]
        y = torch.where(mask, self.label[rows, stock], 0.0)
        ret = torch.where(mask, self.ret[rows, stock], 0.0)
        x = x * mask[:, :, None, None]
        return Batch(x=x.contiguous(), y=y, mask=mask, ret=ret, day=day, stock=stock, weight=w)


def load_panel(folder: str | Path, segment: str, *, meta: Meta | None = None,
               handler: str | None = None, extra_columns: tuple[str, ...] = (), require_label: bool = True,
               cache: bool = True) -> Panel:
    """One segment of a shard folder as a Panel on the CPU: from the panel cache when it holds
    it (memory-mapped, no Parquet read), else read from the shards and, with ``cache``, cached.

    A stock-day is a sample (``valid``) when its label and return are finite; with
    ``require_label=False`` (prediction, e.g. the last days of a qlib test segment, whose
    labels lie in the future) every stock-day with a row is, and missing labels read as 0."""
    folder = Path(folder)
    meta = meta or read_meta(folder)
    if handler is not None and meta.handler != handler:
        raise DataError(f"{folder}: shards hold handler '{meta.handler}' features, "
                        f"but data.handler asks for '{handler}'")
    read = lambda: read_panel(folder, segment, meta=meta, extra_columns=extra_columns,  # noqa: E731
                              require_label=require_label)
    if not cache:
        return read()
    entry = cache_entry(folder, meta, segment, extra_columns, require_label=require_label)
    if (entry / CACHE_INDEX).is_file():
        return _cache_load(entry)
    root = entry.parent
    try:
        root.mkdir(exist_ok=True)
        lock = open(root / ".lock", "a")  # noqa: SIM115 (held across the build below)
    except OSError:  # a read-only shard folder: read it every time
        return read()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # packed trials starting together: one builds, the others wait
        if not (entry / CACHE_INDEX).is_file():
            _cache_store(read(), entry, fingerprint=meta.fingerprint)
            return dataclasses.replace(_cache_load(entry), source="built")
    return _cache_load(entry)


CACHE_DIR = ".cache"
CACHE_INDEX = "index.json"
CACHE_VERSION = 1  # bump when read_panel's output changes for the same shards
_ARRAYS = ("feat", "label", "ret", "valid")


def cache_entry(folder: Path, meta: Meta, segment: str, extra_columns: tuple[str, ...], *,
                require_label: bool = True) -> Path:
    """The cache folder of one segment's panel: keyed by what determines its content."""
    key = json.dumps([CACHE_VERSION, meta.fingerprint, segment, meta.segments.get(segment), list(extra_columns),
                      require_label])
    return folder / CACHE_DIR / f"panel-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def _cache_store(p: Panel, entry: Path, *, fingerprint: str) -> None:
    """Write ``p``'s arrays as .npy files in a temporary folder, then rename it to ``entry``;
    cache entries of other shard contents (an earlier export into this folder) are removed."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(p, name).numpy())
        for name, t in p.extra.items():
            np.save(tmp / f"extra.{name}.npy", t.numpy())
        np.save(tmp / "dates.npy", p.dates.to_numpy())
        np.save(tmp / "instruments.npy", p.instruments.astype(str))
        index = {"name": p.name, "layout": p.layout, "lookback": p.lookback, "channels": p.channels,
                 "history": p.history, "incomplete_days": p.incomplete_days, "extra": list(p.extra),
                 "fingerprint": fingerprint}
        (tmp / CACHE_INDEX).write_text(json.dumps(index))  # last: a folder with its index is complete
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in entry.parent.glob("panel-*"):
        try:
            stale = json.loads((old / CACHE_INDEX).read_text())["fingerprint"] != fingerprint
        except (OSError, ValueError, KeyError):
            stale = True  # an entry without a readable index is a leftover
        if stale:
            shutil.rmtree(old, ignore_errors=True)


def _cache_load(entry: Path) -> Panel:
    """Memory-map a cache entry (copy-on-write: the tensors are writable, the files never change)."""
    index = json.loads((entry / CACHE_INDEX).read_text())
    arr = {n: torch.from_numpy(np.load(entry / f"{n}.npy", mmap_mode="c")) for n in _ARRAYS}
    extra = {n: torch.from_numpy(np.load(entry / f"extra.{n}.npy", mmap_mode="c")) for n in index["extra"]}
    return Panel(name=index["name"], layout=index["layout"], lookback=index["lookback"],
                 channels=index["channels"], dates=pd.DatetimeIndex(np.load(entry / "dates.npy")),
                 instruments=np.load(entry / "instruments.npy"), **arr,
                 history=index["history"], extra=extra, incomplete_days=index["incomplete_days"], source="cache")


def read_panel(folder: Path, segment: str, *, meta: Meta, extra_columns: tuple[str, ...] = (),
               require_label: bool = True) -> Panel:
    """Read one segment from the Parquet shards into dense arrays (no cache)."""
    start, end = meta.segment_range(segment)
    T, C = meta.lookback, meta.channels
    history = T - 1 if meta.layout == "daily" else 0
    # enough calendar days to hold T-1 trading days before the segment
    read_from = start - pd.Timedelta(days=int(history * 2 + 14)) if history else start
    cols = ["datetime", "instrument", *meta.feature_names, "label", "ret", *extra_columns]
    df = read_rows(folder, meta, read_from, end, columns=cols)
    seg = df["datetime"] >= start
    if not seg.any():
        raise DataError(f"{folder}: segment '{segment}' ({start.date()}..{end.date()}) holds no rows")

    seg_dates = pd.DatetimeIndex(np.unique(df.loc[seg, "datetime"].to_numpy()))
    hist_dates = pd.DatetimeIndex(np.unique(df.loc[~seg, "datetime"].to_numpy()))[-history:] if history else \
        pd.DatetimeIndex([])
    all_dates = hist_dates.append(seg_dates)
    instruments = np.unique(df.loc[seg, "instrument"].to_numpy().astype(str))
    df = df[df["datetime"] >= (all_dates[0] if len(all_dates) else start)]
    df = df[df["instrument"].isin(instruments)]
    di = all_dates.get_indexer(pd.DatetimeIndex(df["datetime"]))
    si = np.searchsorted(instruments, df["instrument"].to_numpy().astype(str))
    Dall, D, N = len(all_dates), len(seg_dates), len(instruments)
    H = Dall - D

    width = C if meta.layout == "daily" else T * C
    feat = np.zeros((Dall if meta.layout == "daily" else D, N, width), dtype=np.float32)
    values = df[meta.feature_names].to_numpy(dtype=np.float32)
    if meta.layout == "daily":
        feat[di, si] = values
    else:
        feat[di - H, si] = values
    if not np.isfinite(feat).all():
        raise DataError(f"{folder}: segment '{segment}' features hold NaN or inf after processing; "
                        "re-export the shards")

    in_seg = di >= H
    d, s = di[in_seg] - H, si[in_seg]

    def dense(col: str) -> np.ndarray:
        out = np.full((D, N), np.nan, dtype=np.float32)
        out[d, s] = df[col].to_numpy(dtype=np.float32)[in_seg]
        return out

    label, ret = dense("label"), dense("ret")
    if require_label:
        valid = np.isfinite(label) & np.isfinite(ret)
    else:
        valid = np.zeros((D, N), dtype=bool)
        valid[d, s] = True
    incomplete = 0
    if meta.layout == "daily" and H < T - 1:
        # fewer than T-1 days of history before the segment (shards written before history was
        # exported, or the data's first days): zero rows in front keep every index >= 0, and the
        # days whose window would reach into them are not samples; nothing is made up
        incomplete = T - 1 - H
        feat = np.concatenate([np.zeros((incomplete, N, width), dtype=np.float32), feat])
        valid[:incomplete] = False
        H = T - 1
        if not valid.any():
            raise DataError(f"{folder}: segment '{segment}' has no day with a complete {T}-day window")
    if not valid.any():
        raise DataError(f"{folder}: segment '{segment}' has no finite labels")
    extra = {c: torch.from_numpy(np.nan_to_num(dense(c))) for c in extra_columns}
    return Panel(name=segment, layout=meta.layout, lookback=T, channels=C, dates=seg_dates,
                 instruments=instruments, feat=torch.from_numpy(feat),
                 label=torch.from_numpy(np.nan_to_num(label)), ret=torch.from_numpy(np.nan_to_num(ret)),
                 valid=torch.from_numpy(valid), history=H, extra=extra, incomplete_days=incomplete)


def epoch_batches(num_days: int, *, batch_days: int, lookback: int, non_overlap: bool = True,
                  shuffle: bool = True, seed: int = 0, epoch: int = 0,
                  day_fraction: float = 1.0) -> list[np.ndarray]:
    """Global batches of day indices for one epoch; every kept day appears exactly once.

    With ``non_overlap``, days within a batch are at least ``lookback`` apart.
    The result is a function of (seed, epoch), identical on every rank.
    """
    rng = np.random.default_rng([seed, epoch])
    days = np.arange(num_days)
    if day_fraction < 1.0:
        keep = max(1, int(round(num_days * day_fraction)))
        days = np.sort(rng.choice(days, size=keep, replace=False))
    if not shuffle:
        return [days[i:i + batch_days] for i in range(0, len(days), batch_days)]
    batches: list[np.ndarray] = []
    if non_overlap and lookback > 1:
        # a fresh grouping each epoch: a stride S in [T, 1.25 T] and a phase; with S = T always, a
        # panel whose groups fit in one batch (D/T <= B) would repeat the same batches every epoch
        stride = int(rng.integers(lookback, -(-5 * lookback // 4) + 1))
        offset = int(rng.integers(stride))
        for r in range(stride):
            group = days[(days + offset) % stride == r]  # consecutive members are S >= T apart
            # days are a subsample when day_fraction < 1; runs stay >= T apart either way
            start = int(rng.integers(batch_days)) if len(group) > batch_days else 0
            cuts = [0, *range(start or batch_days, len(group), batch_days), len(group)]
            batches += [group[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    else:
        perm = rng.permutation(days)
        batches = [np.sort(perm[i:i + batch_days]) for i in range(0, len(perm), batch_days)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def shard_batches(batches: list[np.ndarray], *, rank: int, world_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's (days, weights) for each global batch: equal step counts on every rank.

    Rank r takes days r, r+W, ... of each batch; an empty share becomes the batch's first
    day with weight 0, so the rank still runs the step (DDP needs every rank in each all-reduce).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    out = []
    for b in batches:
        mine = b[rank::world_size]
        if len(mine) == 0:
            out.append((b[:1], np.zeros(1, dtype=np.float32)))
        else:
            out.append((mine, np.ones(len(mine), dtype=np.float32)))
    return out
