"""The synthetic market, the shard format, the day loader and the config reader."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from fvae import config as fconfig
from fvae.data.loader import LoaderConfig, epoch_batches, load_panel, shard_batches
from fvae.data.process import cs_rank_norm, robust_zscore_apply, robust_zscore_fit
from fvae.data.shards import DataError, Meta, read_meta, verify_fingerprint, write_shards
from fvae.data.synthetic import SyntheticConfig, generate, write_synthetic


# --------------------------------------------------------------------------- synthetic market


def test_synthetic_is_deterministic(tmp_path):
    cfg = SyntheticConfig(stocks=40, days=200, seed=7)
    a, b = write_synthetic(tmp_path / "a", cfg), write_synthetic(tmp_path / "b", cfg)
    assert a.fingerprint == b.fingerprint
    c = write_synthetic(tmp_path / "c", dataclasses.replace(cfg, seed=8))
    assert c.fingerprint != a.fingerprint


def test_synthetic_records_positive_ceiling_and_churn(tiny_market):
    meta = read_meta(tiny_market)
    ceiling = meta.extra["ceiling_rank_ic"]
    assert set(ceiling) == {"train", "valid", "test"}
    assert all(v > 0.03 for v in ceiling.values()), ceiling
    # stocks enter and leave: the number of stocks differs between days
    panel = load_panel(tiny_market, "train")
    counts = panel.valid.sum(1)
    assert counts.min() < counts.max()
    assert meta.layout == "daily" and meta.lookback == 20 and meta.channels == 6


def test_synthetic_ceiling_is_the_true_expected_return():
    """The recorded ceiling is the Rank IC of mu_true; a noisier predictor scores lower."""
    df, truth = generate(SyntheticConfig(stocks=100, days=200, seed=3))
    from fvae.data.synthetic import _rank_ic_by_day

    rng = np.random.default_rng(0)
    noisy = truth["mu_true"] + rng.standard_normal(truth["mu_true"].shape) * 0.02
    best = np.nanmean(_rank_ic_by_day(truth["mu_true"], truth["y"], truth["active"]))
    worse = np.nanmean(_rank_ic_by_day(noisy, truth["y"], truth["active"]))
    assert best > worse > -0.05


def test_synthetic_sizes_scale(tmp_path):
    """An A-share-sized cross-section (3,500 stocks) generates in a bounded way."""
    df, truth = generate(SyntheticConfig(stocks=3500, days=60, seed=0))
    assert truth["active"].shape == (60 + 19, 3500)  # 60 segment days and T-1 = 19 of history
    assert df["instrument"].nunique() > 3000


# --------------------------------------------------------------------------- processing


def test_robust_zscore_matches_formula():
    x = np.array([[1.0], [2.0], [3.0], [4.0], [100.0], [np.inf]])
    med, scale = robust_zscore_fit(x)
    assert med[0] == pytest.approx(3.0)
    assert scale[0] == pytest.approx(1.4826 * (1.0 + 1e-12))
    z = robust_zscore_apply(x, med, scale)
    assert z[4, 0] == pytest.approx(3.0)  # clipped
    assert z[5, 0] == 0.0  # inf -> NaN -> 0
    assert z[0, 0] == pytest.approx(-2 / 1.4826, rel=1e-5)


def test_cs_rank_norm_is_per_day():
    dates = np.array(["a", "a", "a", "b", "b"])
    v = cs_rank_norm(pd.Series([3.0, 1.0, 2.0, 5.0, np.nan]), dates)
    assert v[:3] == pytest.approx([(1 - 0.5) * 3.46, (1 / 3 - 0.5) * 3.46, (2 / 3 - 0.5) * 3.46])
    assert v[3] == pytest.approx(0.5 * 3.46) and np.isnan(v[4])


# --------------------------------------------------------------------------- shards: bad input


def _frame(n_days=5, n_stocks=3):
    dates = pd.bdate_range("2020-01-01", periods=n_days)
    rows = [(d, f"S{i}") for d in dates for i in range(n_stocks)]
    df = pd.DataFrame(rows, columns=["datetime", "instrument"])
    rng = np.random.default_rng(0)
    df["f0"] = rng.standard_normal(len(df))
    df["f1"] = rng.standard_normal(len(df))
    df["label"] = rng.standard_normal(len(df))
    df["ret"] = rng.standard_normal(len(df))
    return df


def _meta(**kw):
    base = dict(source="test", handler="test", market="m", layout="daily", lookback=2, channels=2,
                feature_names=["f0", "f1"], label_expr="r",
                segments={"train": ["2020-01-01", "2020-01-03"], "valid": ["2020-01-06", "2020-01-06"],
                          "test": ["2020-01-07", "2020-01-07"]})
    base.update(kw)
    return Meta(**base)


def test_write_and_read_roundtrip(tmp_path):
    meta = write_shards(tmp_path, _frame(), _meta())
    back = read_meta(tmp_path)
    assert back.fingerprint == meta.fingerprint and back.rows == {"train": 9, "valid": 3, "test": 3}
    verify_fingerprint(tmp_path, back)
    shard = tmp_path / back.shards[0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="fingerprint"):
        verify_fingerprint(tmp_path, back)


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df.drop(columns=["f1"]), "missing column.*f1"),
    (lambda df: df.assign(f0=df["f0"].astype(str)), "'f0' has dtype"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "duplicate .* first S0 on 2020-01-01"),
    (lambda df: df.assign(f1=np.nan), "feature 'f1' is NaN on every row"),
    (lambda df: df.assign(f0=np.where(df.index == 2, np.inf, df["f0"])), "'f0' holds 1 inf"),
    (lambda df: df.iloc[:0], "no rows"),
    (lambda df: df.assign(datetime=df["datetime"].astype(str)), "'datetime' has dtype"),
])
def test_bad_frames_get_one_line_errors(tmp_path, mutate, message):
    with pytest.raises(DataError, match=message) as e:
        write_shards(tmp_path, mutate(_frame()), _meta())
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_empty_segment_is_an_error(tmp_path):
    segs = {"train": ["2020-01-01", "2020-01-03"], "valid": ["2021-01-01", "2021-02-01"],
            "test": ["2020-01-07", "2020-01-07"]}
    with pytest.raises(DataError, match="segment 'valid' .* holds no rows"):
        write_shards(tmp_path, _frame(), _meta(segments=segs))


def test_missing_meta_means_unfinished_export(tmp_path):
    write_shards(tmp_path, _frame(), _meta())
    (tmp_path / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json: missing"):
        read_meta(tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_meta(tmp_path / "nope")


def test_missing_shard_file_is_named(tmp_path):
    meta = write_shards(tmp_path, _frame(), _meta())
    (tmp_path / meta.shards[0]["file"]).unlink()
    with pytest.raises(DataError, match="2020.parquet: shard listed in meta.json is missing"):
        load_panel(tmp_path, "train")


def test_rewrite_removes_meta_first(tmp_path, monkeypatch):
    """An export interrupted mid-write leaves no meta.json, so it cannot look complete."""
    write_shards(tmp_path, _frame(), _meta())
    import fvae.data.shards as shards

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.pq, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path, _frame(), _meta())
    assert not (tmp_path / "meta.json").exists()
    assert not list((tmp_path / "shards").glob("*.parquet"))


def test_handler_mismatch_is_an_error(tiny_market):
    with pytest.raises(DataError, match="handler 'synthetic' features, but data.handler asks for 'Alpha360'"):
        load_panel(tiny_market, "train", handler="Alpha360")


def test_meta_with_wrong_feature_count(tmp_path):
    write_shards(tmp_path, _frame(), _meta())
    raw = json.loads((tmp_path / "meta.json").read_text())
    raw["channels"] = 3
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="2 feature_names, layout 'daily' with T=2, C=3 expects 3"):
        read_meta(tmp_path)


# --------------------------------------------------------------------------- loader


def test_panel_batch_matches_rows(tiny_market):
    """x, y and mask of a batch are exactly the shard rows of those days, windows in time order."""
    meta = read_meta(tiny_market)
    panel = load_panel(tiny_market, "valid")
    rows = pd.concat([pd.read_parquet(tiny_market / s["file"]) for s in meta.shards])
    days = np.array([0, 25, 50])
    b = panel.batch(days)
    T = meta.lookback
    assert b.x.shape[:2] == b.y.shape == b.mask.shape and b.x.shape[2:] == (T, meta.channels)
    all_dates = pd.DatetimeIndex(sorted(rows["datetime"].unique()))
    for i, d in enumerate(days):
        date = panel.dates[d]
        day_rows = rows[rows["datetime"] == date].set_index("instrument")
        real = b.mask[i].numpy()
        names = panel.instruments[b.stock[i].numpy()[real]]
        assert set(names) == set(day_rows.index[np.isfinite(day_rows["label"])])
        assert np.allclose(b.y[i].numpy()[real], day_rows.loc[names, "label"].to_numpy())
        assert (b.y[i].numpy()[~real] == 0).all() and (b.x[i].numpy()[~real] == 0).all()
        # the last step of each window is that day's features; step T-2 is the previous trading day
        assert np.allclose(b.x[i, real, -1].numpy(), day_rows.loc[names, meta.feature_names].to_numpy())
        prev = all_dates[all_dates.get_loc(date) - 1]
        prev_rows = rows[rows["datetime"] == prev].set_index("instrument").reindex(names)
        expect = prev_rows[meta.feature_names].fillna(0.0).to_numpy()
        assert np.allclose(b.x[i, real, -2].numpy(), expect)


def test_dense_batch_is_batch_in_fixed_slots(tiny_market):
    """The CUDA-graph batch holds the same windows, labels and mask as ``batch``, at fixed
    (slots, all stocks) shape, every stock in panel order; the spare slots are empty days of weight 0."""
    panel = load_panel(tiny_market, "valid")
    days = np.array([3, 30, 57])
    a, b = panel.batch(days), panel.dense_batch(days, np.array([1.0, 0.5, 1.0]), size=5)
    N = len(panel.instruments)
    assert b.x.shape == (5, N, panel.lookback, panel.channels) and b.mask.shape == (5, N)
    for i in range(3):
        real = a.stock[i][a.mask[i]]
        assert torch.equal(b.mask[i].nonzero().squeeze(1), real.sort().values)
        assert torch.equal(b.x[i][real], a.x[i][a.mask[i]]) and torch.equal(b.y[i][real], a.y[i][a.mask[i]])
        assert (b.x[i][~b.mask[i]] == 0).all() and (b.y[i][~b.mask[i]] == 0).all()
    assert b.weight.tolist() == [1.0, 0.5, 1.0, 0.0, 0.0] and not b.mask[3:].any() and (b.x[3:] == 0).all()
    with pytest.raises(ValueError, match="4 days for 3 slots"):
        panel.dense_batch(np.arange(4), size=3)


def test_every_day_once_and_windows_disjoint():
    for D, T, B in [(600, 20, 32), (97, 10, 4), (50, 60, 8), (1000, 1, 16)]:
        for epoch in range(3):
            batches = epoch_batches(D, batch_days=B, lookback=T, non_overlap=True, seed=0, epoch=epoch)
            days = np.concatenate(batches)
            assert sorted(days.tolist()) == list(range(D))
            for b in batches:
                assert len(b) <= B
                gaps = np.diff(np.sort(b))
                assert (gaps >= T).all(), (D, T, B, b)


def test_every_training_window_is_exactly_its_own_past(tiny_market):
    """Daily layout: the synthetic market writes T-1 days of history before the train segment, so every
    window of every training day, the first included, is the stock's own previous T days (0 where it
    was not listed), never rows from elsewhere in the panel."""
    meta = read_meta(tiny_market)
    panel = load_panel(tiny_market, "train")
    T, C = meta.lookback, meta.channels
    assert panel.incomplete_days == 0 and panel.history == T - 1
    rows = pd.concat([pd.read_parquet(tiny_market / s["file"]) for s in meta.shards])
    dates = pd.DatetimeIndex(sorted(rows["datetime"].unique()))
    first = dates.get_loc(panel.dates[0])
    assert first == T - 1  # the history rows are there, before the segment
    cube = np.zeros((len(dates), len(panel.instruments), C), dtype=np.float32)
    rows = rows[rows["instrument"].isin(panel.instruments)]
    cube[dates.get_indexer(rows["datetime"]), np.searchsorted(panel.instruments, rows["instrument"])] = \
        rows[meta.feature_names].to_numpy(np.float32)
    for a in range(0, panel.num_days, 50):
        b = panel.batch(np.arange(a, min(a + 50, panel.num_days)))
        for i, d in enumerate(b.day.tolist()):
            real = b.mask[i]
            want = cube[first + d - T + 1: first + d + 1][:, b.stock[i][real].numpy()]  # (T, n, C)
            assert np.array_equal(b.x[i][real].numpy(), want.transpose(1, 0, 2)), d


def test_shards_without_history_leave_incomplete_days_out(tmp_path):
    """Shards that start on the first training day (written before history was exported): the first
    T-1 days have no complete window, so they are not samples, and the panel never indexes before row 0."""
    src = tmp_path / "src"
    write_synthetic(src, SyntheticConfig(stocks=30, days=120, seed=2, lookback=10))
    meta = read_meta(src)
    rows = pd.concat([pd.read_parquet(src / s["file"]) for s in meta.shards])
    rows = rows[rows["datetime"] >= pd.Timestamp(meta.segments["train"][0])]
    bare = write_shards(tmp_path / "bare", rows, dataclasses.replace(meta))
    panel = load_panel(tmp_path / "bare", "train", meta=bare)
    assert panel.incomplete_days == 9 and not panel.valid[:9].any() and panel.valid[9].any()
    assert (panel.batch(np.arange(9)).x == 0).all()  # the padding in front, not late-training rows
    full = load_panel(src, "train")
    b, f = panel.batch(np.array([9, 60])), full.batch(np.array([9, 60]))
    assert torch.equal(b.x, f.x) and torch.equal(b.mask, f.mask)


def test_batches_change_between_epochs_when_groups_fit_one_batch():
    """S&P 500 Alpha360-like: D = 1,760 days, T = 60, B = 32, so a residue class mod T (about 29
    days) fits one batch. The grouping is drawn afresh each epoch, so the batches differ as sets."""
    sets = [{frozenset(b.tolist()) for b in epoch_batches(1760, batch_days=32, lookback=60, seed=0, epoch=e)}
            for e in range(4)]
    for a, b in zip(sets, sets[1:]):
        assert len(a & b) <= len(a) // 4, len(a & b)
    for s in sets:
        assert sorted(d for b in s for d in b) == list(range(1760))
        assert all((np.diff(sorted(b)) >= 60).all() for b in s)


def test_every_day_weighs_the_same_whatever_its_batch():
    """train_epoch divides a step's summed loss by the nominal batch size, so a day in a short batch
    counts as much as a day in a full one: the weight each day gets over an epoch is 1/B for all."""
    from fvae.train import Dist, Objective, train_epoch

    class Recorder:  # a Step that records what train_epoch asks of it
        objective = Objective(names=("loss",), terms=lambda net, b: b.y[None])
        net = torch.nn.Identity()
        optim = None

        def __init__(self) -> None:
            self.weight: dict[int, float] = {}

        def step(self, days, weight, *, global_days):
            for d, w in zip(days.tolist(), weight.tolist()):
                self.weight[d] = self.weight.get(d, 0.0) + w / global_days
            return True, torch.tensor([0.0, float(np.sum(weight))])

    batches = epoch_batches(2500, batch_days=32, lookback=60, seed=0, epoch=1)
    assert min(map(len, batches)) < max(map(len, batches))  # short batches exist
    rec = Recorder()
    train_epoch(rec, batches, d=Dist(), days_per_step=32)
    assert len(rec.weight) == 2500 and set(rec.weight.values()) == {1 / 32}


def test_batches_depend_on_epoch_and_seed_only():
    a = epoch_batches(300, batch_days=8, lookback=5, seed=1, epoch=2)
    b = epoch_batches(300, batch_days=8, lookback=5, seed=1, epoch=2)
    c = epoch_batches(300, batch_days=8, lookback=5, seed=1, epoch=3)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(a, c))


def test_day_fraction_is_explicit_subsampling():
    batches = epoch_batches(400, batch_days=16, lookback=10, seed=0, day_fraction=0.25)
    days = np.concatenate(batches)
    assert len(days) == 100 and len(set(days.tolist())) == 100


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_shards_disjoint_equal_steps(world):
    batches = epoch_batches(203, batch_days=5, lookback=7, seed=0)
    shards = [shard_batches(batches, rank=r, world_size=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal steps on every rank
    seen = []
    for s in shards:
        for days, w in s:
            seen += days[w > 0].tolist()
    assert sorted(seen) == list(range(203))  # disjoint and complete


def test_mask_padding_when_days_differ(tiny_market):
    panel = load_panel(tiny_market, "train")
    counts = panel.valid.sum(1).numpy()
    lo, hi = int(np.argmin(counts)), int(np.argmax(counts))
    b = panel.batch(np.array([lo, hi]))
    assert b.mask.shape[1] == counts[hi]
    assert b.mask[0].sum() == counts[lo] and b.mask[1].all()
    assert torch.equal(b.mask[0], torch.arange(b.mask.shape[1]) < counts[lo])


def test_loader_config_validation():
    with pytest.raises(ValueError, match="data.day_fraction"):
        LoaderConfig(day_fraction=0.0)


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(kw_only=True)
class _Inner:
    width: int = 3
    rate: float = 0.1
    name: str = "x"
    flag: bool = False


@dataclasses.dataclass(kw_only=True)
class _Root:
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  width: 5\n")
    cfg = fconfig.load(_Root, path=p, overrides=["inner.rate=2", "inner.flag=true"])
    assert cfg.inner.width == 5 and cfg.inner.rate == 2.0 and cfg.inner.flag is True
    assert fconfig.from_dict(_Root, fconfig.to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["inner.widht=4"], "unknown key 'widht'; did you mean 'width'"),
    (["iner.width=4"], "unknown key 'iner'; did you mean 'inner'"),
    (["inner.width=abc"], "inner.width: expected an integer, got 'abc'"),
    (["inner.flag=3"], "inner.flag: expected true or false"),
    (["inner.width"], "expected section.key=value"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(fconfig.ConfigError, match=message):
        fconfig.load(_Root, overrides=overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(fconfig.ConfigError, match="config file not found"):
        fconfig.load(_Root, path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(fconfig.ConfigError, match="bad.yaml: expected a mapping"):
        fconfig.load(_Root, path=bad)


def _panels_equal(a, b) -> bool:
    return (all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("feat", "label", "ret", "valid"))
            and a.dates.equals(b.dates) and (a.instruments == b.instruments).all() and a.history == b.history
            and a.extra.keys() == b.extra.keys() and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra))


def test_panel_cache_is_read_without_the_parquet(tmp_path):
    from fvae.data.loader import load_panel, read_panel

    folder = tmp_path / "m"
    write_synthetic(folder, SyntheticConfig(stocks=30, days=200, seed=3))
    meta = read_meta(folder)
    truth = read_panel(folder, "train", meta=meta, extra_columns=("mu_true",))
    first = load_panel(folder, "train", extra_columns=("mu_true",))
    assert first.source == "built" and _panels_equal(first, truth)
    (folder / "shards").rename(tmp_path / "elsewhere")  # a load that parsed the Parquet would fail now
    again = load_panel(folder, "train", extra_columns=("mu_true",))
    assert again.source == "cache" and _panels_equal(again, truth)
    with pytest.raises(DataError, match="missing"):
        load_panel(folder, "train", extra_columns=("mu_true",), cache=False)
    with pytest.raises(DataError, match="missing"):  # another column set is another cache entry
        load_panel(folder, "train")


def test_panel_cache_follows_a_new_export_into_the_folder(tmp_path):
    from fvae.data.loader import CACHE_DIR, load_panel

    folder = tmp_path / "m"
    write_synthetic(folder, SyntheticConfig(stocks=30, days=200, seed=3))
    old = load_panel(folder, "valid")
    write_synthetic(folder, SyntheticConfig(stocks=30, days=200, seed=4))  # new content, new fingerprint
    new = load_panel(folder, "valid")
    assert new.source == "built" and not torch.equal(new.label, old.label)
    assert len(list((folder / CACHE_DIR).glob("panel-*"))) == 1  # the stale entry is gone


def _load_source(folder: str, q) -> None:
    from fvae.data.loader import load_panel

    q.put(load_panel(folder, "train").source)


def test_packed_loaders_starting_together_build_the_cache_once(tmp_path):
    import multiprocessing as mp

    folder = tmp_path / "m"
    write_synthetic(folder, SyntheticConfig(stocks=30, days=200, seed=3))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_load_source, args=(str(folder), q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(q.get(timeout=5) for _ in procs) == ["built", "cache", "cache"]
