"""Progress bars (tqdm) on a terminal, and nothing anywhere else.

What a bar looks like, on stderr, redrawn in place::

    [fvae] epoch 3/30:  45%|████▌     | 33/73 [00:12<00:15, 2.61step/s, loss=1.5432]
    [fvae.data] Alpha360 VWAP:  67%|██████▋   | 4/6 [00:41<00:20, 10.3s/series]

A bar draws only when stderr is a terminal (tqdm's ``disable=None``). CI logs, files and Ray's
workers (whose output Ray pipes to the driver's log, not a terminal) get no bar: their output is
the usual lines, one per epoch, and a bar is never printed twice under Ray. ``enabled=False``
(a DDP rank other than 0, ``progress=False``) turns a bar off even on a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether a bar would draw: stderr is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        enabled: bool = True, leave: bool = False) -> Any:
    """A tqdm bar on stderr that draws only on a terminal (and when ``enabled``)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=None if enabled else True, dynamic_ncols=True)


class StepBar:
    """``train_epoch``'s ``on_step`` hook: one bar per epoch over its steps, with the running loss and
    the speed. ``desc()`` names the epoch when its first step is done."""

    def __init__(self, desc: Callable[[], str]) -> None:
        self.desc, self._bar = desc, None

    def __call__(self, i: int, n: int, loss: float) -> None:
        if i == 1:
            self._bar = bar(desc=self.desc(), total=n, unit="step")
        assert self._bar is not None
        self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._bar.update(1)
        if i == n:
            self._bar.close()
            self._bar = None


def step_bar(desc: Callable[[], str], *, enabled: bool = True) -> StepBar | None:
    """A StepBar when a bar would draw, else None (so that the loop does not compute the running loss)."""
    return StepBar(desc) if enabled and on_terminal() else None
