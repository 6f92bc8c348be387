"""Search spaces: one YAML file per space, turned into an Optuna define-by-run function.

A space file looks like this (``search_spaces/default.yaml``)::

    metric: valid_rank_icir          # the result key Tune optimises
    mode: max                        # optional, max (default) or min
    params:                          # searched, in this order
      model.hidden_size: {type: categorical, choices: [32, 64, 128]}
      model.attn_heads:  {type: categorical, choices: [1, 2, 4]}
      model.num_factors: {type: int, low: 4, high: 32, log: true}
      model.gat_layers:  {type: int, low: 0, high: 2}
      model.gat_heads:   {type: categorical, choices: [1, 2, 4],
                          when: {model.gat_layers: {gt: 0}}}
      train.lr:          {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    fixed:                           # constants applied to every trial
      train.epochs: 25

Every key is a dotted path into fvae's config tree and must be one of
:data:`KEYS`. Parameter types:

- ``int``: ``low``, ``high`` (integers, ``low < high``), optional ``log`` or ``step``;
- ``float``: ``low``, ``high`` (numbers, ``low < high``), optional ``log`` or ``step``;
- ``categorical``: ``choices``, a non-empty list of distinct scalars.

``log: true`` needs ``low > 0``; ``log`` and ``step`` exclude each other, and
``high - low`` must be a multiple of ``step``. Write small floats with a dot
(``1.0e-4``): YAML reads ``1e-4`` as a string.

``when`` makes a parameter conditional. It maps parameters defined *earlier in
the file* to comparisons, all of which must hold (``gt``, ``ge``, ``lt``,
``le``, ``eq``, ``ne``, ``in``)::

    when: {model.gat_layers: {gt: 0}, model.hidden_size: {in: [64, 128]}}

A parameter whose condition fails (or whose condition refers to an inactive
parameter) is not suggested at all, so it is absent from the trial's config and
the base config's default applies.

Validity is guaranteed at load time. The model needs ``hidden_size`` to be
divisible by ``attn_heads`` and by ``gat_heads``; the loader enumerates every
value each of them can take (searched or fixed) and rejects the file unless
every combination divides, so pick hidden sizes that are multiples of every
head count (e.g. hidden sizes 32/64/128 with heads 1/2/4). ``gat_heads`` is
exempt when ``model.gat_layers`` is fixed to 0. A file that sets
``model.hidden_size`` must set the head counts too, and one that sets a head
count other than 1 must set ``model.hidden_size``, so that nothing is checked
against an unseen default.

Use with Ray Tune (this module does not import Ray)::

    space = load_space("search_spaces/default.yaml")
    OptunaSearch(space=space.suggest, metric=space.metric, mode=space.mode)

Ray's ``OptunaSearch`` (2.60) calls ``space.suggest`` with a wrapper around an
``optuna.Trial``, records every ``suggest_*`` value under its name, merges the
returned dict on top, and unflattens on ``"/"`` only; the trial's config is
therefore flat with dotted keys, ``{"model.num_factors": 8, "train.epochs": 25}``.
Turn it into ``--set`` strings with :meth:`SearchSpace.to_overrides` or into a
nested dict with :meth:`SearchSpace.nested`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import optuna
import yaml

__all__ = [
    "KEYS",
    "SPACES_DIR",
    "Condition",
    "Param",
    "SearchSpace",
    "SpaceError",
    "load_space",
    "nested",
]

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
"""Where the shipped spaces live; ``load_space("smoke")`` looks here."""


class SpaceError(ValueError):
    """A search-space file is wrong; the one-line message names the file, the key and the fix."""


# --------------------------------------------------------------------------- keys


@dataclasses.dataclass(frozen=True)
class _Key:
    """The value type of one config key and the interval its values must lie in."""

    type: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True

    def describe(self) -> str:
        name = {int: "an integer", float: "a number", bool: "true or false"}[self.type]
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return name + (" " + " and ".join(parts) if parts else "")


KEYS: Mapping[str, _Key] = {
    "model.hidden_size": _Key(int, 1),
    "model.num_factors": _Key(int, 1),
    "model.num_portfolios": _Key(int, 1),
    "model.attn_heads": _Key(int, 1),
    "model.gat_layers": _Key(int, 0),
    "model.gat_heads": _Key(int, 1),
    "model.conditional_posterior": _Key(bool),
    "model.dropout": _Key(float, 0.0, 1.0, high_open=True),
    "model.gamma": _Key(float, 0.0),
    "train.lr": _Key(float, 0.0, low_open=True),
    "train.weight_decay": _Key(float, 0.0),
    "train.grad_clip": _Key(float, 0.0),  # 0 = no clipping
    "train.epochs": _Key(int, 1),
    "train.patience": _Key(int, 0),  # 0 = no early stopping
    "data.batch_days": _Key(int, 1),
    "data.day_fraction": _Key(float, 0.0, 1.0, low_open=True),  # share of training days per epoch
}
"""The config keys a space may search or fix, with their types and ranges."""

# hidden_size must be divisible by each of these.
_HIDDEN = "model.hidden_size"
_HEADS = ("model.attn_heads", "model.gat_heads")

_TOP_KEYS = ("metric", "mode", "params", "fixed")
_TYPES = ("int", "float", "categorical")
_PARAM_KEYS = {
    "int": ("type", "low", "high", "log", "step", "when"),
    "float": ("type", "low", "high", "log", "step", "when"),
    "categorical": ("type", "choices", "when"),
}
_ALL_PARAM_KEYS = ("type", "low", "high", "log", "step", "choices", "when")
_OPS: Mapping[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
    "eq": operator.eq,
    "ne": operator.ne,
    "in": lambda a, b: a in b,
}
_MAX_ENUM = 100_000  # most values enumerated for the divisibility check


# --------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class Condition:
    """``value_of(key) <op> value``; ``op`` is one of gt, ge, lt, le, eq, ne, in."""

    key: str
    op: str
    value: Any

    def holds(self, values: Mapping[str, Any]) -> bool:
        """True when ``key`` is active in ``values`` and the comparison holds."""
        if self.key not in values:
            return False
        return bool(_OPS[self.op](values[self.key], self.value))


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched parameter, already validated."""

    key: str
    type: Literal["int", "float", "categorical"]
    low: int | float | None = None  # int for type int, float for type float
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[Condition, ...] = ()

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether every condition holds for the values suggested so far."""
        return all(c.holds(values) for c in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        if self.type == "float":
            return trial.suggest_float(
                self.key, float(self.low), float(self.high), step=self.step, log=self.log
            )
        return trial.suggest_categorical(self.key, list(self.choices))

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take."""
        if self.type == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not isinstance(value, int):
            return False
        if not (self.low <= value <= self.high):
            return False
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-8
        return True


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A parsed, validated search space. Pickles (Ray ships ``suggest`` to its searcher)."""

    name: str
    path: Path
    metric: str
    mode: Literal["max", "min"]
    params: tuple[Param, ...]
    fixed: dict[str, Any]  # treat as read-only

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key this space sets: searched ones in file order, then fixed ones."""
        return tuple(p.key for p in self.params) + tuple(self.fixed)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The define-by-run function: suggest every active parameter, return the full config.

        Parameters are suggested in file order under their dotted key; a
        parameter whose ``when`` fails is skipped. Returns the suggested values
        plus the ``fixed`` constants as one flat dict, e.g.
        ``{"model.num_factors": 8, ..., "train.epochs": 25}``. Ray's
        ``OptunaSearch`` merges this dict over the values it captured from the
        ``suggest_*`` calls (they agree), so pass ``space.suggest`` as its
        ``space`` (Ray passes a duck-typed wrapper, not an ``optuna.Trial``; only
        ``suggest_*`` is used). With plain Optuna, the return value is the config.
        """
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.key] = p.suggest(trial)
        values.update(self.fixed)
        return values

    def to_overrides(self, params: Mapping[str, Any]) -> list[str]:
        """``["model.num_factors=8", ...]``: the train CLI's ``--set`` form.

        ``params`` is a flat dotted dict such as a Tune trial's config; the
        space's fixed constants are added where ``params`` lacks them. Values
        are written so that ``yaml.safe_load`` reads them back unchanged.
        """
        out = []
        for key, value in self._complete(params).items():
            text = _yaml_scalar(value)
            if yaml.safe_load(text) != value:  # e.g. NaN: --set could not carry it
                raise ValueError(f"{key}: value {value!r} does not survive a YAML round trip")
            out.append(f"{key}={text}")
        return out

    def nested(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``{"model": {"num_factors": 8}, ...}`` from flat ``params`` plus the fixed constants."""
        return nested(self._complete(params))

    def _complete(self, params: Mapping[str, Any]) -> dict[str, Any]:
        for key in params:
            _check_dotted(key)
        return {**dict(params), **{k: v for k, v in self.fixed.items() if k not in params}}


def nested(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model.num_factors": 8}`` -> ``{"model": {"num_factors": 8}}``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        parts = _check_dotted(key)
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"'{key}': '{'.'.join(parts[: i + 1])}' is both a value and a section")
        if isinstance(node.get(parts[-1]), dict):
            raise ValueError(f"'{key}' is both a value and a section")
        node[parts[-1]] = value
    return out


def _check_dotted(key: Any) -> list[str]:
    if not isinstance(key, str) or "=" in key:
        raise ValueError(f"{key!r} is not a dotted config key like 'model.num_factors'")
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"{key!r} is not a dotted config key like 'model.num_factors'")
    return parts


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.strip()


# --------------------------------------------------------------------------- loading


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; a bare name like ``"smoke"`` means ``SPACES_DIR/smoke.yaml``.

    Raises :class:`SpaceError` naming the file, the key and what was expected.
    """
    p = Path(path)
    if not p.suffix and len(p.parts) == 1 and not p.exists():
        p = SPACES_DIR / f"{p.name}.yaml"
    if not p.is_file():
        raise SpaceError(f"{p}: search space file not found")
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader)  # noqa: S506 - safe loader subclass
    except _DuplicateKey as e:
        raise SpaceError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise SpaceError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    return _parse(data, p)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"{key}: listed twice (second time on line {line}); keep one")


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _closest(word: Any, valid: Sequence[str]) -> str:
    near = difflib.get_close_matches(str(word), list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _describe(v: Any) -> str:
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return f"{v!r}"
        return f"{v!r} (a string: YAML needs a dot in floats, e.g. 1.0e-4)"
    return f"{v!r}"


class _Where:
    """Builds one-line errors prefixed with the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, key: str, msg: str) -> SpaceError:
        return SpaceError(f"{self.path}: {key}: {msg}")


def _parse(data: Any, path: Path) -> SearchSpace:
    err = _Where(path)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise SpaceError(
            f"{path}: expected a mapping with keys {', '.join(_TOP_KEYS)} at the top level, got {got}"
        )
    for key in data:
        if key not in _TOP_KEYS:
            raise err(f"top-level key '{key}'", f"unknown, expected one of {', '.join(_TOP_KEYS)}{_closest(key, _TOP_KEYS)}")

    metric = data.get("metric")
    if not isinstance(metric, str) or not metric:
        raise err("metric", f"expected the name of the result to optimise (e.g. valid_rank_icir), got {metric!r}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise err("mode", f"expected max or min, got {mode!r}")

    raw_params = data.get("params")
    if raw_params is None:
        raw_params = {}
    if not isinstance(raw_params, dict):
        raise err("params", f"expected a mapping of config keys to parameter specs, got {type(raw_params).__name__}")
    raw_fixed = data.get("fixed")
    if raw_fixed is None:
        raw_fixed = {}
    if not isinstance(raw_fixed, dict):
        raise err("fixed", f"expected a mapping of config keys to constants, got {type(raw_fixed).__name__}")

    params: list[Param] = []
    names = list(raw_params)
    for i, (key, spec) in enumerate(raw_params.items()):
        _check_key(key, err, "params")
        params.append(_parse_param(key, spec, params, names[i + 1 :], err))

    fixed: dict[str, Any] = {}
    for key, value in raw_fixed.items():
        _check_key(key, err, "fixed")
        if key in raw_params:
            raise err(key, "is both searched (params) and fixed; keep one")
        _check_value(key, value, err, what="fixed value")
        fixed[key] = value

    _check_divisibility(params, fixed, err)
    return SearchSpace(
        name=path.stem, path=path, metric=metric, mode=mode, params=tuple(params), fixed=fixed
    )


def _check_key(key: Any, err: _Where, section: str) -> None:
    if key not in KEYS:
        hint = _closest(key, list(KEYS)) or f" (allowed: {', '.join(KEYS)})"
        raise err(f"{section} key '{key}'", f"not a searchable config key{hint}")


def _check_value(key: str, value: Any, err: _Where, *, what: str) -> None:
    """Check one concrete value (fixed value, bound or choice) against the key's type and range."""
    spec = KEYS[key]
    if spec.type is bool:
        ok = isinstance(value, bool)
    elif spec.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = _is_number(value)
    if ok and spec.type is not bool:
        ok = spec.contains(value) and math.isfinite(value)
    if not ok:
        raise err(key, f"{what} {_describe(value)}: expected {spec.describe()}")


def _parse_param(
    key: str, spec: Any, earlier: list[Param], later: Sequence[str], err: _Where
) -> Param:
    if not isinstance(spec, dict):
        raise err(key, f"expected a mapping like {{type: int, low: 1, high: 8}}, got {_describe(spec)}")
    kind = spec.get("type")
    if kind is None:
        raise err(key, f"missing 'type' (one of {', '.join(_TYPES)})")
    if kind not in _TYPES:
        raise err(key, f"type {kind!r} is unknown, expected one of {', '.join(_TYPES)}{_closest(kind, _TYPES)}")
    allowed = _PARAM_KEYS[kind]
    for k in spec:
        if k not in allowed:
            if k in _ALL_PARAM_KEYS:
                raise err(key, f"'{k}' does not apply to type {kind} (allowed: {', '.join(allowed)})")
            raise err(key, f"unknown key '{k}' (allowed: {', '.join(allowed)}){_closest(k, allowed)}")

    vtype = KEYS[key].type
    when = _parse_when(key, spec.get("when"), earlier, later, err)

    if kind == "categorical":
        choices = spec.get("choices")
        if choices is None:
            raise err(key, "missing 'choices' (a non-empty list)")
        if not isinstance(choices, list) or not choices:
            raise err(key, f"'choices' must be a non-empty list, got {_describe(choices)}")
        seen: list[Any] = []
        for c in choices:
            _check_value(key, c, err, what="choice")
            if any(type(c) is type(s) and c == s for s in seen):
                raise err(key, f"choice {c!r} is listed twice")
            seen.append(c)
        return Param(key=key, type="categorical", choices=tuple(choices), when=when)

    if vtype is bool:
        raise err(key, f"type {kind} does not fit a true/false setting; use type categorical with choices [false, true]")
    if kind == "float" and vtype is int:
        raise err(key, "type float does not fit an integer setting; use type int or categorical")
    for bound in ("low", "high"):
        if bound not in spec:
            raise err(key, f"missing '{bound}' (type {kind} needs low and high)")
        v = spec[bound]
        if kind == "int" and not (isinstance(v, int) and not isinstance(v, bool)):
            raise err(key, f"'{bound}' {_describe(v)}: expected an integer")
        if kind == "float" and not _is_number(v):
            raise err(key, f"'{bound}' {_describe(v)}: expected a number")
        _check_value(key, v, err, what=f"'{bound}'")
    low, high = spec["low"], spec["high"]
    if low >= high:
        raise err(key, f"low ({low}) must be < high ({high}); use 'fixed' for a constant")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise err(key, f"'log' must be true or false, got {_describe(log)}")
    if log and low <= 0:
        raise err(key, f"log: true needs low > 0, got low {low}")
    step = spec.get("step")
    if step is not None:
        if log:
            raise err(key, "'step' and 'log: true' cannot be combined")
        if kind == "int" and not (isinstance(step, int) and not isinstance(step, bool)):
            raise err(key, f"'step' {_describe(step)}: expected an integer")
        if not _is_number(step) or step <= 0:
            raise err(key, f"'step' {_describe(step)}: expected a number > 0")
        k = (high - low) / step
        if abs(k - round(k)) > 1e-8:
            raise err(key, f"high - low ({high} - {low}) must be a multiple of step ({step})")
    return Param(
        key=key,
        type=kind,
        low=float(low) if kind == "float" else low,
        high=float(high) if kind == "float" else high,
        log=log,
        step=(float(step) if kind == "float" else step) if step is not None else None,
        when=when,
    )


def _parse_when(
    key: str, when: Any, earlier: list[Param], later: Sequence[str], err: _Where
) -> tuple[Condition, ...]:
    if when is None:
        return ()
    example = "{model.gat_layers: {gt: 0}}"
    if not isinstance(when, dict) or not when:
        raise err(key, f"'when' must be a mapping like {example}, got {_describe(when)}")
    by_key = {p.key: p for p in earlier}
    out = []
    for ref, cmp in when.items():
        if ref not in by_key:
            if ref == key:
                raise err(key, "'when' refers to the parameter itself")
            known = list(by_key)
            hint = _closest(ref, known) if known else ""
            if ref in later:
                where = "defined later in the file"
            elif ref in KEYS:
                where = "not a searched parameter"
            else:
                where = "unknown"
            raise err(
                key,
                f"'when' refers to '{ref}', which is {where}; it may only use parameters defined "
                f"before it ({', '.join(known) or 'none'}){hint}",
            )
        if not isinstance(cmp, dict) or not cmp:
            raise err(key, f"'when' condition on '{ref}' must be a mapping like {{gt: 0}}, got {_describe(cmp)}")
        target = by_key[ref]
        numeric = target.type in ("int", "float") or all(_is_number(c) for c in target.choices)
        for op, value in cmp.items():
            if op not in _OPS:
                raise err(
                    key,
                    f"'when' on '{ref}': unknown comparison '{op}', expected one of "
                    f"{', '.join(_OPS)}{_closest(op, list(_OPS))}",
                )
            if op in ("gt", "ge", "lt", "le"):
                if not _is_number(value):
                    raise err(key, f"'when' on '{ref}': '{op}' needs a number, got {_describe(value)}")
                if not numeric:
                    raise err(key, f"'when' on '{ref}': '{op}' needs a numeric parameter; use eq, ne or in")
            elif op == "in":
                if not isinstance(value, list) or not value or not all(map(_is_scalar, value)):
                    raise err(key, f"'when' on '{ref}': 'in' needs a non-empty list of values, got {_describe(value)}")
                value = tuple(value)
            elif not _is_scalar(value):
                raise err(key, f"'when' on '{ref}': '{op}' needs a single value, got {_describe(value)}")
            out.append(Condition(key=ref, op=op, value=value))
    return tuple(out)


def _values(param: Param | None, fixed: Any, key: str, err: _Where) -> list[int] | None:
    """Every integer value ``key`` can take, or None when the space leaves it unset."""
    if param is None:
        return None if fixed is None else [fixed]
    if param.type == "categorical":
        return list(param.choices)
    step = int(param.step or 1)
    n = (int(param.high) - int(param.low)) // step + 1
    if n > _MAX_ENUM:
        raise err(key, f"range has {n} values, too many to check divisibility; narrow it or use a step")
    return list(range(int(param.low), int(param.high) + 1, step))


def _check_divisibility(params: list[Param], fixed: Mapping[str, Any], err: _Where) -> None:
    by_key = {p.key: p for p in params}
    hidden = _values(by_key.get(_HIDDEN), fixed.get(_HIDDEN), _HIDDEN, err)
    for heads_key in _HEADS:
        if heads_key == "model.gat_heads" and fixed.get("model.gat_layers") == 0:
            continue  # no GAT in any trial: the model ignores gat_heads
        heads = _values(by_key.get(heads_key), fixed.get(heads_key), heads_key, err)
        if heads is None and hidden is not None:
            raise err(
                heads_key,
                f"must be searched or fixed because {_HIDDEN} is (so that divisibility is "
                f"checked here, not against the base config's default)",
            )
        if heads is None or all(h == 1 for h in heads):
            continue
        if hidden is None:
            raise err(
                heads_key,
                f"can be {max(heads)}, so {_HIDDEN} must be searched or fixed too "
                f"(it must be divisible by {heads_key})",
            )
        for h in hidden:
            for a in heads:
                if h % a:
                    raise err(
                        heads_key,
                        f"{heads_key}={a} does not divide {_HIDDEN}={h}; every {_HIDDEN} value "
                        f"must be a multiple of every {heads_key} value",
                    )
