"""Progress bars: drawn on a terminal, silent anywhere else (pytest, CI logs, Ray workers)."""

from __future__ import annotations

import io
import sys

from fvae import progress
from fvae.train import DEBUG_PRESET, load_config, run_standalone


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_silent_when_stderr_is_not_a_terminal(monkeypatch):
    fake = io.StringIO()
    monkeypatch.setattr(sys, "stderr", fake)
    assert not progress.on_terminal() and progress.step_bar(lambda: "x") is None
    assert sum(progress.bar(range(50), desc="[test] quiet")) == sum(range(50))
    assert fake.getvalue() == ""


def test_a_bar_draws_on_a_terminal_and_not_when_disabled(monkeypatch):
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    list(progress.bar(range(7), desc="[test] shown", unit="day", leave=True))
    assert "[test] shown" in tty.getvalue() and "7/7" in tty.getvalue()
    tty.seek(0)
    tty.truncate()
    list(progress.bar(range(7), desc="[test] rank 1", enabled=False))
    assert tty.getvalue() == "" and progress.step_bar(lambda: "x", enabled=False) is None


def test_training_shows_steps_loss_and_speed_on_a_terminal(tiny_market, tmp_path, monkeypatch, capsys):
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    run_standalone(load_config(None, DEBUG_PRESET), data=tiny_market, out=tmp_path / "run")
    drawn = tty.getvalue()
    for epoch in (1, 2):
        assert f"[fvae] epoch {epoch}/2:" in drawn
    assert "loss=" in drawn and ("step/s" in drawn or "s/step" in drawn)
    assert capsys.readouterr().out.count("\n") == 5  # stdout: the same lines as without a terminal


def test_training_output_under_pytest_is_its_lines_only(tiny_market, tmp_path, capfd):
    """Not a terminal (pytest captures stderr): one line to announce, one per epoch, one for the risk
    model's calibration, one at the end; nothing on stderr from the bars."""
    run_standalone(load_config(None, DEBUG_PRESET), data=tiny_market, out=tmp_path / "run")
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert len(lines) == 5, lines
    assert lines[0].startswith("[fvae] train ") and lines[1].startswith("[fvae] epoch 1/2 loss")
    assert lines[2].startswith("[fvae] epoch 2/2 loss") and lines[3].startswith("[fvae] risk calibration on valid")
    assert lines[4].startswith("[fvae] valid RankIC")
    assert "step" not in err and "%|" not in err


def test_export_bars_are_silent_off_a_terminal(tiny_market, tmp_path, capfd):
    """write_shards (every export's last step) draws nothing when stderr is not a terminal."""
    import pandas as pd

    from fvae.data.shards import read_meta, read_rows, write_shards

    meta = read_meta(tiny_market)
    df = read_rows(tiny_market, meta, pd.Timestamp("1900-01-01"), pd.Timestamp("2100-01-01"))
    write_shards(tmp_path / "copy", df, meta)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
