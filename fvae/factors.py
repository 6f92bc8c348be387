"""Factor analysis of a trained run (section 5 of "Beyond FactorVAE").

    python -m fvae.factors RUN_DIR --out DIR [--segment test] [--sectors CSV | --no-sectors]

Two views of each of the K latent factors, per day t of the segment:

    prior factor return     μ_z,t (K,) from factors_{segment}.parquet: what the model expects
    realised factor return  ẑ_t = argmin_z ‖r_t − a_t − β_t z‖² (OLS with an intercept a_t), the
                            cross-sectional regression of the day's realised returns r_t (n,) on
                            the model's exposures β_t (n, K) from pred_{segment}.parquet

Outputs in --out: ``factor_returns.png`` (cumulative realised factor returns, prior μ_z),
``factor_corr.png`` (correlation of the realised factor returns, and of the prior series),
``factor_dendrogram.png`` (average-linkage clustering with distance 1 − |ρ|, scipy),
``factor_sectors.png`` (correlation of realised factor returns with equal-weighted sector
returns) and ``factors.json``. Sectors come from a symbol → sector CSV (columns Symbol, Sector;
default ../shared/data/sp500/constituents.csv next to the repository); when too few of the
run's instruments are in it (e.g. a synthetic market) that part is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fvae.data.shards import DataError
from fvae.io import atomic_write, atomic_write_json, pyplot
from fvae.progress import bar

DEFAULT_SECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sp500" / "constituents.csv"
MIN_SECTOR_MATCH = 0.5  # share of the run's instruments that must have a sector


def _norm_symbol(s: str) -> str:
    """Ticker spellings differ between sources (BRK.B, BRK-B, brk_b): compare upper-case alphanumerics."""
    return "".join(ch for ch in str(s).upper() if ch.isalnum())


def load_factor_inputs(run_dir: str | Path, *, segment: str = "test") -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(pred rows with beta_k and label, per-day factors frame, K) of a run directory."""
    run_dir = Path(run_dir)
    pred_path, fac_path = run_dir / f"pred_{segment}.parquet", run_dir / f"factors_{segment}.parquet"
    for p in (pred_path, fac_path):
        if not p.is_file():
            raise DataError(f"{p}: not found (is {run_dir} a finished fvae.train run directory?)")
    pred = pd.read_parquet(pred_path)
    betas = sorted((c for c in pred.columns if c.startswith("beta_")), key=lambda c: int(c.split("_")[1]))
    missing = [c for c in ("datetime", "instrument", "label") if c not in pred.columns]
    if missing or not betas:
        raise DataError(f"{pred_path}: missing column(s) {missing or ['beta_0']}")
    K = len(betas)
    fac = pd.read_parquet(fac_path)
    need = [f"mu_z_{k}" for k in range(K)]
    missing = [c for c in ["datetime", *need] if c not in fac.columns]
    if missing:
        raise DataError(f"{fac_path}: missing column(s) {missing} (predictions have {K} betas)")
    pred["datetime"] = pd.to_datetime(pred["datetime"])
    fac["datetime"] = pd.to_datetime(fac["datetime"])
    return pred, fac.set_index("datetime").sort_index(), K


def realised_factor_returns(pred: pd.DataFrame, K: int, *, progress: bool = False) -> tuple[pd.DataFrame, pd.Series]:
    """Per day OLS of the realised return on [1, β] → ẑ_t (D, K) and the cross-sectional R² (D,)."""
    cols = [f"beta_{k}" for k in range(K)]
    out, r2 = {}, {}
    days = pred.dropna(subset=["label", *cols]).groupby("datetime", sort=True)
    for day, g in bar(days, desc="[factors] daily regressions", total=days.ngroups, unit="day", enabled=progress):
        if len(g) < K + 2:
            continue  # fewer stocks than parameters + 1: the regression is not identified
        X = np.column_stack([np.ones(len(g)), g[cols].to_numpy(np.float64)])  # (n, K+1)
        y = g["label"].to_numpy(np.float64)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        resid = y - X @ coef
        tss = float(((y - y.mean()) ** 2).sum())
        out[day] = coef[1:]
        r2[day] = 1 - float(resid @ resid) / tss if tss > 0 else math.nan
    z = pd.DataFrame.from_dict(out, orient="index", columns=[f"f{k}" for k in range(K)]).sort_index()
    z.index.name = "datetime"
    return z, pd.Series(r2).sort_index()


def sector_returns(pred: pd.DataFrame, sectors_csv: Path) -> tuple[pd.DataFrame | None, str]:
    """Equal-weighted daily sector returns (D, S) of the run's stocks, or None and why not."""
    if not sectors_csv.is_file():
        return None, f"sector file {sectors_csv} not found"
    try:
        table = pd.read_csv(sectors_csv)
    except pd.errors.EmptyDataError:
        raise DataError(f"{sectors_csv}: empty file; expected columns Symbol and Sector") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{sectors_csv}: unreadable CSV file ({str(e).splitlines()[0]})") from None
    missing = [c for c in ("Symbol", "Sector") if c not in table.columns]
    if missing:
        raise DataError(f"{sectors_csv}: missing column(s) {missing}; expected Symbol and Sector")
    mapping = dict(zip(table["Symbol"].map(_norm_symbol), table["Sector"].astype(str)))
    inst = pd.Series(pred["instrument"].astype(str).unique())
    matched = inst.map(_norm_symbol).map(mapping)
    share = float(matched.notna().mean()) if len(inst) else 0.0
    if share < MIN_SECTOR_MATCH:
        return None, (f"only {matched.notna().sum()} of the run's {len(inst)} instruments "
                      f"({share:.0%}) appear in {sectors_csv.name} (e.g. {inst.iloc[0]}); "
                      "sector analysis needs real tickers")
    sec = dict(zip(inst, matched))
    df = pred[["datetime", "instrument", "label"]].copy()
    df["sector"] = df["instrument"].astype(str).map(sec)
    df = df.dropna(subset=["sector", "label"])
    wide = df.groupby(["datetime", "sector"])["label"].mean().unstack("sector").sort_index()
    return wide, f"{share:.0%} of {len(inst)} instruments matched to {wide.shape[1]} sectors in {sectors_csv.name}"


def analyze_factors(run_dir: str | Path, *, out: str | Path, segment: str = "test",
                    sectors: str | Path | None = DEFAULT_SECTORS, progress: bool = True) -> dict[str, Any]:
    """Factor return series, correlations, clustering and sector links; writes PNGs + factors.json."""
    out = Path(out)
    pred, fac, K = load_factor_inputs(run_dir, segment=segment)
    # the sector file is read before anything is written: a bad one leaves no folder and no PNGs
    sec, why = sector_returns(pred, Path(sectors)) if sectors is not None else (None, "")
    z, r2 = realised_factor_returns(pred, K, progress=progress)
    prior = fac[[f"mu_z_{k}" for k in range(K)]].copy()
    prior.columns = [f"f{k}" for k in range(K)]
    names = list(z.columns)
    res: dict[str, Any] = {"run_dir": str(run_dir), "segment": segment, "num_factors": K,
                           "days": int(len(z)), "mean_cross_sectional_r2": float(np.nanmean(r2)) if len(r2) else None,
                           "factors": {}}
    for f in names:
        s, p = z[f], prior[f].reindex(z.index)
        sd = float(s.std(ddof=1)) if len(s) > 1 else math.nan
        res["factors"][f] = {
            "realised_mean": float(s.mean()), "realised_std": sd,
            "realised_t_stat": float(s.mean() / sd * math.sqrt(len(s))) if sd and sd > 0 else None,
            "prior_mean": float(p.mean()),
            # does the prior anticipate the realised factor return? daily time-series correlation
            "prior_realised_corr": _corr(p, s)}
    corr = z.corr() if K > 1 else None
    res["realised_corr"] = None if corr is None else _matrix(corr)
    res["prior_corr"] = _matrix(prior.corr()) if K > 1 else None

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
    for f in names:
        ax[0].plot(z.index, z[f].cumsum(), label=f)
        ax[1].plot(prior.index, prior[f], label=f)
    ax[0].set_title("Realised factor returns (cumulative sum of daily ẑ)")
    ax[1].set_title("Prior factor mean μ_z per day")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7, ncol=2)
        a.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    _save(fig, out / "factor_returns.png")
    plt.close(fig)
    plots = ["factor_returns.png"]

    if corr is not None:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4.4))
        for a, m, title in ((ax[0], corr, "realised factor returns"), (ax[1], prior.corr(), "prior μ_z series")):
            _heatmap(a, m.to_numpy(), names, names, title, fig)
        fig.tight_layout()
        _save(fig, out / "factor_corr.png")
        plt.close(fig)
        plots.append("factor_corr.png")

        from scipy.cluster.hierarchy import dendrogram, linkage
        from scipy.spatial.distance import squareform

        dist = 1.0 - corr.abs().to_numpy()
        np.fill_diagonal(dist, 0.0)
        dist = np.nan_to_num((dist + dist.T) / 2, nan=1.0).clip(0.0, 1.0)
        link = linkage(squareform(dist, checks=False), method="average")
        fig, a = plt.subplots(figsize=(max(5, 0.6 * K + 3), 3.6))
        dn = dendrogram(link, labels=names, ax=a, color_threshold=0.7 * float(link[:, 2].max()))
        a.set_title("Factor clustering (average linkage, 1 − |ρ|)", fontsize=10)
        a.set_ylabel("distance")
        fig.tight_layout()
        _save(fig, out / "factor_dendrogram.png")
        plt.close(fig)
        plots.append("factor_dendrogram.png")
        res["cluster_order"] = list(dn["ivl"])
        res["linkage"] = link.tolist()
    else:
        res["cluster_note"] = "one factor: no correlation matrix or clustering"

    res["sectors"] = {"available": False}
    if sectors is None:
        res["sectors"]["reason"] = "sector analysis switched off"
    else:
        res["sectors"]["reason" if sec is None else "matched"] = why
        if sec is not None:
            both = z.join(sec, how="inner")
            sc = pd.DataFrame({s: [_corr(both[f], both[s]) for f in names] for s in sec.columns}, index=names)
            res["sectors"] = {"available": True, "matched": why, "sectors": list(sec.columns),
                              "corr": {f: {s: sc.loc[f, s] for s in sec.columns} for f in names},
                              "best_sector": {f: (str(sc.loc[f].abs().idxmax()) if sc.loc[f].notna().any() else None)
                                              for f in names}}
            fig, a = plt.subplots(figsize=(max(6, 0.7 * sec.shape[1] + 3), max(3, 0.4 * K + 2)))
            _heatmap(a, sc.to_numpy(dtype=float), list(sec.columns), names,
                     "Correlation: realised factor returns × sector returns", fig)
            fig.tight_layout()
            _save(fig, out / "factor_sectors.png")
            plt.close(fig)
            plots.append("factor_sectors.png")
    if progress and not res["sectors"]["available"]:
        print(f"[factors] sector analysis skipped: {res['sectors']['reason']}", flush=True)
    res["plots"] = plots
    atomic_write_json(out / "factors.json", res)
    if progress:
        print(f"[factors] {K} factors over {len(z)} days, mean cross-sectional R² "
              f"{res['mean_cross_sectional_r2']:.3f}; wrote {', '.join(plots)} to {out}", flush=True)
    return res


def _save(fig: Any, path: Path) -> None:
    """A PNG that is whole or absent."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def _heatmap(ax: Any, m: np.ndarray, xlabels: list[str], ylabels: list[str], title: str, fig: Any) -> None:
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    if m.size <= 150:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(m[i, j]) > 0.6 else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)


def _corr(a: pd.Series, b: pd.Series) -> float | None:
    ok = a.notna() & b.notna()
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _matrix(m: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    return {i: {j: (float(m.loc[i, j]) if math.isfinite(m.loc[i, j]) else None) for j in m.columns} for i in m.index}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fvae.factors", description="Factor analysis of a run directory.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/factors)")
    p.add_argument("--segment", default="test", choices=["valid", "test"])
    p.add_argument("--sectors", type=Path, default=DEFAULT_SECTORS, help="CSV with columns Symbol, Sector")
    p.add_argument("--no-sectors", action="store_true", help="skip the sector analysis")
    args = p.parse_args(argv)
    try:
        res = analyze_factors(args.run_dir, out=args.out or args.run_dir / "factors", segment=args.segment,
                              sectors=None if args.no_sectors else args.sectors)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({f: {k: v for k, v in d.items()} for f, d in res["factors"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
