"""One self-contained HTML report of a training run or a hyperparameter search.

    python -m fvae.report RUN_OR_EXP_DIR --out report.html [--data DIR] [--baselines FILE ...]
                          [--topk K --n-drop N]

RUN_OR_EXP_DIR is a run directory of ``fvae.train`` (metrics.json, pred_*.parquet, ...) or an
experiment directory of ``fvae.tune`` (summary.json; the report then covers its best trial's run
directory and adds the search). Sections, with stable ids:

    metrics    IC, ICIR, Rank IC, Rank ICIR: FactorVAE valid/test, baselines.json files if present
               (--baselines, else baselines.json and */baselines.json in RUN_DIR and EXP_DIR,
               baselines/ and robustness/ first: the model rows come from the first file without a
               robustness experiment, a table of its own from each other such file, robustness
               tables from every file with one),
               the synthetic market's ceiling, each baseline's selection rule (baselines.json's
               ``selected_by``, when it has one); training curves
    risk       bias statistics of the predicted covariance per segment (metrics.json's ``risk``), and
               of the calibrated one (``risk_calibrated``, scalars from ``risk_calibration``)
    posterior  is the posterior informative: per-epoch validation Rank IC of the forecast vs the
               posterior reconstruction, active factors, common variance share, KL per factor
               (metrics.json's history); factor recovery on a synthetic market (``factor_recovery``)
    equity     cumulative returns of TopK-Drop and mean-variance, benchmark, excess (fvae.backtest;
               run into RUN_DIR/backtest when its outputs are absent)
    drawdown   drawdowns of the same
    factors    factor returns, correlations, clustering, sectors (fvae.factors; run into
               RUN_DIR/factors when absent)
    search     best trials, Optuna parameter importance, the search's metric vs each parameter
               (summary.json's ``metric`` and ``mode``; valid_rank_icir and max for older files)

Plots are embedded as base64 PNG and the page loads nothing from outside. A missing piece
becomes a short "not available because ..." note instead of an error. A small inline script
marks each image with ``data-decoded`` once the page has loaded and warns if one failed.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fvae.data.shards import DataError
from fvae.io import atomic_write_text, pyplot, read_json
from fvae.risk import ACTIVE_KL

SECTIONS = ("metrics", "risk", "posterior", "equity", "drawdown", "factors", "search")
METRIC_COLS = (("ic", "IC"), ("icir", "ICIR"), ("rank_ic", "Rank IC"), ("rank_icir", "Rank ICIR"))
RUN_SELECTED_BY = "epoch by valid Rank ICIR"  # how fvae.train picks the run's best epoch (EarlyStopping)
BIAS_COLS = (("random", "random long-short"), ("factor", "factor-mimicking"), ("alpha", "alpha factor"),
             ("mean_variance", "mean-variance"))
BIAS_OK = (0.8, 1.25)  # a bias statistic outside this band marks a miscalibrated risk model
MAX_EPOCH_ROWS = 25  # a longer history is tabulated on evenly spaced epochs, plus the best and the last


class ReportError(ValueError):
    """The report's input directory is neither a run nor a search directory."""


# --------------------------------------------------------------------------- HTML pieces


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(path_or_bytes: Path | bytes, alt: str) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return (f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            f"<figcaption>{_esc(alt)}</figcaption></figure>")


def _na(why: str) -> str:
    return f'<p class="na">Not available because {_esc(why)}.</p>'


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return _esc(v)


def _sig(v: Any) -> str:
    """Three significant digits (a scale factor may be 0.002 or 300)."""
    return f"{v:.3g}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _scalars(v: Any) -> str:
    """A calibration's c_z: one scalar, or one per factor (shown as their range)."""
    if isinstance(v, list) and v:
        lo, hi = min(v), max(v)
        return f"{_sig(lo)} … {_sig(hi)} ({len(v)} factors)"
    return _sig(v)


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.2f}%"


def _td(c: str | tuple[str, str]) -> str:
    """A cell: its HTML, or (HTML, CSS class)."""
    return f'<td class="{c[1]}">{c[0]}</td>' if isinstance(c, tuple) else f"<td>{c}</td>"


def _table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _fig_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


_plt = pyplot


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.85em;color:#666}
.na{color:#8a5a00;background:#fff6e0;padding:.4em .7em;border-left:3px solid #e0a000}.meta{color:#666;
font-size:.9em}code{background:#f4f4f4;padding:0 .2em}#img-warning{color:#b00}
td.off{background:#fde2e2;color:#900;font-weight:bold}.verdict{font-weight:bold}.verdict.bad{color:#b00}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, bad = 0;
  for (var i = 0; i < imgs.length; i++) {
    var ok = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute('data-decoded', ok ? '1' : '0');
    imgs[i].setAttribute('data-natural-width', String(imgs[i].naturalWidth));
    if (!ok) bad++;
  }
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-images-failed', String(bad));
  if (bad) document.getElementById('img-warning').textContent = bad + ' image(s) failed to decode.';
});
"""


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """What the report is about: a run directory, and the search around it if any."""

    source: Path
    run_dir: Path | None
    summary: dict[str, Any] | None  # fvae.tune's summary.json
    metrics: dict[str, Any] | None  # the run's metrics.json
    data: Path | None
    notes: dict[str, str]


def resolve_inputs(path: str | Path, *, data: str | Path | None = None) -> Inputs:
    """Decide whether ``path`` is a run directory or a search directory and read its JSON."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    notes: dict[str, str] = {}
    summary, run_dir = None, None
    if (path / "summary.json").is_file():
        summary = _read_json(path / "summary.json")
        best = summary.get("best") or {}
        tid = best.get("trial_id")
        if tid is None:
            notes["run"] = "the search has no finished trial"
        else:
            from fvae.backtest import trial_dirs

            run_dir = next((c for c in trial_dirs(path, summary, tid) if (c / "metrics.json").is_file()), None)
            if run_dir is None:
                notes["run"] = f"the best trial {tid}'s run directory (with metrics.json) was not found"
    elif (path / "metrics.json").is_file():
        run_dir = path
    else:
        raise ReportError(f"{path}: neither a run directory (metrics.json) nor a search directory (summary.json)")
    metrics = _read_json(run_dir / "metrics.json") if run_dir is not None else None
    data_dir = Path(data) if data is not None else None
    if data_dir is None:
        guess = (metrics or {}).get("data") or (summary or {}).get("data")
        if guess and (Path(guess) / "meta.json").is_file():
            data_dir = Path(guess)
    return Inputs(source=path, run_dir=run_dir, summary=summary, metrics=metrics, data=data_dir, notes=notes)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, error=ReportError)


def find_baselines(inp: Inputs, explicit: list[Path] | None) -> list[Path]:
    if explicit:
        missing = [p for p in explicit if not Path(p).is_file()]
        if missing:  # asked for by name: never skipped in silence
            raise ReportError(f"--baselines {missing[0]}: file not found (expected a baselines.json of "
                              "python -m fvae.baselines)")
        return [Path(p) for p in explicit]
    dirs = [d for d in (inp.run_dir, inp.source) if d is not None]
    # the usual names first (the first file without a robustness experiment gives the main rows), then any
    # other experiment one level down, such as a paper-sized rerun in EXP_DIR/paper_size
    cands = [d / sub for sub in ("baselines.json", "baselines/baselines.json", "robustness/baselines.json")
             for d in dirs]
    cands += [c for d in dirs if d.is_dir() for c in sorted(d.glob("*/baselines.json"))]
    found: dict[Path, Path] = {}  # resolved -> as found: a run directory inside EXP_DIR is seen twice
    for c in cands:
        if c.is_file():
            found.setdefault(c.resolve(), c)
    return list(found.values())


def _cell(agg: dict[str, Any], key: str) -> str:
    c = agg.get(key) or {}
    s = _fmt(c.get("mean"))
    return s + (f" ± {_fmt(c['std'])}" if c.get("std") is not None else "")


# --------------------------------------------------------------------------- sections


def section_metrics(inp: Inputs, baselines: list[Path]) -> str:
    if inp.metrics is None:
        return _na(inp.notes.get("run", "no run directory was found"))
    rows = []
    for seg in ("valid", "test"):
        m = inp.metrics.get(seg)
        if m:
            rows.append([f"FactorVAE ({seg})", *[_fmt(m.get(k)) for k, _ in METRIC_COLS], _fmt(m.get("days")),
                         _esc(RUN_SELECTED_BY)])
    parts = []
    loaded: list[tuple[Path, dict[str, Any]]] = []
    for path in baselines:
        try:
            loaded.append((path, _read_json(path)))
        except ReportError as e:
            parts.append(_na(str(e)))
    # model rows from one file only: a robustness run's own rows come from models trained without M stocks
    main = next((bl for _, bl in loaded if not bl.get("robustness")), loaded[0][1] if loaded else None)
    for path, bl in loaded:
        try:
            n = len(bl.get("seeds", []))
            sel = _selected_by(bl)
            own = [[f"{_esc(name)} ({seg}, {n} seed{'s' if n != 1 else ''})",
                    *[_cell(agg[seg], k) for k, _ in METRIC_COLS], "", _esc(sel.get(name, "–"))]
                   for name, agg in bl.get("models", {}).items() for seg in ("valid", "test") if seg in agg]
            rob = bl.get("robustness")
            if bl is main:
                rows += own
            elif not rob and own:  # another full-universe experiment: its own table, named by its folder
                parts.append(f"<h3>Baselines in <code>{_esc(path.parent.name)}</code></h3>"
                             + _metrics_table(own, selected=bool(sel)))
            if rob:
                rrows = [[_esc(n), _cell(a, "rank_ic"), _cell(a, "rank_icir")] for n, a in rob["models"].items()]
                parts.append(f"<h3>Robustness: {rob['m']} stocks removed from training (test Rank IC on them, "
                             f"{len(bl.get('seeds', []))} seeds)</h3>"
                             + _table(["model", "Rank IC", "Rank ICIR"], rrows))
        except (KeyError, TypeError, AttributeError) as e:
            parts.append(_na(f"{path} could not be read ({e})"))
    if not baselines:
        parts.append(_na("no baselines.json was found (run python -m fvae.baselines --out RUN_DIR)"))
    ceiling = inp.metrics.get("ceiling_rank_ic")
    if ceiling:
        for seg in ("valid", "test"):
            if seg in ceiling:
                rows.append([f"ceiling: true μ ({seg})", "–", "–", _fmt(float(ceiling[seg])), "–", "–", "–"])
    out = _metrics_table(rows, selected=main is not None and bool(_selected_by(main)), cls="metrics")
    out += "".join(parts)
    be = inp.metrics.get("best_epoch")
    extra = [f"best epoch {be + 1 if isinstance(be, int) else '–'} of {inp.metrics.get('epochs_run', '–')} run "
             "(selected on validation Rank ICIR)"]
    out += f'<p class="meta">{_esc(", ".join(extra))}; run directory <code>{_esc(inp.run_dir)}</code></p>'
    curves = inp.run_dir / "curves.png" if inp.run_dir else None
    out += _img(curves, "Training curves") if curves and curves.is_file() else _na("curves.png is missing")
    return out


def _selected_by(bl: dict[str, Any]) -> dict[str, str]:
    """baselines.json's {model: rule its final fit was chosen by}; {} for files from before it."""
    sel = bl.get("selected_by")
    return {str(k): str(v) for k, v in sel.items()} if isinstance(sel, dict) else {}


def _metrics_table(rows: list[list[str]], *, selected: bool, cls: str = "") -> str:
    """Rows of model, METRIC_COLS, days, selection rule; the rule's column only when ``selected``."""
    head = ["model (segment)", *[h for _, h in METRIC_COLS], "days"] + (["selected by"] if selected else [])
    return _table(head, [r[:len(head)] for r in rows], cls)


def _bias_cell(v: Any) -> str | tuple[str, str]:
    """A bias statistic, marked (class ``off``) when outside BIAS_OK."""
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "–"
    lo, hi = BIAS_OK
    if lo <= v <= hi:
        return _fmt(float(v), 3)
    side = "risk under-predicted" if v > hi else "risk over-predicted"
    return f'<span title="{side}">{_fmt(float(v), 3)} {"▲" if v > hi else "▼"}</span>', "off"


def section_risk(inp: Inputs) -> str:
    """metrics.json's ``risk``: bias statistics of the predicted covariance per segment."""
    if inp.metrics is None:
        return _na(inp.notes.get("run", "no run directory was found"))
    risk = inp.metrics.get("risk")
    if not isinstance(risk, dict) or not any(isinstance(risk.get(s), dict) for s in ("valid", "test")):
        return _na("metrics.json has no bias statistics (\"risk\"): the run predates them")
    rows = _bias_rows(risk, "")
    lo, hi = BIAS_OK
    out = ('<p>Bias statistic: the standard deviation over days of a portfolio\'s realised return divided by '
           'its predicted volatility under the model\'s covariance β diag(σ_z²) βᵀ + diag(σ_α²). '
           '1 means the predicted risk is calibrated, &gt; 1 that risk is under-predicted, &lt; 1 that it is '
           f'over-predicted; values outside [{lo}, {hi}] are marked.</p>'
           '<p class="meta">Portfolios, per day: random long-short weights (the mean of 16), factor-mimicking '
           '(unit exposure to one factor, none to the others; the mean over factors), and the mean-variance '
           'portfolio Σ⁻¹μ of the model\'s own forecast.</p>')
    out += _table(["segment", *[h for _, h in BIAS_COLS], "days"], rows, "risk")
    off = sum(isinstance(c, tuple) for r in rows for c in r)
    if off:
        out += f'<p class="verdict bad">{off} bias statistic{"s" if off != 1 else ""} outside [{lo}, {hi}]: ' \
               'the predicted covariance is miscalibrated there.</p>'
    return out + _calibrated_risk(inp.metrics)


def _bias_rows(risk: dict[str, Any], tag: str) -> list[list[Any]]:
    return [[seg + tag, *[_bias_cell(r.get(k)) for k, _ in BIAS_COLS], _fmt(r.get("days"))]
            for seg in ("valid", "test") if isinstance(r := risk.get(seg), dict)]


def _calibrated_risk(metrics: dict[str, Any]) -> str:
    """metrics.json's ``risk_calibration`` and ``risk_calibrated``: the scalars and the bias statistics of Σ_c."""
    cal, risk = metrics.get("risk_calibration"), metrics.get("risk_calibrated")
    if not isinstance(cal, dict) or not isinstance(risk, dict):
        return _na("metrics.json has no risk calibration (\"risk_calibration\"): the run predates it")
    fit = _esc(str(cal.get("fit_segment", "valid")))
    P = int(cal.get("residual_factors") or 0)
    resid = (f' + L diag(λ) Lᵀ, with {P} residual factors (the principal components of the learnt model\'s '
             f'residuals over the {_fmt(cal.get("residual_window"))} days before each day whose labels were realised)'
             if P else "")
    has_u = "c_mu" in cal
    cmu = f', c_μ = <b>{_sig(cal.get("c_mu"))}</b> (alpha factor)' if has_u else ""
    alpha = (" + c_μ s̄ · u uᵀ, with u the alpha factor (the forecast μ orthogonal to the other factors, unit "
             "norm; s̄ the day's mean calibrated σ_α²)" if has_u else "")
    out = (f'<h3>Calibrated risk model</h3><p>Σ_c = β diag(c_z σ_z²) βᵀ{resid}{alpha} + c_α · diag(σ_α²), the '
           f'scalars fit on the {fit} segment so that its random, factor-mimicking{" and alpha" if has_u else ""} '
           f'bias statistics are 1: '
           f'c_z = <b>{_scalars(cal.get("c_z"))}</b> (factor variances), c_α = <b>{_sig(cal.get("c_alpha"))}</b> '
           f'(specific variance){cmu}, '
           f'over {_fmt(cal.get("days"))} days'
           f'{" (held at a bound of the allowed range)" if cal.get("clipped") else ""}. The other segments are '
           'the out-of-sample check; the mean-variance backtest uses Σ_c.</p>')
    rows = _bias_rows(risk, " (calibrated)")
    out += _table(["segment", *[h for _, h in BIAS_COLS], "days"], rows, "risk-calibrated")
    off = sum(isinstance(c, tuple) for r in rows for c in r)
    if off:
        lo, hi = BIAS_OK
        out += f'<p class="verdict bad">{off} calibrated bias statistic{"s" if off != 1 else ""} outside ' \
               f'[{lo}, {hi}].</p>'
    return out


def _best_row(history: list[dict[str, Any]], best_epoch: Any) -> dict[str, Any]:
    """The history row of the best epoch (the last row when it is not found)."""
    return next((h for h in history if h.get("epoch") == best_epoch), history[-1])


def _epoch_rows(history: list[dict[str, Any]], best_epoch: Any) -> list[dict[str, Any]]:
    """Every row, or for a long history MAX_EPOCH_ROWS evenly spaced ones plus the best and the last."""
    n = len(history)
    if n <= MAX_EPOCH_ROWS:
        return history
    keep = {int(i) for i in np.linspace(0, n - 1, MAX_EPOCH_ROWS - 2).round()} | {n - 1}
    keep |= {i for i, h in enumerate(history) if h.get("epoch") == best_epoch}
    return [history[i] for i in sorted(keep)]


def _kl_plot(history: list[dict[str, Any]], best_epoch: Any) -> bytes | None:
    """Validation Rank IC of forecast vs posterior, and KL per factor (log scale), per epoch."""
    rows = [h for h in history if isinstance(h.get("valid_kl_per_factor"), list) and h["valid_kl_per_factor"]]
    if not rows:
        return None
    K = max(len(h["valid_kl_per_factor"]) for h in rows)
    kl = np.full((len(rows), K), np.nan)
    for i, h in enumerate(rows):
        kl[i, :len(h["valid_kl_per_factor"])] = [v if isinstance(v, (int, float)) else np.nan
                                                 for v in h["valid_kl_per_factor"]]
    ep = [h.get("epoch", i) + 1 for i, h in enumerate(rows)]
    def num(h: dict[str, Any], k: str) -> float:
        return h[k] if isinstance(h.get(k), (int, float)) else np.nan

    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    ax[0].plot(ep, [num(h, "valid_rank_ic") for h in rows], marker=".", label="forecast (prior μ)")
    ax[0].plot(ep, [num(h, "valid_rank_ic_post") for h in rows], marker=".", ls="--",
               label="posterior reconstruction")
    ax[0].set_title("validation Rank IC")
    ax[0].legend(fontsize=8)
    floor = 1e-6  # log scale: a KL of 0 is drawn at the floor
    for k in range(K):
        ax[1].plot(ep, np.maximum(kl[:, k], floor), marker=".", label=f"z{k}")
    ax[1].axhline(ACTIVE_KL, color="grey", ls=":", lw=1, label=f"active > {ACTIVE_KL}")
    ax[1].set_yscale("log")
    ax[1].set_title("validation KL per factor (nats/day)")
    if K <= 8:
        ax[1].legend(fontsize=7, ncol=2)
    from matplotlib.ticker import MaxNLocator

    for a in ax:
        if isinstance(best_epoch, int):
            a.axvline(best_epoch + 1, color="C3", lw=1, alpha=0.5)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.tight_layout()
    return _fig_png(fig)


def _factor_recovery(fr: Any) -> str:
    """metrics.json's ``factor_recovery``: canonical correlations with the planted factors, β R²."""
    if not isinstance(fr, dict) or not fr:
        return _na("metrics.json has no factor recovery: it needs a synthetic market with planted factors "
                   "(and a run that recorded it)")
    out = ""
    cols = (("canonical_corr_posterior", "posterior μ_post"), ("canonical_corr_prior", "prior μ_z"),
            ("canonical_corr_oracle", "oracle (true β)"))
    for seg, r in fr.items():
        if not isinstance(r, dict):
            continue
        lists = [r.get(k) if isinstance(r.get(k), list) else [] for k, _ in cols]
        n = max(map(len, lists), default=0)
        rows = [[f"pair {i + 1}", *[_fmt(v[i], 3) if i < len(v) else "–" for v in lists]] for i in range(n)]
        out += (f'<p class="meta">{_esc(seg)} segment, {_fmt(r.get("days"))} days: canonical correlations of each '
                'factor series with the true factor returns z_t (largest first), the oracle regressing the label '
                'on the true β; R² of the true β regressed on the learnt β: '
                f'<b>{_fmt(r.get("beta_r2"), 3)}</b>.</p>')
        out += _table(["canonical pair", *[h for _, h in cols]], rows, "recovery")
    return out


def section_posterior(inp: Inputs) -> str:
    """Is the posterior informative? Per-epoch diagnostics from the history, and factor recovery."""
    if inp.metrics is None:
        return _na(inp.notes.get("run", "no run directory was found"))
    history = [h for h in inp.metrics.get("history") or [] if isinstance(h, dict)]
    diag = [h for h in history if "valid_rank_ic_post" in h or "valid_kl_per_factor" in h]
    be = inp.metrics.get("best_epoch")
    out = ""
    if not diag:
        out += _na("the run's history has no posterior diagnostics (valid_rank_ic_post, valid_kl_per_factor): "
                   "the run predates them")
    else:
        best = _best_row(diag, be)
        kl = best.get("valid_kl_per_factor")
        K = len(kl) if isinstance(kl, list) else None
        active = best.get("valid_active_factors")
        if isinstance(active, int) and active == 0:
            out += (f'<p class="verdict bad">Posterior collapsed: 0 of {K if K is not None else "–"} factors '
                    f'active at the best epoch (mean KL ≤ {ACTIVE_KL} nats/day for every factor).</p>')
        elif isinstance(active, int):
            out += (f'<p class="verdict">{active} of {K if K is not None else "–"} factors active at the best '
                    f'epoch (mean KL &gt; {ACTIVE_KL} nats/day).</p>')
        out += (f'<p class="meta">Best epoch {best.get("epoch", 0) + 1}: validation Rank IC of the forecast '
                f'{_fmt(best.get("valid_rank_ic"))}, of the posterior reconstruction (which sees the day\'s '
                f'returns) {_fmt(best.get("valid_rank_ic_post"))}; an informative posterior scores far above '
                'the forecast. Common share: the part of the predicted variance the factors carry, '
                'β²σ_z² / (β²σ_z² + σ_α²).</p>')
        shown = _epoch_rows(diag, be)
        rows = [[f'{h.get("epoch", 0) + 1}{" (best)" if h.get("epoch") == be else ""}',
                 _fmt(h.get("valid_rank_ic")), _fmt(h.get("valid_rank_ic_post")),
                 _fmt(h.get("valid_active_factors")), _pct(h.get("valid_common_share")),
                 _fmt(float(sum(v for v in h["valid_kl_per_factor"] if isinstance(v, (int, float)))), 3)
                 if isinstance(h.get("valid_kl_per_factor"), list) else "–"]
                for h in shown]
        if len(shown) < len(diag):
            out += f'<p class="meta">{len(shown)} of {len(diag)} epochs shown.</p>'
        out += _table(["epoch", "Rank IC (forecast)", "Rank IC (posterior)", "active factors", "common share",
                       "total KL (nats/day)"], rows, "posterior")
        png = _kl_plot(diag, be)
        if png is not None:
            out += _img(png, "Validation Rank IC of the forecast vs the posterior reconstruction, and KL per "
                             f"factor per epoch (log scale; dotted: the active threshold {ACTIVE_KL})")
    out += "<h3>Factor recovery</h3>" + _factor_recovery(inp.metrics.get("factor_recovery"))
    return out


def ensure_backtest(inp: Inputs, *, topk: int | None, n_drop: int | None, progress: bool) -> tuple[Path | None, str]:
    """RUN_DIR/backtest with backtest.json, running fvae.backtest if absent; (folder, note)."""
    from fvae import backtest as bt

    if inp.run_dir is None:
        return None, inp.notes.get("run", "no run directory was found")
    folder = inp.run_dir / "backtest"
    if topk is None and n_drop is None:
        # python -m fvae.backtest --pred EXP_DIR --out EXP_DIR/backtest: the best trial's, made beside the search
        beside = inp.source / "backtest"
        if inp.summary is not None and (beside / "backtest.json").is_file():
            made_from = (_read_json(beside / "backtest.json").get("source") or {}).get("predictions")
            if made_from and Path(made_from).resolve() == (inp.run_dir / "pred_test.parquet").resolve():
                return beside, ""
        if (folder / "backtest.json").is_file():
            return folder, ""
    pred = inp.run_dir / "pred_test.parquet"
    if not pred.is_file():
        return None, f"{pred} is missing"
    note = ""
    cfg = bt.BacktestConfig()
    try:
        if topk is None:
            # a small universe (a tiny synthetic market) cannot hold the paper's 50 names meaningfully
            sizes = pd.read_parquet(pred, columns=["datetime"]).groupby("datetime").size()
            med = int(sizes.median())
            if med < 4 * cfg.topk:
                k = max(1, med // 5)
                note = (f"TopK-Drop uses k = {k}, n = {max(1, k // 10)} because the median universe has {med} "
                        f"stocks (the paper's k = {cfg.topk} needs several hundred)")
                topk, n_drop = k, max(1, k // 10)
        cfg = dataclasses.replace(cfg, topk=topk or cfg.topk, n_drop=n_drop if n_drop is not None else cfg.n_drop)
        if progress:
            print(f"[report] running the backtest into {folder}", flush=True)
        bt.run_backtest(pred, out=folder, data=inp.data, cfg=cfg, progress=progress)
    except (DataError, ValueError) as e:
        try:  # mean-variance needs the risk model; TopK-Drop alone may still run
            cfg = dataclasses.replace(cfg, strategies=("topk",))
            bt.run_backtest(pred, out=folder, data=inp.data, cfg=cfg, progress=progress)
            note = (note + "; " if note else "") + f"mean-variance skipped: {e}"
        except (DataError, ValueError) as e2:
            return None, f"the backtest failed: {e2}"
    return folder, note


def section_equity(folder: Path | None, note: str) -> str:
    if folder is None:
        return _na(note)
    res = _read_json(folder / "backtest.json")
    rows = []
    for name, s in res["strategies"].items():
        for side in ("gross", "net"):
            m = s[side]
            rows.append([f"{_esc(s['label'])} ({side})", _pct(m["annual_return"]), _pct(m["annual_volatility"]),
                         _fmt(m["sharpe"], 2), _fmt(m.get("information_ratio"), 2), _pct(m["max_drawdown"]),
                         _fmt(s["mean_turnover"], 3)])
    b = res["benchmark"]
    rows.append([f"benchmark ({_esc(b['name'])})", _pct(b["annual_return"]), _pct(b["annual_volatility"]),
                 _fmt(b["sharpe"], 2), "–", _pct(b["max_drawdown"]), "–"])
    c = res["config"]
    out = (f'<p class="meta">Test segment {res["start"]} … {res["end"]}; TopK-Drop k = {c["topk"]}, n = '
           f'{c["n_drop"]}; mean-variance λ = {c["risk_aversion"]}, cap {c["max_weight"]}, turnover ≤ '
           f'{c["max_turnover"]}; costs {c["buy_cost_bps"]} bps buy / {c["sell_cost_bps"]} bps sell.</p>')
    rm = res.get("risk_model")
    if isinstance(rm, dict):
        out += (f'<p class="meta">Mean-variance risk model: the calibrated Σ (c_z {_scalars(rm.get("c_z"))}, '
                f'c_α {_sig(rm.get("c_alpha"))}, {_fmt(rm.get("residual_factors", 0))} residual factors'
                f'{", an alpha factor" if "c_mu" in rm else ""}).</p>'
                if rm.get("sigma") == "calibrated" else
                f'<p class="meta">Mean-variance risk model: the raw Σ{_esc("; " + rm["note"]) if rm.get("note") else ""}.</p>')
    if note:
        out += f'<p class="meta">{_esc(note)}.</p>'
    out += _table(["strategy", "annual return", "volatility", "Sharpe", "IR vs benchmark", "max drawdown",
                   "turnover/day"], rows)
    out += _qlib_check(folder / "qlib_check.json")
    png = folder / "cumulative.png"
    out += _img(png, "Cumulative return: strategies (net and gross), benchmark, excess") if png.is_file() \
        else _na("cumulative.png is missing")
    return out


def _qlib_check(path: Path) -> str:
    """fvae's TopK-Drop beside qlib's own (``python -m fvae.backtest --qlib-check``), when it was run."""
    if not path.is_file():
        return ""
    q = _read_json(path)
    rows = []
    for who, label in (("ours", "fvae"), ("qlib", "qlib TopkDropoutStrategy")):
        for side in ("gross", "net"):
            m = q[who][side]
            rows.append([f"{label} ({side})", _pct(m["annual_return"]), _fmt(m["sharpe"], 2),
                         _fmt(m.get("information_ratio"), 2), _pct(m["max_drawdown"]), _fmt(q[who]["mean_turnover"], 3)])
    corr = q.get("daily_correlation", {})
    return (f'<h3>Cross-check: the same TopK-Drop in qlib\'s own backtest</h3><p class="meta">{q["days"]} common '
            f'days; correlation of daily returns {_fmt(corr.get("gross"), 3)} gross, {_fmt(corr.get("net"), 3)} '
            f'net; {_esc(q.get("note", ""))}.</p>'
            + _table(["backtest", "annual return", "Sharpe", "IR vs benchmark", "max drawdown", "turnover/day"],
                     rows))


def section_drawdown(folder: Path | None, note: str) -> str:
    if folder is None:
        return _na(note)
    png = folder / "drawdown.png"
    return _img(png, "Drawdown from the running peak (net of costs)") if png.is_file() else _na(
        "drawdown.png is missing")


def section_factors(inp: Inputs, *, progress: bool) -> str:
    from fvae import factors as ff

    if inp.run_dir is None:
        return _na(inp.notes.get("run", "no run directory was found"))
    folder = inp.run_dir / "factors"
    try:
        if not (folder / "factors.json").is_file():
            ff.analyze_factors(inp.run_dir, out=folder, progress=progress)
        res = _read_json(folder / "factors.json")
    except DataError as e:
        return _na(f"the factor analysis failed: {e}")
    rows = [[f, _fmt(d.get("realised_mean")), _fmt(d.get("realised_std")), _fmt(d.get("realised_t_stat"), 2),
             _fmt(d.get("prior_mean")), _fmt(d.get("prior_realised_corr"), 3),
             _esc((res.get("sectors", {}).get("best_sector") or {}).get(f, "–"))]
            for f, d in res["factors"].items()]
    out = (f'<p class="meta">{res["num_factors"]} factors over {res["days"]} test days; realised factor returns '
           f'from the daily cross-sectional regression of returns on the model\'s β (mean R² '
           f'{_fmt(res.get("mean_cross_sectional_r2"), 3)}).</p>')
    out += _table(["factor", "realised mean", "realised std", "t-stat", "prior mean μ_z", "corr(prior, realised)",
                   "closest sector"], rows)
    captions = {"factor_returns.png": "Factor return series", "factor_corr.png": "Factor correlations",
                "factor_dendrogram.png": "Hierarchical clustering of the factors",
                "factor_sectors.png": "Factor returns vs sector returns"}
    for name, cap in captions.items():
        if (folder / name).is_file():
            out += _img(folder / name, cap)
    sec = res.get("sectors", {})
    if not sec.get("available"):
        out += _na(f"the sector analysis was skipped: {sec.get('reason', 'unknown')}")
    if res.get("cluster_note"):
        out += _na(res["cluster_note"])
    return out


def search_metric(summary: dict[str, Any]) -> tuple[str, str]:
    """(metric, mode) the search ranked its trials by; summaries from before ``mode`` existed used
    the highest valid_rank_icir."""
    return summary.get("metric") or "valid_rank_icir", summary.get("mode") or "max"


def _trials_frame(summary: dict[str, Any]) -> tuple[pd.DataFrame, list[str]]:
    """Finished trials (a finite value of the search's metric) as a frame: params as columns + ``value``."""
    rows, keys = [], []
    for t in summary.get("trials", []):
        v = t["value"] if "value" in t else t.get("valid_rank_icir")  # older summaries: no "value"
        if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) or t.get("status") == "ERROR":
            continue
        params = t.get("params") or {}
        for k in params:
            if k not in keys:
                keys.append(k)
        rows.append({"trial_id": t.get("trial_id"), "value": float(v), "epochs": t.get("epochs"), **params})
    return pd.DataFrame(rows), keys


def _rebuilt_study(df: pd.DataFrame, usable: list[str], mode: str) -> Any:
    """An in-memory study of summary.json's finished trials, distributions inferred from the values."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists: dict[str, Any] = {}
    for k in usable:
        vals = df[k].tolist()
        if all(isinstance(v, bool) for v in vals) or any(isinstance(v, str) for v in vals):
            dists[k] = CategoricalDistribution(sorted({v for v in vals}, key=str))
        elif all(isinstance(v, (int, np.integer)) for v in vals):
            dists[k] = IntDistribution(int(min(vals)), int(max(vals)))
        else:
            lo, hi = float(min(vals)), float(max(vals))
            dists[k] = FloatDistribution(lo, hi, log=bool(lo > 0 and hi / lo >= 100))
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for _, r in df.iterrows():
        params = {k: (float(r[k]) if isinstance(dists[k], FloatDistribution) else
                      int(r[k]) if isinstance(dists[k], IntDistribution) else r[k]) for k in usable}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r["value"])))
    return study


def param_importance(summary: dict[str, Any], *, exp_dir: str | Path | None = None) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances of the search's parameters for its metric. Returns (importances, method).

    The study is the search's own, read from EXP_DIR/optuna.db (``fvae.study``): its real
    distributions and its trials' values (the best epoch's). A search without optuna.db (made
    before fvae kept its study) gets a study rebuilt in memory from summary.json's trials, the
    distributions inferred from the values (bool and str → categorical; int → IntDistribution over
    [min, max]; float → FloatDistribution over [min, max], log-scaled when positive and spanning
    ≥ 2 decades), and the method says so. Only parameters every finished trial has and that vary
    are used. Fallback when optuna's evaluator cannot run (e.g. scikit-learn missing): the absolute
    Spearman correlation of each parameter (categories as their mean-value rank) with the search's
    metric, normalised to sum to 1.
    """
    metric, mode = search_metric(summary)
    df, keys = _trials_frame(summary)
    if len(df) < 2:
        raise ValueError(f"{len(df)} finished trial(s); importance needs at least 2")
    usable = [k for k in keys if k in df and df[k].notna().all() and df[k].astype(str).nunique() > 1]
    if not usable:
        raise ValueError("no parameter varies across the finished trials")
    try:
        import optuna

        from fvae.study import open_study

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = open_study(exp_dir, summary) if exp_dir is not None else None
        if study is not None:
            imp = optuna.importance.get_param_importances(study, params=usable)
            return ({k: float(v) for k, v in imp.items()},
                    "optuna fANOVA (optuna.importance.get_param_importances) on the search's study, EXP_DIR/optuna.db")
        imp = optuna.importance.get_param_importances(_rebuilt_study(df, usable, mode), params=usable)
        return ({k: float(v) for k, v in imp.items()},
                ("optuna fANOVA (optuna.importance.get_param_importances) on a study rebuilt from summary.json, "
                 "distributions guessed from the values: this search kept no EXP_DIR/optuna.db"))
    except (ImportError, RuntimeError, ValueError) as e:
        from scipy.stats import spearmanr

        scores = {}
        for k in usable:
            col = df[k]
            if col.map(lambda v: isinstance(v, (str, bool))).any():
                col = col.astype(str).map(df.groupby(df[k].astype(str))["value"].mean())
            rho = spearmanr(col.astype(float), df["value"]).statistic
            scores[k] = abs(float(rho)) if math.isfinite(rho) else 0.0
        tot = sum(scores.values()) or 1.0
        return ({k: v / tot for k, v in sorted(scores.items(), key=lambda kv: -kv[1])},
                f"|Spearman ρ| with {metric}, normalised (optuna unavailable: {e})")


def section_search(inp: Inputs) -> str:
    if inp.summary is None:
        return _na("this is a single training run, not a search directory (summary.json)")
    s = inp.summary
    metric, mode = search_metric(s)
    trials = s.get("trials", [])
    df, keys = _trials_frame(s)
    errors = [t for t in trials if t.get("status") == "ERROR"]
    best = s.get("best") or {}
    patience = f', {s["patience_stopped"]} stopped by patience' if "patience_stopped" in s else ""
    m = _esc(metric)
    out = (f'<p class="meta">Search space {_esc(s.get("space", "?"))}: {len(trials)} trials, {len(df)} with a '
           f'value of {m}, {len(errors)} failed, {s.get("asha_stopped", "–")} cut by ASHA{patience}; '
           f'selection by {m} ({"highest" if mode == "max" else "lowest"} is best).</p>')
    if best:
        t = best.get("test") or {}
        value = best["value"] if "value" in best else best.get("valid_rank_icir")
        icir = f'; validation Rank ICIR {_fmt(best.get("valid_rank_icir"), 3)}' if metric != "valid_rank_icir" else ""
        out += (f'<p>Best trial <b>{_esc(best.get("trial_id"))}</b>: {m} {_fmt(value, 4)}{icir}; '
                f'test Rank IC {_fmt(t.get("rank_ic"))}, Rank ICIR {_fmt(t.get("rank_icir"), 3)}.</p>')
    if len(df):
        top = df.sort_values(["value", "trial_id"], ascending=[mode == "min", True]).head(10)
        rows = [[_esc(r["trial_id"]), _fmt(r["value"], 4), _fmt(r["epochs"]),
                 *[_fmt(r[k], 5) if isinstance(r.get(k), float) else _esc(r.get(k, "–")) for k in keys]]
                for _, r in top.iterrows()]
        out += "<h3>Best trials</h3>" + _table(["trial", m, "epochs", *map(_esc, keys)], rows)
    else:
        out += _na(f"no trial finished with a value of {metric}")
    if errors:
        out += "<h3>Failed trials</h3>" + _table(["trial", "error"], [[_esc(t.get("trial_id")),
                                                                       _esc(t.get("error") or "")] for t in errors])
    plt = _plt()
    try:
        imp, method = param_importance(s, exp_dir=inp.source)
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(imp) + 1.2))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="C0")
        ax.set_xlabel("importance")
        ax.set_title(f"Parameter importance for {metric}")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        out += "<h3>Parameter importance</h3>" + f'<p class="meta">{_esc(method)}</p>' + _img(
            _fig_png(fig), "Parameter importance")
    except ValueError as e:
        out += "<h3>Parameter importance</h3>" + _na(str(e))
    usable = [k for k in keys if k in df and df[k].notna().any()]
    if usable:
        ncol = min(3, len(usable))
        nrow = math.ceil(len(usable) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
        for ax, k in zip(axes.flat, usable):
            sub = df[df[k].notna()]
            x = sub[k]
            if x.map(lambda v: isinstance(v, (str, bool))).any():
                cats = sorted(x.astype(str).unique())
                pos = x.astype(str).map({c: i for i, c in enumerate(cats)}).to_numpy(float)
                jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(pos))
                ax.scatter(pos + jitter, sub["value"], alpha=0.8)
                ax.set_xticks(range(len(cats)), cats)
            else:
                xv = x.astype(float).to_numpy()
                ax.scatter(xv, sub["value"], alpha=0.8)
                if xv.min() > 0 and xv.max() / xv.min() >= 10:
                    ax.set_xscale("log")
            if best.get("trial_id") is not None:
                b = sub[sub["trial_id"] == best["trial_id"]]
                if len(b):
                    bx = b[k].astype(str).map({c: i for i, c in enumerate(sorted(x.astype(str).unique()))}) \
                        if x.map(lambda v: isinstance(v, (str, bool))).any() else b[k].astype(float)
                    ax.scatter(bx, b["value"], marker="*", s=160, color="C3", zorder=3)
            ax.set_title(k, fontsize=9)
            ax.set_ylabel(metric, fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(usable):]:
            ax.axis("off")
        fig.tight_layout()
        out += f"<h3>{m} vs each parameter</h3>" + _img(
            _fig_png(fig), f"{metric} per trial (its best epoch) vs parameter (★ best trial)")
    trials_png = inp.source / "trials.png"
    if trials_png.is_file():
        out += _img(trials_png, f"{metric} of every trial per epoch")
    return out


# --------------------------------------------------------------------------- the page


def build_report(path: str | Path, *, out: str | Path, data: str | Path | None = None,
                 baselines: list[Path] | None = None, topk: int | None = None, n_drop: int | None = None,
                 progress: bool = True) -> Path:
    """Write the HTML report of a run or search directory to ``out``; returns its path."""
    t0 = time.time()
    inp = resolve_inputs(path, data=data)
    bl = find_baselines(inp, baselines)
    body: dict[str, str] = {}
    titles = {"metrics": "Signal metrics", "risk": "Risk model: bias statistics",
              "posterior": "Is the posterior informative?", "equity": "Backtest: cumulative returns",
              "drawdown": "Drawdowns",
              "factors": "Factor analysis", "search": "Hyperparameter search"}

    def guarded(name: str, fn: Any) -> None:
        try:
            body[name] = fn()
        except (DataError, ReportError, ValueError, KeyError, OSError) as e:
            body[name] = _na(f"building this section failed ({type(e).__name__}: {e})")

    guarded("metrics", lambda: section_metrics(inp, bl))
    guarded("risk", lambda: section_risk(inp))
    guarded("posterior", lambda: section_posterior(inp))
    folder, note = None, ""
    try:
        folder, note = ensure_backtest(inp, topk=topk, n_drop=n_drop, progress=progress)
    except (DataError, ValueError, KeyError, OSError) as e:
        note = f"the backtest failed ({type(e).__name__}: {e})"
    guarded("equity", lambda: section_equity(folder, note))
    guarded("drawdown", lambda: section_drawdown(folder, note))
    guarded("factors", lambda: section_factors(inp, progress=progress))
    guarded("search", lambda: section_search(inp))

    kind = "search" if inp.summary is not None else "run"
    nav = " · ".join(f'<a href="#{s}">{titles[s]}</a>' for s in SECTIONS)
    sections = "".join(f'<section id="{s}"><h2>{titles[s]}</h2>{body[s]}</section>' for s in SECTIONS)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>FactorVAE report: '
            f'{_esc(inp.source.name)}</title><style>{CSS}</style></head><body>'
            f'<h1>FactorVAE report</h1><p class="meta">{kind} directory <code>{_esc(inp.source)}</code>'
            f'{f"; data <code>{_esc(inp.data)}</code>" if inp.data else ""}; generated '
            f'{time.strftime("%Y-%m-%d %H:%M")}</p><p id="img-warning"></p><nav>{nav}</nav>{sections}'
            f"<script>{SCRIPT}</script></body></html>")
    out = Path(out)
    atomic_write_text(out, page)
    if progress:
        print(f"[report] wrote {out} ({len(page) / 1e6:.1f} MB) in {time.time() - t0:.1f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fvae.report", description="HTML report of a run or search.")
    p.add_argument("path", type=Path, help="run directory (fvae.train) or experiment directory (fvae.tune)")
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")
    p.add_argument("--data", type=Path, default=None, help="shard folder (default: the one metrics.json names)")
    p.add_argument("--baselines", type=Path, nargs="+", default=None,
                   help="baselines.json files of python -m fvae.baselines (default: found next to the run)")
    p.add_argument("--topk", type=int, default=None, help="TopK-Drop k (default 50, less for small universes)")
    p.add_argument("--n-drop", type=int, default=None, help="TopK-Drop n")
    args = p.parse_args(argv)
    try:
        build_report(args.path, out=args.out, data=args.data, baselines=args.baselines, topk=args.topk,
                     n_drop=args.n_drop)
    except (ReportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
