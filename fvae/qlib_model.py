"""FactorVAE as a qlib model: ``fit(dataset)`` and ``predict(dataset, segment)`` on a qlib ``DatasetH``.

In a qlib workflow YAML (``qrun workflow.yaml``; see examples/workflow_config_factorvae_Alpha360.yaml)::

    model:
        class: FactorVAE
        module_path: fvae.qlib_model
        kwargs:
            model: {hidden_size: 64, num_factors: 16, num_portfolios: 64}   # fvae's ModelConfig
            train: {epochs: 30, lr: 1.0e-3, patience: 5}                     # fvae's TrainConfig
            data: {batch_days: 32}                                           # fvae's LoaderConfig

``model``, ``train`` and ``data`` are the sections of fvae's Config (``python -m fvae.train``'s
config file; ``config:`` names such a file, e.g. a search's best_config.yaml, and the sections
override it). Keys and values are checked as fvae checks them: a typo is a one-line error.

How a dataset becomes fvae's day cross-sections: the handler's frames for the segments become a
shard folder (``fvae.data.shards``; Alpha360's 360 columns reordered into 60 x 6 windows, any other
handler's columns used as daily features with ``lookback``-day windows), which fvae's own loader
reads into day panels and ``fvae.train.fit`` trains on, selecting the epoch by validation Rank ICIR.

``processing``:
    qlib  the handler's processors normalise (the features of DK_L for train/valid and DK_I for
          prediction, the label of DK_L as the training target); the raw label (DK_R) scores IC.
          The features must hold no NaN (Fillna in infer_processors).
    fvae  fvae's own processing of the raw data (DK_R), as ``python -m fvae.data export`` does:
          robust z-score fitted on train, clipped to ±3, NaN -> 0, label CSRankNorm(raw label); a
          feature entirely NaN on train is an error. Use it with empty infer/learn processors:
          qlib's own ones (ProcessInf especially) are slow.

``predict`` returns the prior's expected return μ as a Series indexed (datetime, instrument), the
form SignalRecord, SigAnaRecord and PortAnaRecord take. This module and fvae.data.qlib_io are the
only ones that import qlib.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP
from qlib.model.base import Model

from fvae import config as fconfig
from fvae.data import qlib_io
from fvae.data.shards import DataError, Meta, write_shards

PROCESSING = ("qlib", "fvae")


class FactorVAE(Model):
    """fvae's FactorVAE behind qlib's Model interface (see the module docstring)."""

    def __init__(self, *, model: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                 data: dict[str, Any] | None = None, config: str | None = None, lookback: int = 20,
                 processing: Literal["qlib", "fvae"] = "qlib", gpu: bool = False, out_dir: str | None = None) -> None:
        from fvae.train import Config

        super().__init__()
        base = fconfig.read_yaml(config) if config else {}
        for name, section in (("model", model), ("train", train), ("data", data)):
            if section is not None and not isinstance(section, dict):
                raise fconfig.ConfigError(f"FactorVAE.{name}: expected a mapping of {name}.* keys, got {section!r}")
            base[name] = {**(base.get(name) or {}), **(section or {})}
        self.cfg = fconfig.from_dict(Config, base, where="FactorVAE")
        if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 1:
            raise fconfig.ConfigError(f"FactorVAE.lookback: expected an integer >= 1, got {lookback!r}")
        if processing not in PROCESSING:
            raise fconfig.ConfigError(f"FactorVAE.processing: expected one of {list(PROCESSING)}, got {processing!r}")
        if not isinstance(gpu, bool):
            raise fconfig.ConfigError(f"FactorVAE.gpu: expected true or false, got {gpu!r}")
        self.lookback, self.processing, self.gpu = lookback, processing, gpu
        self.out_dir = str(out_dir) if out_dir is not None else None
        # what fit learns (public attributes: qlib's Serializable pickles only those)
        self.net: torch.nn.Module | None = None
        self.meta: Meta | None = None
        self.result: dict[str, Any] | None = None

    # ----------------------------------------------------------------- qlib's interface

    def fit(self, dataset: DatasetH, reweighter: Any = None) -> FactorVAE:
        from fvae.train import Dist, build_model, fit

        if reweighter is not None:
            raise ValueError("FactorVAE.fit: a reweighter is not supported (every day weighs the same)")
        work = Path(self.out_dir) if self.out_dir else Path(tempfile.mkdtemp(prefix="fvae-qlib-"))
        try:
            meta = self._write(dataset, ("train", "valid"), work / "data")
            device = torch.device("cuda", 0) if self.gpu else torch.device("cpu")
            self.result = fit(self.cfg, data=work / "data", out=work / "run", d=Dist(device=device))
            best = torch.load(work / "run" / "best.pt", map_location="cpu", weights_only=False)
            net = build_model(self.cfg, meta.channels)
            net.load_state_dict(best["model"])
            self.net, self.meta = net.eval(), meta
        finally:
            if not self.out_dir:
                shutil.rmtree(work, ignore_errors=True)
        return self

    def predict(self, dataset: DatasetH, segment: str | slice = "test") -> pd.Series:
        from fvae.data.loader import load_panel
        from fvae.train import predict_panel

        if self.net is None or self.meta is None:
            raise ValueError("FactorVAE.predict: the model is not fitted (call fit first)")
        work = Path(tempfile.mkdtemp(prefix="fvae-qlib-pred-"))
        try:
            start, end = _bounds(dataset, segment)
            key = DataHandlerLP.DK_R if self.processing == "fvae" else DataHandlerLP.DK_I
            hist = self._history_start(start)
            feature = dataset.prepare(slice(hist, end), col_set="feature", data_key=key)
            raw = qlib_io.raw_from_handler(feature, None, lookback=self.lookback)
            self._check_features(raw)
            frame, _ = self._frame(raw, None, train_mask=None, norm=self.meta.norm if self.processing == "fvae" else None)
            days = raw.datetime[raw.datetime >= np.datetime64(start)]
            if len(days) == 0:
                raise DataError(f"FactorVAE.predict: segment {segment!r} holds no rows")
            seg = {"test": [str(pd.Timestamp(days.min()).date()), str(pd.Timestamp(days.max()).date())]}
            write_shards(work, frame, self._meta(dataset, raw, seg, self.meta.norm))
            panel = load_panel(work, "test", require_label=False)
            mu = predict_panel(self.net, panel, batch_days=self.cfg.train.eval_batch_days)["mu"].numpy()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        dd, nn = np.nonzero(panel.valid.numpy())
        index = pd.MultiIndex.from_arrays([panel.dates[dd], panel.instruments[nn]], names=["datetime", "instrument"])
        pred = pd.Series(mu[dd, nn].astype(np.float64), index=index, name="score")
        want = feature.index[feature.index.get_level_values(0) >= start]
        # a day whose window reaches before the data's first day has no complete window: NaN, said not invented
        return pred.reindex(want)

    # ----------------------------------------------------------------- dataset -> shards

    def _write(self, dataset: DatasetH, segments: tuple[str, ...], out: Path) -> Meta:
        """The train/valid segments of ``dataset`` as a shard folder at ``out``."""
        if self.processing == "fvae":
            parts = dataset.prepare(list(segments), col_set=["feature", "label"], data_key=DataHandlerLP.DK_R)
            feat = pd.concat([p["feature"] for p in parts])
            ret, label = pd.concat([p["label"].iloc[:, 0] for p in parts]), None
        else:
            parts = dataset.prepare(list(segments), col_set=["feature", "label"], data_key=DataHandlerLP.DK_L)
            feat = pd.concat([p["feature"] for p in parts])
            label = pd.concat([p["label"].iloc[:, 0] for p in parts])
            raw_label = dataset.prepare(list(segments), col_set="label", data_key=DataHandlerLP.DK_R)
            ret = pd.concat([p.iloc[:, 0] for p in raw_label])
        raw = qlib_io.raw_from_handler(feat, ret, lookback=self.lookback)
        self._check_features(raw)
        seg = {}
        for name, part in zip(segments, parts):
            days = part.index.get_level_values(0)
            if len(days) == 0:
                raise DataError(f"FactorVAE.fit: dataset segment '{name}' holds no rows")
            seg[name] = [str(days.min().date()), str(days.max().date())]
        a, b = (np.datetime64(pd.Timestamp(d)) for d in seg["train"])
        frame, norm = self._frame(raw, label, train_mask=(raw.datetime >= a) & (raw.datetime <= b), norm=None)
        return write_shards(out, frame, self._meta(dataset, raw, seg, norm))

    def _frame(self, raw: qlib_io.RawFeatures, label: pd.Series | None, *, train_mask: np.ndarray | None,
               norm: dict[str, Any] | None) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The shard frame: fvae's processing of ``raw`` (processing fvae), or ``raw`` as the handler
        processed it with ``label`` as the target (processing qlib); and meta.norm."""
        if self.processing == "fvae":
            frame, stats = qlib_io.process_raw(raw, train_mask, norm=norm)
        else:
            frame = raw.frame()
            index = pd.MultiIndex.from_arrays([raw.datetime, raw.instrument])
            frame["label"] = (np.full(len(frame), np.nan, np.float32) if label is None else
                              label.reindex(index).to_numpy(dtype=np.float32))
            stats = {"method": "qlib processors (the handler's infer/learn processors)"}
        return frame, stats

    def _check_features(self, raw: qlib_io.RawFeatures) -> None:
        if self.processing == "qlib" and not np.isfinite(raw.x).all():
            bad = [raw.feature_names[j] for j in np.flatnonzero(~np.isfinite(raw.x).all(0))]
            raise DataError(f"FactorVAE: the handler's features hold NaN or inf after its processors "
                            f"({len(bad)} column(s), first {bad[:3]}); add Fillna to infer_processors, or "
                            "set processing: fvae")

    def _meta(self, dataset: DatasetH, raw: qlib_io.RawFeatures, segments: dict[str, list[str]],
              norm: dict[str, Any]) -> Meta:
        handler = dataset.handler
        market = getattr(handler, "instruments", None)
        return Meta(source=f"qlib-dataset:{type(handler).__name__}", handler=type(handler).__name__,
                    market=market if isinstance(market, str) else "custom", layout=raw.layout,  # type: ignore[arg-type]
                    lookback=raw.lookback, channels=raw.channels, feature_names=raw.feature_names,
                    label_expr=_label_expr(handler), segments=segments, norm=norm,
                    extra={"processing": self.processing})

    def _history_start(self, start: pd.Timestamp) -> pd.Timestamp:
        """The first day the segment's windows need: T - 1 trading days before it (daily layout)."""
        if self.meta is None or self.meta.layout != "daily":
            return start
        from qlib.data import D

        cal = D.calendar(end_time=start, freq="day")
        return pd.Timestamp(cal[max(0, len(cal) - self.meta.lookback)]) if len(cal) else start


def _bounds(dataset: DatasetH, segment: str | slice) -> tuple[pd.Timestamp, pd.Timestamp]:
    if isinstance(segment, slice):
        a, b = segment.start, segment.stop
    elif segment in dataset.segments:
        a, b = dataset.segments[segment]
    else:
        raise DataError(f"FactorVAE.predict: segment {segment!r} is not one of {list(dataset.segments)}")
    return pd.Timestamp(a), pd.Timestamp(b)


def _label_expr(handler: Any) -> str:
    """The handler's label expression, which says when a day's label is realised: its loader's label
    fields (what a ``label=`` argument set), else ``get_label_config`` (Alpha158/Alpha360's default);
    "the handler's label" when the handler does not tell."""
    for get in (lambda: handler.data_loader.fields["label"][0], lambda: handler.get_label_config()[0]):
        try:
            fields = get()
        except (AttributeError, TypeError, IndexError, KeyError):
            continue
        if fields:
            return " ; ".join(str(f) for f in fields)
    return "the handler's label"
