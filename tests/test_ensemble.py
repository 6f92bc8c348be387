"""fvae.ensemble on hand-built prediction files, where the answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fvae.data.shards import DataError
from fvae.ensemble import ensemble, main

D, N = 30, 25


def _panel(seed: int = 0) -> tuple[pd.DatetimeIndex, np.ndarray, np.ndarray, np.ndarray]:
    """Days, stocks, the realised label y (D, N) and a per-day noise d orthogonal to y and to 1."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((D, N))
    d = rng.standard_normal((D, N))
    yc = y - y.mean(1, keepdims=True)
    d = d - d.mean(1, keepdims=True)
    d -= ((d * yc).sum(1) / (yc * yc).sum(1))[:, None] * yc
    return pd.bdate_range("2020-01-01", periods=D), np.array([f"S{i:02d}" for i in range(N)]), y, 2.0 * d


def _run(folder: Path, dates, names, y: np.ndarray, score: np.ndarray, *, fingerprint: str = "abc") -> Path:
    folder.mkdir(parents=True)
    dd, nn = np.meshgrid(np.arange(D), np.arange(N), indexing="ij")
    ok = np.isfinite(score)
    metrics: dict = {"fingerprint": fingerprint, "data": "hand-built"}
    from fvae.ensemble import SEGMENTS

    for seg in SEGMENTS:
        pd.DataFrame({"datetime": dates[dd[ok]], "instrument": names[nn[ok]], "score": score[ok],
                      "label": y[ok]}).to_parquet(folder / f"pred_{seg}.parquet")
        s = pd.DataFrame(np.where(ok, score, np.nan)).T
        metrics[seg] = {"ic": float(s.corrwith(pd.DataFrame(y).T).mean()), "icir": 0.0,
                        "rank_ic": float(s.rank().corrwith(pd.DataFrame(y).T.rank()).mean()), "rank_icir": 0.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_two_members_whose_errors_cancel_rank_every_day_exactly(tmp_path):
    """Member scores y + d and 3 (y − d) + 5 (another scale and shift; d orthogonal to y): each ranks
    the stocks imperfectly, their standardised mean is y's own ranking, Rank IC and IC exactly 1."""
    dates, names, y, d = _panel()
    a = _run(tmp_path / "a", dates, names, y, y + d)
    b = _run(tmp_path / "b", dates, names, y, 3.0 * (y - d) + 5.0)
    res = ensemble([a, b], out=tmp_path / "ens")
    for seg in ("valid", "test"):
        assert res[seg]["rank_ic"] == pytest.approx(1.0, abs=1e-12) and res[seg]["ic"] == pytest.approx(1.0, abs=1e-12)
        assert all(m["rank_ic"] < 0.8 for m in res[seg]["members"]), res[seg]["members"]
    pred = pd.read_parquet(tmp_path / "ens" / "pred_test.parquet")
    assert len(pred) == D * N and list(pred.columns) == ["datetime", "instrument", "score", "label"]
    assert json.loads((tmp_path / "ens" / "metrics.json").read_text())["members"] == [str(a), str(b)]


def test_a_member_with_itself_is_that_member(tmp_path):
    """An ensemble of one run's scores twice (once scaled): Rank IC and IC are the run's own."""
    dates, names, y, d = _panel(1)
    a = _run(tmp_path / "a", dates, names, y, y + 3 * d)
    b = _run(tmp_path / "b", dates, names, y, 10.0 * (y + 3 * d))
    res = ensemble([a, b], out=tmp_path / "ens")
    assert res["test"]["rank_ic"] == pytest.approx(res["test"]["members"][0]["rank_ic"], abs=1e-12)
    assert res["test"]["ic"] == pytest.approx(res["test"]["members"][0]["ic"], abs=1e-12)


def test_a_stock_one_member_did_not_score_takes_the_others(tmp_path):
    dates, names, y, d = _panel(2)
    sa = y + d
    sa[:, 0] = np.nan  # member a never scores stock 0
    a = _run(tmp_path / "a", dates, names, y, sa)
    b = _run(tmp_path / "b", dates, names, y, y - d)
    ensemble([a, b], out=tmp_path / "ens")
    pred = pd.read_parquet(tmp_path / "ens" / "pred_test.parquet")
    assert len(pred) == D * N and pred["score"].notna().all()


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    dates, names, y, d = _panel(3)
    a = _run(tmp_path / "a", dates, names, y, y + d)
    b = _run(tmp_path / "b", dates, names, y, y - d, fingerprint="other")
    with pytest.raises(DataError, match="trained on different data"):
        ensemble([a, b], out=tmp_path / "o")
    with pytest.raises(DataError, match="at least 2 runs"):
        ensemble([a], out=tmp_path / "o")
    assert main([str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope/metrics.json not found" in err and err.count("\n") == 1
    (b / "pred_test.parquet").unlink()
    (b / "metrics.json").write_text(json.dumps({**json.loads((b / "metrics.json").read_text()), "fingerprint": "abc"}))
    with pytest.raises(DataError, match=r"pred_test.parquet not found"):
        ensemble([a, b], out=tmp_path / "o")
