"""fvae.data.qlib_io against known answers: the input panel itself and qlib's own engine.

Uses a small real slice of the S&P 500 panel in ../shared/data/sp500 (skipped
when that folder is absent): 20 symbols over 2015-2016, five of which start
trading inside the range, with a few rows removed (gaps) and one zero volume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fvae.data import qlib_io
from fvae.data.process import cs_rank_norm, process_features
from fvae.data.shards import DataError, read_meta

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sp500"
PANEL = DATA / "sp500_daily.parquet"
SYMBOLS = ["AAPL", "AMZN", "BRK.B", "CSCO", "GE", "INTC", "JNJ", "JPM", "KO", "MSFT",
           "PFE", "T", "WMT", "XOM", "CAT", "ETSY", "FTV", "HPE", "KHC", "PYPL"]
LATE = {"ETSY": "2015-04-16", "FTV": "2016-07-01", "HPE": "2015-10-19", "KHC": "2015-07-06", "PYPL": "2015-07-20"}
GAPS = [("AAPL", "2015-06-10"), ("AAPL", "2015-06-11"), ("AAPL", "2016-03-01"), ("JPM", "2016-08-15")]
ZERO_VOLUME = ("KO", "2016-05-02")
# a market with membership spans narrower than the data, one instrument with two spans
SUB_MARKET = ("AAPL\t2015-09-01\t2016-02-29\nAAPL\t2016-06-01\t2016-09-30\n"
              "MSFT\t2016-01-04\t2016-12-30\nHPE\t2015-01-01\t2016-12-30\n")
TINY = ["AAPL", "KO", "PYPL"]


@pytest.fixture(scope="module")
def panel() -> pd.DataFrame:
    if not PANEL.is_file():
        pytest.skip(f"real S&P 500 panel not found at {PANEL} (expected ../shared/data/sp500 next to the repo)")
    df = pd.read_parquet(PANEL, filters=[("symbol", "in", SYMBOLS)])
    df["date"] = pd.to_datetime(df["date"])
    df = df[(df["date"] >= "2015-01-01") & (df["date"] <= "2016-12-31")]
    for sym, day in GAPS:
        df = df[~((df["symbol"] == sym) & (df["date"] == day))]
    zero = (df["symbol"] == ZERO_VOLUME[0]) & (df["date"] == ZERO_VOLUME[1])
    assert zero.sum() == 1
    df.loc[zero, "volume"] = 0
    df = df.sort_values(["symbol", "date"]).reset_index(drop=True)
    assert sorted(df["symbol"].unique()) == sorted(SYMBOLS)
    return df


@pytest.fixture(scope="module")
def panel_file(panel: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("panel") / "slice.parquet"
    out = panel.copy()
    out["date"] = out["date"].dt.date  # as in the real file: a date32 column
    out.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def qdir(panel_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qlib") / "us_data"
    info = qlib_io.import_ohlcv(panel_file, out=out, market="sp500")
    assert info["status"] == "complete"
    (out / "instruments" / "sub.txt").write_text(SUB_MARKET)
    lines = (out / "instruments" / "sp500.txt").read_text().splitlines()
    (out / "instruments" / "tiny.txt").write_text("".join(l + "\n" for l in lines if l.split("\t")[0] in TINY))
    (out / "instruments" / "empty.txt").write_text("")
    return out


@pytest.fixture(scope="module")
def D(qdir: Path):
    """qlib's data API, initialised on the imported slice (qlib's state is process-global)."""
    qlib_io.init_qlib(qdir, region="us")
    from qlib.data import D as qlib_D

    return qlib_D


def _expected_fields(panel: pd.DataFrame) -> pd.DataFrame:
    """qlib's conventions computed here independently, row by row of the input."""
    f = panel["adjusted_close"] / panel["close"]
    e = pd.DataFrame({"symbol": panel["symbol"], "date": panel["date"], "factor": f,
                      "open": panel["open"] * f, "high": panel["high"] * f, "low": panel["low"] * f,
                      "close": panel["adjusted_close"], "volume": panel["volume"] / f})
    e["vwap"] = (e["high"] + e["low"] + e["close"]) / 3
    e["change"] = e["close"] / e.groupby("symbol")["close"].shift(1) - 1
    return e


# --------------------------------------------------------------------------- import


def test_import_writes_qlib_layout_byte_for_byte(panel: pd.DataFrame, qdir: Path) -> None:
    calendar = np.sort(panel["date"].unique())
    assert (qdir / "calendars" / "day.txt").read_text() == "".join(
        f"{pd.Timestamp(d).date()}\n" for d in calendar)
    inst = (qdir / "instruments" / "sp500.txt").read_text().splitlines()
    want = [f"{s}\t{g['date'].min().date()}\t{g['date'].max().date()}" for s, g in panel.groupby("symbol")]
    assert inst == sorted(want)
    assert inst[[l.split("\t")[0] for l in inst].index("PYPL")].split("\t")[1] == LATE["PYPL"]

    exp = _expected_fields(panel)
    for sym in ("AAPL", "PYPL", "BRK.B"):
        rows = exp[exp["symbol"] == sym]
        pos = np.searchsorted(calendar, rows["date"].to_numpy())
        first = pos[0]
        for field in qlib_io.FIELDS:
            values = np.full(pos[-1] - first + 1, np.nan)
            values[pos - first] = rows[field].to_numpy()
            want_bytes = np.r_[first, values].astype("<f4").tobytes()
            got = (qdir / "features" / sym.lower() / f"{field}.day.bin").read_bytes()
            if field in ("change", "vwap"):  # same formula, float64 order of operations may differ by an ulp
                np.testing.assert_allclose(np.frombuffer(got, "<f4"), np.frombuffer(want_bytes, "<f4"),
                                           rtol=1e-6, equal_nan=True, err_msg=f"{sym} {field}")
            else:
                assert got == want_bytes, f"{sym} {field}.day.bin differs"
    # gaps are NaN slots inside the symbol's range; the close is the adjusted close, exactly
    start, close = qlib_io.read_bin(qdir / "features" / "aapl" / "close.day.bin")
    assert start == 0
    for _, day in [g for g in GAPS if g[0] == "AAPL"]:
        assert np.isnan(close[int(np.searchsorted(calendar, np.datetime64(day)))])
    aapl = panel[panel["symbol"] == "AAPL"]
    np.testing.assert_array_equal(close[~np.isnan(close)], aapl["adjusted_close"].to_numpy(np.float32))
    # change bridges a gap: return from the last bar before it
    ch = qlib_io.read_bin(qdir / "features" / "aapl" / "change.day.bin")[1]
    after = int(np.searchsorted(calendar, np.datetime64("2015-06-12")))
    before = aapl.set_index("date").loc["2015-06-09", "adjusted_close"]
    now = aapl.set_index("date").loc["2015-06-12", "adjusted_close"]
    assert ch[after] == pytest.approx(now / before - 1, rel=1e-6)

    info = json.loads((qdir / qlib_io.IMPORT_INFO).read_text())
    assert info["rows"] == len(panel) and info["symbols"] == 20 and info["days"] == len(calendar)
    assert info["vwap_approx"] == "(high+low+close)/3" and info["status"] == "complete"


def test_qlib_reads_the_import_back(panel: pd.DataFrame, D) -> None:
    fields = ["$open", "$high", "$low", "$close", "$volume", "$factor", "$vwap", "$change"]
    got = D.features(D.instruments("sp500"), fields, start_time="2015-01-01", end_time="2016-12-31")
    got.columns = [f[1:] for f in fields]
    exp = _expected_fields(panel).set_index(["symbol", "date"])
    # qlib emits the gap days as NaN rows; every input row is there with its values
    assert got["close"].notna().sum() == len(panel)
    assert np.isnan(got.loc[("AAPL", pd.Timestamp("2015-06-10")), "close"])
    got = got.dropna(subset=["close"])
    got.index = got.index.set_names(["symbol", "date"])
    exp = exp.reindex(got.index)
    for c in got.columns:
        np.testing.assert_allclose(got[c].to_numpy(np.float64), exp[c].to_numpy(np.float64), rtol=2e-7, atol=0,
                                   equal_nan=True, err_msg=c)
    # the start of a late listing
    pypl = got.xs("PYPL", level="symbol")
    assert pypl.index[0] == pd.Timestamp(LATE["PYPL"])
    assert got.loc[(ZERO_VOLUME[0], pd.Timestamp(ZERO_VOLUME[1])), "volume"] == 0


def test_import_folder_of_csv_files_matches_parquet_import(panel: pd.DataFrame, qdir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "csv"
    folder.mkdir()
    for sym, g in panel.groupby("symbol"):
        g = g.drop(columns=["symbol"]).rename(columns={"date": "Date", "open": "Open", "high": "High", "low": "Low",
                                                       "close": "Close", "adjusted_close": "Adj Close",
                                                       "volume": "Volume"})
        g.to_csv(folder / f"{sym}.csv", index=False)
    out = tmp_path / "from_csv"
    info = qlib_io.import_ohlcv(folder, out=out, market="sp500")
    assert info["symbols"] == 20 and info["rows"] == len(panel)
    ref_files = [p.relative_to(qdir) for p in sorted(qdir.glob("features/*/*.day.bin"))]
    ref_files += [Path("calendars/day.txt"), Path("instruments/sp500.txt")]
    assert len(ref_files) == 20 * 8 + 2
    for rel in ref_files:
        assert (out / rel).read_bytes() == (qdir / rel).read_bytes(), f"{rel} differs from the Parquet import"


def test_import_long_csv_keeps_code_zeros_and_reads_yyyymmdd_dates(tmp_path: Path) -> None:
    """A CN-style table: numeric-looking codes, integer dates, no adjusted close or vwap column."""
    csv = tmp_path / "cn.csv"
    csv.write_text("Ticker,Date,Open,High,Low,Close,Volume,VWAP\n"
                   "000001,20200102,10,11,9,10.5,1000,10.2\n"
                   "000001,20200106,10.5,12,10,11.5,2000,11.1\n"
                   "600000,20200103,5,5.5,4.5,5.25,300,5.1\n")
    out = tmp_path / "q"
    info = qlib_io.import_ohlcv(csv, out=out, market="csi")
    assert info["factor"] == "1.0 (no adjusted close column)" and info["vwap_approx"] is None
    assert (out / "calendars" / "day.txt").read_text() == "2020-01-02\n2020-01-03\n2020-01-06\n"
    assert (out / "instruments" / "csi.txt").read_text() == ("000001\t2020-01-02\t2020-01-06\n"
                                                              "600000\t2020-01-03\t2020-01-03\n")
    start, close = qlib_io.read_bin(out / "features" / "000001" / "close.day.bin")
    assert start == 0 and np.isnan(close[1]) and list(close[[0, 2]]) == [10.5, 11.5]
    vwap = qlib_io.read_bin(out / "features" / "000001" / "vwap.day.bin")[1]
    assert list(vwap[[0, 2]]) == [np.float32(10.2), np.float32(11.1)]
    start, factor = qlib_io.read_bin(out / "features" / "600000" / "factor.day.bin")
    assert start == 1 and factor.tolist() == [1.0]


def test_interrupted_import_is_not_complete_and_can_be_redone(panel_file: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "q"
    real = qlib_io._atomic_write

    def failing(path: Path, data: bytes) -> None:
        if path.parent.name == "instruments":
            raise KeyboardInterrupt("simulated interruption")
        real(path, data)

    monkeypatch.setattr(qlib_io, "_atomic_write", failing)
    with pytest.raises(KeyboardInterrupt):
        qlib_io.import_ohlcv(panel_file, out=out, market="sp500")
    assert not (out / "calendars" / "day.txt").exists()
    assert json.loads((out / qlib_io.IMPORT_INFO).read_text())["status"] == "incomplete"
    with pytest.raises(DataError, match="day.txt"):
        qlib_io.open_qlib_dir(out, "sp500")
    monkeypatch.setattr(qlib_io, "_atomic_write", real)
    qlib_io.import_ohlcv(panel_file, out=out, market="sp500")
    assert (out / "calendars" / "day.txt").is_file()
    assert not list(out.rglob(".*tmp-*"))


# --------------------------------------------------------------------------- export


def _engine_alpha360(D, market: str, start: str, end: str) -> pd.DataFrame:
    """Alpha360 plus the default label straight from qlib's loader definition and D.features."""
    from qlib.contrib.data.loader import Alpha360DL

    fields, names = Alpha360DL.get_feature_config()
    df = D.features(D.instruments(market), list(fields) + [qlib_io.DEFAULT_LABEL], start_time=start, end_time=end)
    df.columns = list(names) + ["ret"]
    df = df.swaplevel().sort_index()
    df.index = df.index.set_names(["datetime", "instrument"])
    return df


def test_alpha360_names_follow_qlib() -> None:
    from qlib.contrib.data.loader import Alpha360DL

    fields, names = Alpha360DL.get_feature_config()
    assert qlib_io.alpha360_fields() == (list(fields), list(names))
    window = qlib_io.alpha360_window_names()
    assert sorted(window) == sorted(names) and window[:7] == ["CLOSE59", "OPEN59", "HIGH59", "LOW59", "VWAP59",
                                                             "VOLUME59", "CLOSE58"]
    assert window[-1] == "VOLUME0"


@pytest.mark.parametrize("market", ["sp500", "sub"])
def test_alpha360_native_equals_qlib_engine(D, qdir: Path, market: str) -> None:
    start, end = pd.Timestamp("2015-03-02"), pd.Timestamp("2016-12-30")
    q = qlib_io.open_qlib_dir(qdir, market)
    raw = qlib_io.compute_raw(q, handler="Alpha360", start=start, end=end, label=qlib_io.DEFAULT_LABEL,
                              lookback=20, extra_features=[], region="us")
    assert raw.label_native and raw.layout == "window" and raw.x.shape[1] == 360
    mine = raw.frame().set_index(["datetime", "instrument"])
    ref = _engine_alpha360(D, market, str(start.date()), str(end.date()))
    # qlib also emits the days without a bar (all features NaN); fvae drops exactly those
    no_bar = ref["CLOSE0"].isna()
    assert int(no_bar.sum()) == raw.dropped_no_bar
    if market == "sp500":
        assert raw.dropped_no_bar == len([g for g in GAPS if g[1] >= "2015-03-02"])
    ref = ref[~no_bar]
    assert mine.index.equals(ref.index)
    cols = qlib_io.alpha360_window_names() + ["ret"]
    a, b = mine[cols].to_numpy(np.float64), ref[cols].to_numpy(np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=0, equal_nan=True)
    # the row count and history past a membership span's start follow qlib's spans
    if market == "sub":
        aapl = mine.xs("AAPL", level="instrument")
        assert aapl.index.min() == pd.Timestamp("2015-09-01") and aapl.index.max() == pd.Timestamp("2016-09-30")
        assert not aapl.index.isin(pd.date_range("2016-03-01", "2016-05-31")).any()
        assert np.isfinite(aapl["CLOSE59"].iloc[0])  # 59 days back is before the span: still data
    # a row reshapes to (T=60, C=6), oldest first
    row = mine.loc[(pd.Timestamp("2016-06-01"), "MSFT"), qlib_io.alpha360_window_names()].to_numpy()
    win = row.reshape(60, 6)
    assert win[-1, 0] == 1.0 and win[0, 0] == mine.loc[(pd.Timestamp("2016-06-01"), "MSFT"), "CLOSE59"]


def test_alpha360_export_equals_qlib_engine_after_processing(D, qdir: Path, tmp_path: Path) -> None:
    seg = {"train": ("2015-03-02", "2015-12-31"), "valid": ("2016-01-04", "2016-06-30"),
           "test": ("2016-07-01", "2016-12-30")}
    out = tmp_path / "shards"
    meta = qlib_io.export(provider_uri=qdir, region="us", market="sp500", handler="Alpha360", out=out,
                          label=qlib_io.DEFAULT_LABEL, lookback=20, extra_features=[], **seg)
    assert read_meta(out) == meta
    assert (meta.layout, meta.lookback, meta.channels) == ("window", 60, 6)
    assert meta.feature_names == qlib_io.alpha360_window_names()
    assert meta.source == f"qlib:{qdir}" and meta.market == "sp500" and meta.handler == "Alpha360"
    assert meta.segments == {k: list(v) for k, v in seg.items()}
    assert meta.extra["vwap_approx"] == "(high+low+close)/3" and meta.extra["region"] == "us"
    got = pd.concat([pd.read_parquet(out / s["file"]) for s in meta.shards]).set_index(["datetime", "instrument"])

    ref = _engine_alpha360(D, "sp500", seg["train"][0], seg["test"][1])
    ref = ref[ref["CLOSE0"].notna()].reset_index()
    names = qlib_io.alpha360_window_names()
    train = ((ref["datetime"] >= seg["train"][0]) & (ref["datetime"] <= seg["train"][1])).to_numpy()
    ref["ret"] = ref["ret"].astype(np.float32)
    stats = process_features(ref, names, train)
    ref = ref.copy()  # de-fragment after process_features' column assignment
    ref["label"] = cs_rank_norm(ref["ret"], ref["datetime"])
    ref = ref.set_index(["datetime", "instrument"])
    assert got.index.equals(ref.index)
    np.testing.assert_allclose(got[names].to_numpy(np.float64), ref[names].to_numpy(np.float64), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[["label", "ret"]].to_numpy(np.float64), ref[["label", "ret"]].to_numpy(np.float64),
                               atol=1e-6, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(meta.norm["median"], stats["median"], rtol=1e-6)
    np.testing.assert_allclose(meta.norm["scale"], stats["scale"], rtol=1e-6)
    assert got[names].abs().max().max() <= 3.0 and not got[names].isna().any().any()
    assert got["label"].isna().sum() == got["ret"].isna().sum() > 0  # the last two days have no label


def test_alpha158_export_through_qlib_engine(panel: pd.DataFrame, qdir: Path, tmp_path: Path) -> None:
    from qlib.contrib.data.loader import Alpha158DL

    seg = {"train": ("2016-01-04", "2016-02-29"), "valid": ("2016-03-01", "2016-03-31"),
           "test": ("2016-04-01", "2016-04-29")}
    meta = qlib_io.export(provider_uri=qdir, region="us", market="tiny", handler="Alpha158", out=tmp_path / "a158",
                          label=qlib_io.DEFAULT_LABEL, lookback=10, extra_features=["RET1=$close/Ref($close,1)-1"],
                          **seg)
    _, names = Alpha158DL.get_feature_config()
    assert meta.feature_names == list(names) + ["RET1"] and len(names) == 158
    assert (meta.layout, meta.lookback, meta.channels) == ("daily", 10, 159)
    got = pd.concat([pd.read_parquet(tmp_path / "a158" / s["file"]) for s in meta.shards])
    assert list(got.columns) == ["datetime", "instrument", *meta.feature_names, "label", "ret"]
    assert sorted(got["instrument"].unique()) == sorted(TINY)
    # the daily layout's history: the T-1 = 9 trading days before the train segment are exported too,
    # so the first training window is complete
    before = got.loc[got["datetime"] < pd.Timestamp(seg["train"][0]), "datetime"].unique()
    assert len(before) == 9
    from fvae.data.loader import load_panel

    assert load_panel(tmp_path / "a158", "train").incomplete_days == 0
    # known answers from the input panel: the extra feature's train median, the raw label
    close = _on_calendar(panel, TINY)
    ret1 = _long(close / close.shift(1) - 1)
    fwd = _long(close.shift(-2) / close.shift(-1) - 1)
    rows = got.set_index(["datetime", "instrument"]).index
    in_train = (rows.get_level_values(0) >= seg["train"][0]) & (rows.get_level_values(0) <= seg["train"][1])
    # (float32 ratios minus one: absolute, not relative, precision)
    assert meta.norm["median"][-1] == pytest.approx(ret1.reindex(rows[in_train]).median(), abs=1e-6)
    ret = got.set_index(["datetime", "instrument"])["ret"]
    np.testing.assert_allclose(ret.to_numpy(np.float64), fwd.reindex(ret.index).to_numpy(), atol=1e-6,
                               equal_nan=True)
    # NaN exactly where t+1 or t+2 is AAPL's gap day 2016-03-01
    assert set(ret[ret.isna()].index) == {(pd.Timestamp(d), "AAPL") for d in ("2016-02-26", "2016-02-29")}


def test_non_default_label_goes_through_qlib_engine(panel: pd.DataFrame, qdir: Path, tmp_path: Path) -> None:
    label = "Ref($close, -1)/$close - 1"
    meta = qlib_io.export(provider_uri=qdir, region="us", market="tiny", handler="Alpha360", out=tmp_path / "s",
                          train=("2016-01-04", "2016-06-30"), valid=("2016-07-01", "2016-09-30"),
                          test=("2016-10-03", "2016-12-30"), label=label, lookback=20, extra_features=[])
    assert meta.label_expr == label and meta.extra["label"] == "qlib expression engine"
    got = pd.concat([pd.read_parquet(tmp_path / "s" / s["file"]) for s in meta.shards])
    close = _on_calendar(panel, TINY)
    want = _long(close.shift(-1) / close - 1)
    ret = got.set_index(["datetime", "instrument"])["ret"]
    np.testing.assert_allclose(ret.to_numpy(np.float64), want.reindex(ret.index).to_numpy(), atol=1e-6,
                               equal_nan=True)
    # NaN on the calendar's last day, and for AAPL the day before its gap on 2016-03-01
    assert set(ret[ret.isna()].index) == {(pd.Timestamp("2016-12-30"), s) for s in TINY} | {
        (pd.Timestamp("2016-02-29"), "AAPL")}


# --------------------------------------------------------------------------- bad input


def _on_calendar(panel: pd.DataFrame, symbols: list[str]) -> pd.DataFrame:
    """Adjusted close as (date x symbol) over the slice's calendar: shifts here are calendar shifts, like qlib's Ref."""
    return panel.pivot(index="date", columns="symbol", values="adjusted_close")[symbols]


def _long(wide: pd.DataFrame) -> pd.Series:
    s = wide.stack(future_stack=True) if "future_stack" in wide.stack.__code__.co_varnames else wide.stack()
    s.index = s.index.set_names(["datetime", "instrument"])
    return s


def _write(df: pd.DataFrame, path: Path) -> Path:
    df.to_parquet(path, index=False)
    return path


def test_import_rejects_bad_inputs(panel: pd.DataFrame, tmp_path: Path) -> None:
    small = panel[panel["symbol"].isin(["AAPL", "KO"])].copy()
    out = tmp_path / "out"

    def err(path: Path) -> str:
        with pytest.raises(DataError) as e:
            qlib_io.import_ohlcv(path, out=out, market="m")
        assert "\n" not in str(e.value)
        assert not out.exists(), "a bad input must leave --out untouched"
        return str(e.value)

    msg = err(tmp_path / "nope.parquet")
    assert "nope.parquet" in msg and "not found" in msg
    msg = err(_write(small.drop(columns=["volume", "low"]), tmp_path / "m.parquet"))
    assert "missing column" in msg and "'volume'" in msg and "'low'" in msg and "m.parquet" in msg
    bad = small.astype({"close": object})
    bad.iloc[5, bad.columns.get_loc("close")] = "n/a"
    bad["close"] = bad["close"].astype(str)
    msg = err(_write(bad, tmp_path / "t.parquet"))
    assert "'close'" in msg and "not numeric" in msg and "'n/a'" in msg
    dup = pd.concat([small, small[(small["symbol"] == "KO") & (small["date"] == "2016-03-01")]])
    msg = err(_write(dup, tmp_path / "d.parquet"))
    assert "duplicate" in msg and "KO on 2016-03-01" in msg
    dates = small.assign(date=small["date"].dt.strftime("%Y-%m-%d"))
    dates.iloc[3, dates.columns.get_loc("date")] = "2015-13-45"
    msg = err(_write(dates, tmp_path / "u.parquet"))
    assert "unparseable" in msg and "'2015-13-45'" in msg and "'date'" in msg
    msg = err(_write(small.iloc[:0], tmp_path / "e.parquet"))
    assert "no rows" in msg
    (tmp_path / "nocsv").mkdir()
    msg = err(tmp_path / "nocsv")
    assert "no *.csv" in msg
    (tmp_path / "x.txt").write_text("a")
    assert "unknown file type" in err(tmp_path / "x.txt")
    # a folder with foreign data is never overwritten
    foreign = tmp_path / "foreign"
    (foreign / "calendars").mkdir(parents=True)
    with pytest.raises(DataError, match="refusing to overwrite"):
        qlib_io.import_ohlcv(_write(small, tmp_path / "ok.parquet"), out=foreign, market="m")


@pytest.mark.parametrize("change, needle", [
    ({"train": ("2014-01-02", "2015-12-31")}, "--train: 2014-01-02 is outside the calendar"),
    ({"test": ("2016-07-01", "2017-03-01")}, "--test: 2017-03-01 is outside the calendar"),
    ({"valid": ("2016-01-02", "2016-01-03")}, "--valid: 2016-01-02..2016-01-03 holds no trading days"),
    ({"valid": ("2015-12-01", "2016-06-30")}, "--valid: starts 2015-12-01, not after the end of --train"),
    ({"train": ("2015-12-31", "2015-03-02")}, "--train: start 2015-12-31 is after end"),
    ({"train": ("someday", "2015-12-31")}, "--train"),
    ({"market": "empty"}, "--market 'empty': no instruments"),
    ({"market": "nasdaq"}, "--market 'nasdaq': no instruments/nasdaq.txt"),
    ({"handler": "Alpha999"}, "--handler: 'Alpha999'"),
    ({"region": "eu"}, "--region: 'eu'"),
    ({"extra_features": ["X=$close"]}, "--feature: extra features need the daily layout"),
    ({"handler": "Alpha158", "extra_features": ["X"]}, "--feature: 'X' is not NAME=EXPR"),
    ({"handler": "Alpha158", "extra_features": ["KMID=$close"]}, "--feature: name(s) ['KMID']"),
    ({"provider_uri": "/nonexistent/qlib"}, "--provider-uri /nonexistent/qlib: folder not found"),
])
def test_export_rejects_bad_options(qdir: Path, tmp_path: Path, change: dict, needle: str) -> None:
    kw = dict(provider_uri=qdir, region="us", market="sp500", handler="Alpha360",
              train=("2015-03-02", "2015-12-31"), valid=("2016-01-04", "2016-06-30"), test=("2016-07-01", "2016-12-30"),
              out=tmp_path / "s", label=qlib_io.DEFAULT_LABEL, lookback=20, extra_features=[])
    kw.update(change)
    with pytest.raises(DataError) as e:
        qlib_io.export(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "s" / "meta.json").exists()


@pytest.mark.parametrize("change, needle", [
    ({"label": "Ref($nosuch, -1)/$close - 1"}, "--label: 'Ref($nosuch, -1)/$close - 1' has no finite value"),
    ({"handler": "Alpha158", "extra_features": ["Y=$nosuch/$close"]},
     "--feature: Y=$nosuch/$close is NaN on every row"),
])
def test_export_rejects_expressions_on_unknown_fields(qdir: Path, tmp_path: Path, D, change: dict, needle: str) -> None:
    kw = dict(provider_uri=qdir, region="us", market="tiny", handler="Alpha360", out=tmp_path / "s",
              train=("2016-01-04", "2016-02-29"), valid=("2016-03-01", "2016-03-31"), test=("2016-04-01", "2016-04-29"),
              label=qlib_io.DEFAULT_LABEL, lookback=20, extra_features=[])
    kw.update(change)
    with pytest.raises(DataError) as e:
        qlib_io.export(**kw)
    assert needle in str(e.value)


def test_export_rejects_expression_qlib_cannot_evaluate(qdir: Path, tmp_path: Path, D) -> None:
    with pytest.raises(DataError, match="--label") as e:
        qlib_io.export(provider_uri=qdir, region="us", market="tiny", handler="Alpha360", out=tmp_path / "s",
                       train=("2016-01-04", "2016-06-30"), valid=("2016-07-01", "2016-09-30"),
                       test=("2016-10-03", "2016-12-30"), label="Nonsense($close, 2)", lookback=20,
                       extra_features=[])
    assert "Nonsense" in str(e.value)


# --------------------------------------------------------------------------- missing fields


TINY_SEG = {"train": ("2016-01-04", "2016-06-30"), "valid": ("2016-07-01", "2016-09-30"),
            "test": ("2016-10-03", "2016-12-30")}


@pytest.fixture(scope="module")
def novwap(qdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The slice as a user's own qlib directory without $vwap: no vwap.day.bin, no fvae import record."""
    import shutil

    out = tmp_path_factory.mktemp("novwap") / "qlib"
    shutil.copytree(qdir, out)
    for f in out.glob("features/*/vwap.day.bin"):
        f.unlink()
    (out / qlib_io.IMPORT_INFO).unlink()
    return out


def _shards(folder: Path) -> pd.DataFrame:
    meta = read_meta(folder)
    return pd.concat([pd.read_parquet(folder / s["file"]) for s in meta.shards]).set_index(["datetime", "instrument"])


def _export(provider: Path, out: Path, **kw) -> qlib_io.Meta:
    args = dict(provider_uri=provider, region="us", market="tiny", handler="Alpha360", out=out,
                label=qlib_io.DEFAULT_LABEL, lookback=20, extra_features=[], **TINY_SEG)
    return qlib_io.export(**{**args, **kw})


@pytest.mark.parametrize("handler", ["Alpha360", "Alpha158"])
def test_export_without_vwap_names_the_field_the_folder_and_the_choices(novwap: Path, tmp_path: Path, handler: str,
                                                                         capsys) -> None:
    with pytest.raises(DataError) as e:
        _export(novwap, tmp_path / "s", handler=handler)
    msg = str(e.value)
    assert "\n" not in msg and f"--handler {handler}: needs $vwap" in msg and str(novwap / "features") in msg
    assert "--vwap approx ((high+low+close)/3, recorded in meta.json)" in msg and "--vwap drop" in msg
    assert "supply the field" in msg and not (tmp_path / "s" / "meta.json").exists()
    from fvae.data.__main__ import main

    argv = ["export", "--provider-uri", str(novwap), "--region", "us", "--market", "tiny", "--handler", handler,
            "--train", "2016-01-04:2016-06-30", "--valid", "2016-07-01:2016-09-30", "--test", "2016-10-03:2016-12-30",
            "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--vwap approx" in err[0]


def test_vwap_approx_and_drop_are_recorded_and_match_the_approximated_import(qdir: Path, novwap: Path,
                                                                              tmp_path: Path) -> None:
    """The fvae import approximated vwap as (high+low+close)/3 already: --vwap approx on the folder without
    vwap gives the same features; --vwap drop gives the same features less the 60 VWAP columns."""
    ref_meta = _export(qdir, tmp_path / "ref")
    ref = _shards(tmp_path / "ref")
    approx = _export(novwap, tmp_path / "approx", vwap="approx")
    assert approx.extra["vwap"].startswith("approx: (high+low+close)/3") and "vwap_approx" not in approx.extra
    got = _shards(tmp_path / "approx")
    assert got.index.equals(ref.index) and approx.feature_names == ref_meta.feature_names
    np.testing.assert_allclose(got[approx.feature_names].to_numpy(), ref[approx.feature_names].to_numpy(), atol=1e-4)
    drop = _export(novwap, tmp_path / "drop", vwap="drop")
    assert drop.extra["vwap"].startswith("drop:") and (drop.lookback, drop.channels) == (60, 5)
    assert drop.feature_names == [n for n in ref_meta.feature_names if not n.startswith("VWAP")]
    np.testing.assert_allclose(_shards(tmp_path / "drop")[drop.feature_names].to_numpy(),
                               ref[drop.feature_names].to_numpy(), atol=1e-5)
    from fvae.data.loader import load_panel

    assert load_panel(tmp_path / "drop", "train").feat.shape[-1] == 60 * 5


def test_alpha158_vwap_drop_leaves_out_vwap0(novwap: Path, tmp_path: Path) -> None:
    meta = _export(novwap, tmp_path / "s", handler="Alpha158", vwap="drop", lookback=5,
                   train=("2016-01-04", "2016-02-29"), valid=("2016-03-01", "2016-03-31"),
                   test=("2016-04-01", "2016-04-29"))
    assert "VWAP0" not in meta.feature_names and meta.channels == 157 and meta.extra["vwap"].startswith("drop:")


def test_a_feature_nan_on_every_training_row_is_an_error(qdir: Path, tmp_path: Path) -> None:
    """$open all NaN (a field present but empty): Alpha360's OPEN columns would be 0 everywhere after
    Fillna; the export says so instead."""
    import shutil

    broken = tmp_path / "qlib"
    shutil.copytree(qdir, broken)
    for f in broken.glob("features/*/open.day.bin"):
        raw = np.fromfile(f, dtype="<f4")
        raw[1:] = np.nan
        raw.tofile(f)
    with pytest.raises(DataError, match=r"--train: feature\(s\) \['OPEN59', 'OPEN58', .* are NaN on every training row"):
        _export(broken, tmp_path / "s")
    assert not (tmp_path / "s" / "meta.json").exists()
