"""The ``fvae`` console script: one dispatcher over the ``python -m`` entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fvae import cli

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_installs_the_console_script():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fvae"] == "fvae.cli:main"


def test_every_command_is_a_python_m_entry_point():
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
    assert {"data", "train", "tune", "report", "backtest", "baselines", "factors", "ensemble", "bench"} == set(cli.COMMANDS)


def test_dispatch_runs_the_command_with_the_rest_of_the_line(tmp_path, capsys):
    assert cli.main(["data", "synthetic", "--out", str(tmp_path / "syn"), "--stocks", "20", "--days", "60"]) == 0
    meta = json.loads((tmp_path / "syn" / "meta.json").read_text())
    assert meta["instruments"] == 20 and "wrote" in capsys.readouterr().out


def test_help_unknown_and_bad_options(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fvae COMMAND") and all(f"  {name}" in out for name in cli.COMMANDS)
    assert cli.main([]) == 2 and "usage: fvae" in capsys.readouterr().err
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown command 'trian'; choose one of " + ", ".join(cli.COMMANDS)]
    # a command's own errors are its own: `fvae train` without --data is argparse's exit 2
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out", "x"])
    assert e.value.code == 2 and "--data" in capsys.readouterr().err
