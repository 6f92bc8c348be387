"""Search spaces: one YAML file per space, turned into an Optuna define-by-run function.

A space file (``search_spaces/default.yaml``)::

    metric: valid_rank_icir          # the per-epoch result Tune optimises, one of METRICS
    mode: max                        # optional, max (default) or min
    params:                          # searched, in this order
      model.hidden_size: {type: categorical, choices: [32, 64, 128]}
      model.num_factors: {type: int, low: 4, high: 32, log: true}
      model.gat_layers:  {type: int, low: 0, high: 2}
      model.gat_heads:   {type: categorical, choices: [1, 2, 4], when: {model.gat_layers: {gt: 0}}}
      train.lr:          {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    fixed:                           # constants applied to every trial
      train.epochs: 25

Keys are dotted paths to fields of ``fvae.train.Config``; any field is searchable. ``int``,
``float`` and ``categorical`` parameters become Optuna's ``IntDistribution(low, high, log=,
step=)``, ``FloatDistribution(...)`` and ``CategoricalDistribution(choices)``, whose constructors
judge them (their warnings count as errors); ``low == high`` is refused (use ``fixed``). Write
floats with a dot (``1.0e-4``: YAML reads ``1e-4`` as a string). ``when`` maps parameters defined
*earlier in the file* to comparisons (``gt``, ``ge``, ``lt``, ``le``, ``eq``, ``ne``, ``in``) that
must all hold, e.g. ``{model.gat_layers: {gt: 0}, model.hidden_size: {in: [64, 128]}}``; if one
fails or refers to an inactive parameter, the parameter is not suggested and the base config's
value applies.

Validation: the config dataclasses (``ModelConfig``, ``TrainConfig``, ``LoaderConfig``) are the
one place that says what a valid config is (types, ranges, heads dividing ``hidden_size``, ...).
:func:`load_space` builds a ``Config`` from the base config (defaults, or ``base``), the fixed
values and one value per *active* parameter: each categorical choice and each numeric ``low``
and ``high``, in every combination when there are at most :data:`MAX_COMBINATIONS`, else the
base combination (first choice or ``low`` everywhere) and each value of each parameter in turn
against it. Values strictly inside a range are not built: search divisors as categoricals.

With Ray Tune (this module does not import Ray): ``OptunaSearch(space=space.suggest,
metric=space.metric, mode=space.mode)``. Ray calls ``suggest`` with a wrapper that only has the
trial's ``suggest_*`` methods and unflattens on ``"/"`` only, so a trial's config is flat with
dotted keys (``{"model.num_factors": 8, "train.epochs": 25}``): :meth:`SearchSpace.to_overrides`
turns it into ``--set`` strings, :meth:`SearchSpace.nested` into a nested dict.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import operator
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import optuna
import yaml
from optuna import distributions as dists

__all__ = ["MAX_COMBINATIONS", "METRICS", "SPACES_DIR", "Condition", "Param", "SearchSpace",
           "SpaceError", "load_space", "nested"]

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
"""Where the shipped spaces live; ``load_space("smoke")`` looks here."""

METRICS = ("valid_rank_icir", "valid_rank_ic", "valid_icir", "valid_ic", "loss", "nll", "kl",
           "valid_rank_ic_post", "valid_active_factors", "valid_common_share")
"""What ``metric:`` may name: results ``fvae.train.fit`` reports every epoch."""

MAX_COMBINATIONS = 512
"""Most parameter combinations :func:`load_space` builds; beyond, one parameter at a time."""

_TOP_KEYS = ("metric", "mode", "params", "fixed")
_PARAM_KEYS = {"int": ("type", "low", "high", "log", "step", "when"),
               "float": ("type", "low", "high", "log", "step", "when"),
               "categorical": ("type", "choices", "when")}
_OPS: Mapping[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
    "eq": operator.eq, "ne": operator.ne, "in": lambda a, b: a in b}


class SpaceError(ValueError):
    """A search-space file is wrong; the one-line message names the file, the key and the fix."""


class Condition(NamedTuple):
    """``values[key] <op> value``, false while ``key`` is inactive; ``op`` is one of :data:`_OPS`."""

    key: str
    op: str
    value: Any


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched parameter: its Optuna distribution and its ``when`` conditions."""

    key: str
    dist: dists.BaseDistribution
    when: tuple[Condition, ...] = ()

    @property
    def choices(self) -> tuple[Any, ...]:
        return getattr(self.dist, "choices", ())

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether every condition holds for the values suggested so far."""
        return all(c.key in values and _OPS[c.op](values[c.key], c.value) for c in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        d = self.dist
        if isinstance(d, dists.CategoricalDistribution):
            return trial.suggest_categorical(self.key, list(d.choices))
        suggest = trial.suggest_int if isinstance(d, dists.IntDistribution) else trial.suggest_float
        return suggest(self.key, d.low, d.high, step=d.step, log=d.log)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take."""
        d = self.dist
        if isinstance(d, dists.CategoricalDistribution):
            return any(type(value) is type(c) and value == c for c in d.choices)
        if not _is_number(value) or (isinstance(d, dists.IntDistribution) and not isinstance(value, int)):
            return False
        k = (value - d.low) / d.step if d.step else 0.0
        return d.low <= value <= d.high and abs(k - round(k)) < 1e-8


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
        """The define-by-run function: ``trial.suggest_*`` for every active parameter in file
        order, under its dotted key; returns those values and the fixed ones as one flat dict."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.key] = p.suggest(trial)
        return {**values, **self.fixed}

    def to_overrides(self, params: Mapping[str, Any]) -> list[str]:
        """``["model.num_factors=8", ...]``, the train CLI's ``--set`` form, of flat dotted
        ``params`` (a Tune trial's config) plus the fixed values it lacks; each value reads back
        unchanged with ``yaml.safe_load``."""
        out = []
        for key, value in self._complete(params).items():
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
            text = text.removesuffix("\n...\n").strip()
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
    parts = key.split(".") if isinstance(key, str) and "=" not in key else [""]
    if not all(parts):
        raise ValueError(f"{key!r} is not a dotted config key like 'model.num_factors'")
    return parts


# --------------------------------------------------------------------------- loading


def load_space(path: str | Path, *, base: str | Path | None = None) -> SearchSpace:
    """Read and validate a space file; a bare name like ``"smoke"`` means ``SPACES_DIR/smoke.yaml``.

    ``base`` is the training config YAML the trials start from (``--config``): the space is
    checked against it instead of the defaults. Raises :class:`SpaceError`.
    """
    p = Path(path)
    if not p.suffix and len(p.parts) == 1 and not p.exists():
        p = SPACES_DIR / f"{p.name}.yaml"
    if not p.is_file():
        raise SpaceError(f"{p}: search space file not found")
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        why = str(e) if isinstance(e, _DuplicateKey) else f"not valid YAML ({' '.join(str(e).split())})"
        raise SpaceError(f"{p}: {why}") from None
    space = _parse(data, p, _where(p))
    _validate(space, base, _where(p))
    return space


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""


class _DuplicateKey(yaml.YAMLError):
    """A key listed twice in one mapping."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKey(f"{key}: listed twice (second time on line {key_node.start_mark.line + 1}); keep one")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)

_Err = Callable[[str, str], SpaceError]


def _where(path: Path) -> _Err:
    """``err(key, msg)``: a one-line SpaceError ``{path}: {key}: {msg}``."""
    return lambda key, msg: SpaceError(f"{path}: {key}: {' '.join(str(msg).split())}")


def _closest(word: Any, valid: Sequence[str]) -> str:
    near = difflib.get_close_matches(str(word), list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _describe(v: Any) -> str:
    try:
        numeric_string = isinstance(v, str) and math.isfinite(float(v))
    except ValueError:
        numeric_string = False
    return f"{v!r} (a string: YAML needs a dot in floats, e.g. 1.0e-4)" if numeric_string else repr(v)


def _config_keys() -> list[str]:
    """Every field of ``fvae.train.Config`` as a dotted key, read off the dataclasses."""
    from fvae.train import Config

    def walk(cls: type, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        return [k for f in dataclasses.fields(cls) if f.init
                for k in (walk(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name])
                          else [prefix + f.name])]

    return walk(Config, "")


def _parse(data: Any, path: Path, err: _Err) -> SearchSpace:
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise SpaceError(f"{path}: expected a mapping with keys {', '.join(_TOP_KEYS)} at the top level, got {got}")
    for key in data:
        if key not in _TOP_KEYS:
            raise err(f"top-level key '{key}'",
                      f"unknown, expected one of {', '.join(_TOP_KEYS)}{_closest(key, _TOP_KEYS)}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise err("mode", f"expected max or min, got {mode!r}")
    sections: dict[str, dict] = {}
    for section, what in (("params", "parameter specs"), ("fixed", "constants")):
        sections[section] = {} if data.get(section) is None else data[section]
        if not isinstance(sections[section], dict):
            raise err(section, f"expected a mapping of config keys to {what}, got {type(data[section]).__name__}")
    keys = _config_keys()
    for section, names in sections.items():
        for key in names:
            if key not in keys:
                raise err(f"{section} key '{key}'", f"not a config key{_closest(key, keys)}")
    raw, fixed = sections["params"], sections["fixed"]
    params: list[Param] = []
    for i, (key, spec) in enumerate(raw.items()):
        params.append(_parse_param(key, spec, params, list(raw)[i + 1:], keys, err))
    for key in fixed:
        if key in raw:
            raise err(key, "is both searched (params) and fixed; keep one")
    metric = data.get("metric")
    if metric not in METRICS:
        raise err("metric", f"expected one of {', '.join(METRICS)} (what fvae.train reports every epoch), "
                            f"got {metric!r}{_closest(metric, METRICS)}")
    return SearchSpace(name=path.stem, path=path, metric=metric, mode=mode, params=tuple(params), fixed=fixed)


def _parse_param(key: str, spec: Any, earlier: list[Param], later: list[str], keys: list[str], err: _Err) -> Param:
    if not isinstance(spec, dict):
        raise err(key, f"expected a mapping like {{type: int, low: 1, high: 8}}, got {_describe(spec)}")
    kind = spec.get("type")
    if kind not in _PARAM_KEYS:
        why = "missing 'type'" if kind is None else f"type {kind!r} is unknown"
        raise err(key, f"{why}, expected one of {', '.join(_PARAM_KEYS)}{_closest(kind, _PARAM_KEYS)}")
    allowed = _PARAM_KEYS[kind]
    for k in spec:
        if k not in allowed:
            if any(k in ks for ks in _PARAM_KEYS.values()):
                raise err(key, f"'{k}' does not apply to type {kind} (allowed: {', '.join(allowed)})")
            raise err(key, f"unknown key '{k}' (allowed: {', '.join(allowed)}){_closest(k, allowed)}")
    when = _parse_when(key, spec.get("when"), earlier, later, keys, err)
    if kind == "categorical":
        if not isinstance(spec.get("choices"), list):
            what = "missing 'choices'" if "choices" not in spec else f"got {_describe(spec['choices'])}"
            raise err(key, f"'choices' must be a non-empty list; {what}")
        return Param(key, _distribution(key, err, dists.CategoricalDistribution, spec["choices"]), when)
    for k in ("low", "high", "step"):
        if k not in spec and k != "step":
            raise err(key, f"missing '{k}' (type {kind} needs low and high)")
        v = spec.get(k, 1)
        if not _is_number(v) or not math.isfinite(v) or (kind == "int" and not isinstance(v, int)):
            raise err(key, f"'{k}' {_describe(v)}: expected {'an integer' if kind == 'int' else 'a finite number'}")
    if not isinstance(spec.get("log", False), bool):
        raise err(key, f"'log' must be true or false, got {_describe(spec['log'])}")
    cls = dists.IntDistribution if kind == "int" else dists.FloatDistribution
    options = {k: spec[k] for k in ("log", "step") if k in spec}
    dist = _distribution(key, err, cls, spec["low"], spec["high"], **options)
    if dist.low == dist.high:
        raise err(key, f"low ({spec['low']}) must be < high ({spec['high']}); use 'fixed' for a constant")
    return Param(key, dist, when)


def _distribution(key: str, err: _Err, cls: type, *args: Any, **kwargs: Any) -> dists.BaseDistribution:
    """``cls(*args, **kwargs)``; its ValueError, or any warning, as a SpaceError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return cls(*args, **kwargs)
        except (ValueError, Warning) as e:
            call = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            why = str(e).replace("It will be replaced with", "Optuna would use")
            raise err(key, f"optuna.distributions.{cls.__name__}({call}) refuses it: {why}") from None


def _parse_when(key: str, when: Any, earlier: list[Param], later: list[str], keys: list[str],
                err: _Err) -> tuple[Condition, ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise err(key, f"'when' must be a mapping like {{model.gat_layers: {{gt: 0}}}}, got {_describe(when)}")
    by_key = {p.key: p for p in earlier}
    out = []
    for ref, cmp in when.items():
        if ref == key:
            raise err(key, "'when' refers to the parameter itself")
        if ref not in by_key:
            where = ("defined later in the file" if ref in later else
                     "not a searched parameter" if ref in keys else "unknown")
            raise err(key, f"'when' refers to '{ref}', which is {where}; it may only use parameters defined "
                           f"before it ({', '.join(by_key) or 'none'}){_closest(ref, list(by_key))}")
        if not isinstance(cmp, dict) or not cmp:
            raise err(key, f"'when' condition on '{ref}' must be a mapping like {{gt: 0}}, got {_describe(cmp)}")
        numeric = all(_is_number(c) for c in by_key[ref].choices)  # choices are () for int and float
        for op, value in cmp.items():
            on = f"'when' on '{ref}'"
            if op not in _OPS:
                raise err(key, f"{on}: unknown comparison '{op}', expected one of {', '.join(_OPS)}"
                               f"{_closest(op, list(_OPS))}")
            if op in ("gt", "ge", "lt", "le") and not (_is_number(value) and numeric):
                why = (f"needs a number, got {_describe(value)}" if numeric else
                       "needs a numeric parameter; use eq, ne or in")
                raise err(key, f"{on}: '{op}' {why}")
            if op == "in" and not (isinstance(value, list) and value and all(map(_is_scalar, value))):
                raise err(key, f"{on}: 'in' needs a non-empty list of values, got {_describe(value)}")
            if op not in ("gt", "ge", "lt", "le", "in") and not _is_scalar(value):
                raise err(key, f"{on}: '{op}' needs a single value, got {_describe(value)}")
            out.append(Condition(key=ref, op=op, value=tuple(value) if op == "in" else value))
    return tuple(out)


# --------------------------------------------------------------------------- validation


def _validate(space: SearchSpace, base: str | Path | None, err: _Err) -> None:
    """Build a Config at the combinations the module docstring lists; SpaceError at the first that fails."""
    from fvae import config as fconfig
    from fvae.train import Config

    tree = fconfig.read_yaml(base) if base else {}

    def problem(values: Mapping[str, Any]) -> str | None:
        t = copy.deepcopy(tree)
        for k, v in values.items():
            fconfig.set_path(t, k, v)
        try:
            fconfig.from_dict(Config, t)
        except fconfig.ConfigError as e:
            return str(e)
        return None

    ends = [[(c, f"{p.key} (choice {c!r})") for c in p.choices] or
            [(v, f"{p.key} ('{end}' {v!r})") for end, v in (("low", p.dist.low), ("high", p.dist.high))]
            for p in space.params]
    n = [len(e) for e in ends]
    if math.prod(n) <= MAX_COMBINATIONS:  # nearest the base combination first
        combos = sorted(itertools.product(*map(range, n)), key=lambda c: sum(map(bool, c)))
    else:
        combos = [tuple(j if k == i else 0 for k in range(len(n))) for i in range(len(n)) for j in range(n[i])]
    seen, firsts = set(), {p.key: e[0][1] for p, e in zip(space.params, ends)}
    for combo in combos:
        chosen, labels = {}, []
        for p, e, j in zip(space.params, ends, combo):
            if p.active(chosen):
                chosen[p.key] = e[j][0]
                labels += [e[j][1]] if j else []
        if repr(chosen) in seen or (why := problem({**space.fixed, **chosen})) is None:
            seen.add(repr(chosen))
            continue
        if not labels:  # the base combination fails: name the first key (fixed ones first) that breaks it
            prefix: dict[str, Any] = {}
            for k, v in {**space.fixed, **chosen}.items():
                prefix[k] = v
                if problem(prefix):
                    labels = [f"{k} (fixed {v!r})" if k in space.fixed else firsts[k]]
                    break
        at = f" (at {', '.join(f'{k}={v!r}' for k, v in chosen.items())})" if chosen else ""
        raise err(", ".join(labels), why + at)
