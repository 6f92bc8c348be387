"""Vectorised feature and label processing, the same for real and synthetic data.

Matches qlib's processors where both exist, without their per-day Python loops:
- inf -> NaN (qlib's ProcessInf fills with a per-day mean instead, slowly);
- RobustZScoreNorm fitted on the train segment only, clipped to [-3, 3]:
  x' = (x - median) / (1.4826 * (MAD + 1e-12));
- Fillna with 0;
- CSRankNorm of the label: per day, (pct_rank - 0.5) * 3.46 (close to unit std).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EPS = 1e-12  # qlib.constant.EPS
CLIP = 3.0


def robust_zscore_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (median, scale) of a (rows, F) array, ignoring NaN."""
    x = np.where(np.isinf(x), np.nan, x)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are checked elsewhere
            median = np.nanmedian(x, axis=0)
            mad = np.nanmedian(np.abs(x - median), axis=0)
    scale = (mad + EPS) * 1.4826
    return median.astype(np.float64), scale.astype(np.float64)


def robust_zscore_apply(x: np.ndarray, median: np.ndarray, scale: np.ndarray, *, clip: float = CLIP,
                        fill: float | None = 0.0) -> np.ndarray:
    """(x - median) / scale, clipped to [-clip, clip]; inf -> NaN, then NaN -> fill."""
    x = np.where(np.isinf(x), np.nan, x)
    out = (x - median) / scale
    np.clip(out, -clip, clip, out=out)
    if fill is not None:
        out = np.nan_to_num(out, nan=fill)
    return out.astype(np.float32)


def cs_rank_norm(values: pd.Series, dates: pd.Series | np.ndarray) -> np.ndarray:
    """Cross-sectional rank normalisation per day: (pct_rank - 0.5) * 3.46; NaN stays NaN."""
    s = pd.Series(np.asarray(values, dtype=np.float64))
    s = s.where(np.isfinite(s))
    r = s.groupby(np.asarray(dates)).rank(pct=True)
    return ((r - 0.5) * 3.46).to_numpy(dtype=np.float32)


def process_features(df: pd.DataFrame, feature_names: list[str], train_mask: np.ndarray) -> dict:
    """Normalise ``df[feature_names]`` in place with statistics fitted on ``train_mask`` rows.

    Returns the statistics for meta.json.
    """
    x = df[feature_names].to_numpy(dtype=np.float64)
    median, scale = robust_zscore_fit(x[train_mask])
    df[feature_names] = robust_zscore_apply(x, median, scale)
    return {"method": "robust_zscore", "fit_segment": "train", "clip": CLIP, "fillna": 0.0,
            "median": [float(v) for v in median], "scale": [float(v) for v in scale],
            "label": "cs_rank_norm"}
