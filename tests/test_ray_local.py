"""fvae.ray_local: a local cluster's start-up that fails is retried, then said in one line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fvae import ray_local

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_a_start_that_fails_is_retried_then_said_in_one_line(monkeypatch):
    """A real `ray start --head` that cannot start (its GCS port is taken): each try is cleaned up
    (no temp dir, no watchdog left), and the error is one line that says what to do."""
    spawn, watchdogs = ray_local._spawn_watchdog, []

    def watched(owner: int, temp: Path):  # the real watchdog, remembered
        watchdogs.append(spawn(owner, temp))
        return watchdogs[-1]

    monkeypatch.setattr(ray_local, "_spawn_watchdog", watched)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        monkeypatch.setattr(ray_local, "_free_port", lambda: taken.getsockname()[1])
        with pytest.raises(ray_local.RayStartError) as e:
            ray_local.start(num_cpus=1, tries=2)
    msg = str(e.value)
    assert "\n" not in msg and "try 1" in msg and "try 2" in msg and "--address HOST:PORT" in msg, msg
    assert len(watchdogs) == 2 and all(w.poll() is not None for w in watchdogs)
    assert not [w.args[-1] for w in watchdogs if Path(w.args[-1]).exists()]  # each try's temp dir is gone
