"""Search-space files: shipped spaces load and suggest valid configs; broken files fail loudly."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import optuna
import pytest
import yaml

from fvae.space import METRICS, SPACES_DIR, SearchSpace, SpaceError, load_space, nested
from fvae.train import Config

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))


def test_shipped_spaces_exist():
    assert {p.stem for p in SHIPPED} >= {"default", "paper", "smoke"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_loads(path: Path):
    space = load_space(path)
    assert isinstance(space, SearchSpace)
    assert space.name == path.stem and space.path == path
    assert space.metric == "valid_rank_icir" and space.mode == "max"
    assert space.params, "a search space should search something"
    defaults = Config()
    assert all(hasattr(getattr(defaults, k.split(".")[0]), k.split(".")[1]) for k in space.keys)  # Config's fields
    assert load_space(path.stem) == space  # bare names resolve to SPACES_DIR


def test_paper_space_is_the_papers_model():
    space = load_space("paper")
    searched = {p.key for p in space.params}
    assert {"model.num_factors", "model.hidden_size", "model.num_portfolios", "model.gamma", "train.lr"} <= searched
    assert space.fixed["model.gat_layers"] == 0
    assert space.fixed["model.conditional_posterior"] is False
    assert space.fixed["model.attn_heads"] == 1


def test_smoke_space_is_tiny():
    space = load_space("smoke")
    by_key = {p.key: p for p in space.params}
    assert set(by_key["model.hidden_size"].choices) <= {8, 16}
    assert set(by_key["model.num_factors"].choices) <= {2, 4}
    assert set(by_key["model.num_portfolios"].choices) <= {4, 8}
    assert space.fixed["train.epochs"] == 2
    assert space.fixed["train.patience"] == 2
    assert space.fixed["data.batch_days"] == 8


def test_sp500_cpu_space_trains_half_the_days():
    from fvae.train import load_config

    space = load_space("sp500_cpu")
    trial = optuna.trial.FixedTrial({"model.hidden_size": 32, "model.num_factors": 8, "model.num_portfolios": 32,
                                     "model.attn_heads": 2, "model.gat_layers": 1, "model.gat_heads": 2,
                                     "model.gamma": 1.0, "train.lr": 1.0e-3})
    cfg = load_config(None, space.to_overrides(space.suggest(trial)))
    assert cfg.data.day_fraction == 0.5 and cfg.model.gat_layers == 1 and cfg.train.epochs == 8


# ----------------------------------------------------------------------- suggest

FULL = {
    "model.num_factors": 8,
    "model.hidden_size": 64,
    "model.num_portfolios": 32,
    "model.attn_heads": 2,
    "model.gat_layers": 1,
    "model.gat_heads": 4,
    "model.conditional_posterior": True,
    "model.dropout": 0.1,
    "model.gamma": 0.5,
    "train.lr": 1.0e-3,
    "train.weight_decay": 1.0e-5,
}


def test_fixed_trial_gives_exactly_those_params():
    space = load_space("default")
    trial = optuna.trial.FixedTrial(FULL)
    config = space.suggest(trial)
    assert config == {**FULL, **space.fixed}
    assert trial.params == FULL


def test_inactive_conditional_param_is_not_suggested():
    space = load_space("default")
    params = {k: v for k, v in FULL.items() if k != "model.gat_heads"}
    params["model.gat_layers"] = 0
    trial = optuna.trial.FixedTrial(params)  # FixedTrial raises if gat_heads were suggested
    config = space.suggest(trial)
    assert "model.gat_heads" not in config
    assert "model.gat_heads" not in trial.params
    assert config == {**params, **space.fixed}


def _check_config(space: SearchSpace, config: dict) -> None:
    by_key = {p.key: p for p in space.params}
    seen: dict = {}
    for p in space.params:
        if p.active(seen):
            assert p.key in config, p.key
            assert p.contains(config[p.key]), (p.key, config[p.key])
            seen[p.key] = config[p.key]
        else:
            assert p.key not in config, p.key
    for k, v in space.fixed.items():
        assert config[k] == v
    assert set(config) == set(seen) | set(space.fixed)
    hidden = config.get("model.hidden_size")
    for heads in ("model.attn_heads", "model.gat_heads"):
        if heads in config and hidden is not None:
            assert hidden % config[heads] == 0
    if config.get("model.gat_layers", 0) == 0:
        assert "model.gat_heads" not in by_key or "model.gat_heads" not in config


@pytest.mark.parametrize("name", ["default", "smoke", "paper"])
def test_tpe_study_stays_in_range(name: str):
    space = load_space(name)
    configs: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        config = space.suggest(trial)
        configs.append(config)
        # a made-up score that TPE can chase
        return -abs(math.log(config["model.gamma"])) - config["model.num_factors"] / 64

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=20)
    assert len(configs) == 20
    for config in configs:
        _check_config(space, config)
    if any(p.key == "model.gat_heads" for p in space.params):
        layers = {c["model.gat_layers"] for c in configs}
        assert layers & {0} and layers - {0}, "both branches of the condition should be explored"


def test_works_as_ray_optuna_search_define_by_run():
    """``OptunaSearch(space=space.suggest)`` gives flat dotted configs, survives save/restore."""
    pytest.importorskip("ray.tune.search.optuna")
    from ray.tune.search.optuna import OptunaSearch

    space = load_space("smoke")
    searcher = OptunaSearch(
        space=space.suggest,
        metric=space.metric,
        mode=space.mode,
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    for i in range(4):
        config = searcher.suggest(f"t{i}")
        _check_config(space, config)  # flat: Ray unflattens on "/" only
        searcher.on_trial_complete(f"t{i}", {space.metric: float(i)})
    assert pickle.loads(pickle.dumps(space.suggest)).__self__ == space


# ----------------------------------------------------------------------- overrides


def test_to_overrides_and_nested_round_trip():
    from fvae.config import apply_overrides

    space = load_space("default")
    params = dict(FULL, **{"model.gamma": 1e-05, "train.lr": 3e-4})
    overrides = space.to_overrides(params)
    assert overrides[0] == "model.num_factors=8"
    assert "model.conditional_posterior=true" in overrides
    assert "train.epochs=25" in overrides  # fixed constants are included
    full = {**params, **space.fixed}
    parsed = {o.split("=", 1)[0]: yaml.safe_load(o.split("=", 1)[1]) for o in overrides}
    assert parsed == full
    assert all(type(parsed[k]) is type(v) for k, v in full.items())
    tree = space.nested(params)
    assert tree["model"]["num_factors"] == 8 and tree["train"]["epochs"] == 25
    assert apply_overrides({}, overrides) == tree
    assert _flatten(tree) == full


def test_nested_rejects_conflicts():
    assert nested({"a.b": 1, "a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
    with pytest.raises(ValueError):
        nested({"model": 1, "model.x": 2})
    with pytest.raises(ValueError):
        nested({"model.x.y": 1, "model.x": 2})
    with pytest.raises(ValueError):
        nested({"model..x": 1})


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------- malformed files

GOOD = {
    "metric": "valid_rank_icir",
    "params": {
        "model.attn_heads": {"type": "categorical", "choices": [1, 2]},
        "model.hidden_size": {"type": "categorical", "choices": [32, 64]},
        "model.gat_layers": {"type": "int", "low": 0, "high": 2},
        "model.gat_heads": {"type": "categorical", "choices": [1, 2], "when": {"model.gat_layers": {"gt": 0}}},
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    },
    "fixed": {"train.epochs": 3},
}


def _write(tmp_path: Path, data, name: str = "broken_space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def _with_param(key: str, spec) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD, sort_keys=False))
    data["params"][key] = spec
    return data


def test_good_fixture_loads(tmp_path: Path):
    assert len(load_space(_write(tmp_path, GOOD)).params) == 5


BROKEN = {
    "unknown_type": (
        _with_param("model.num_factors", {"type": "integer", "low": 2, "high": 8}),
        ["model.num_factors", "integer", "did you mean 'int'"],
    ),
    "low_ge_high": (
        _with_param("model.num_factors", {"type": "int", "low": 8, "high": 8}),
        ["model.num_factors", "low (8) must be < high (8)"],
    ),
    "log_nonpositive_low": (
        _with_param("model.gamma", {"type": "float", "low": 0.0, "high": 1.0, "log": True}),
        ["model.gamma", "low > 0"],  # Optuna's FloatDistribution says so
    ),
    "missing_choices": (
        _with_param("model.attn_heads", {"type": "categorical"}),
        ["model.attn_heads", "missing 'choices'"],
    ),
    "unknown_param_key": (
        _with_param("model.num_factors", {"type": "int", "lwo": 2, "high": 8}),
        ["model.num_factors", "'lwo'", "did you mean 'low'"],
    ),
    "when_unknown_param": (
        _with_param("model.dropout", {"type": "float", "low": 0.0, "high": 0.3, "when": {"model.gat_layer": {"gt": 0}}}),
        ["model.dropout", "model.gat_layer", "did you mean 'model.gat_layers'"],
    ),
    "when_later_param": (
        {
            "metric": "m",
            "params": {
                "model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "when": {"model.gat_layers": {"gt": 0}}},
                "model.gat_layers": {"type": "int", "low": 0, "high": 2},
            },
        },
        ["model.dropout", "model.gat_layers", "defined later"],
    ),
    "when_unknown_op": (
        _with_param("model.dropout", {"type": "float", "low": 0.0, "high": 0.3, "when": {"model.gat_layers": {"gte": 0}}}),
        ["model.dropout", "'gte'", "did you mean"],
    ),
    "when_string_expression": (
        _with_param("model.dropout", {"type": "float", "low": 0.0, "high": 0.3, "when": "model.gat_layers > 0"}),
        ["model.dropout", "'when' must be a mapping"],
    ),
    "key_not_allowed": (
        _with_param("model.num_factor", {"type": "int", "low": 2, "high": 8}),
        ["model.num_factor", "did you mean 'model.num_factors'"],
    ),
    "fixed_key_not_allowed": (
        dict(GOOD, fixed={"train.epoch": 3}),
        ["train.epoch", "did you mean 'train.epochs'"],
    ),
    "top_level_unknown": (
        {"metric": "m", "parms": GOOD["params"]},
        ["parms", "did you mean 'params'"],
    ),
    "heads_do_not_divide": (  # ModelConfig's own rule, at attn_heads 3 and hidden_size 32
        _with_param("model.attn_heads", {"type": "categorical", "choices": [1, 3]}),
        ["model.attn_heads (choice 3)", "attn_heads (3) must divide hidden_size (32)"],
    ),
    "heads_against_the_default_hidden": (  # a head count is checked against the base config's hidden_size
        {"metric": "valid_rank_icir", "params": {"model.gat_layers": {"type": "int", "low": 0, "high": 1},
                                                 "model.gat_heads": {"type": "categorical", "choices": [1, 3]}}},
        ["model.gat_heads (choice 3)", "gat_heads (3) must divide hidden_size (64)"],
    ),
    "hidden_against_fixed_heads": (
        {"metric": "valid_rank_icir", "params": {"model.hidden_size": {"type": "categorical", "choices": [8, 12]}},
         "fixed": {"model.attn_heads": 8}},
        ["model.hidden_size (choice 12)", "attn_heads (8) must divide hidden_size (12)"],
    ),
    "float_type_for_int_key": (
        _with_param("model.num_factors", {"type": "float", "low": 2.0, "high": 8.0}),
        ["model.num_factors", "integer"],
    ),
    "string_float": (
        _with_param("model.gamma", {"type": "float", "low": "1e-3", "high": 1.0}),
        ["model.gamma", "'low'", "a dot"],
    ),
    "out_of_domain": (
        _with_param("model.dropout", {"type": "float", "low": 0.0, "high": 1.5}),
        ["model.dropout", "'high' 1.5", "in [0, 1)"],
    ),
    "both_fixed_and_searched": (
        dict(GOOD, fixed={"train.lr": 1.0e-3}),
        ["train.lr", "both searched"],
    ),
    "day_fraction_zero": (
        dict(GOOD, fixed={"data.day_fraction": 0.0}),
        ["data.day_fraction", "0 < value"],
    ),
    "bad_fixed_type": (
        dict(GOOD, fixed={"model.conditional_posterior": "yes please"}),
        ["model.conditional_posterior", "true or false"],
    ),
    "step_not_multiple": (
        _with_param("model.num_factors", {"type": "int", "low": 2, "high": 9, "step": 2}),
        ["model.num_factors", "not divisible by `step`"],  # an Optuna warning, taken as an error
    ),
    "log_and_step": (
        _with_param("model.num_factors", {"type": "int", "low": 2, "high": 8, "step": 2, "log": True}),
        ["model.num_factors", "IntDistribution", "step is 1 when `log`"],
    ),
    "key_for_other_type": (
        _with_param("model.attn_heads", {"type": "categorical", "choices": [1, 2], "low": 1}),
        ["model.attn_heads", "'low' does not apply to type categorical"],
    ),
    "duplicate_param": (
        "metric: m\nparams:\n  train.lr: {type: float, low: 0.001, high: 0.01}\n"
        "  train.lr: {type: float, low: 0.001, high: 0.1}\n",
        ["train.lr", "listed twice", "line 4"],
    ),
    "non_mapping_yaml": ("- metric\n- params\n", ["expected a mapping", "list"]),
    "missing_metric": ({"params": GOOD["params"]}, ["metric"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_malformed_file_raises_space_error(tmp_path: Path, case: str):
    data, fragments = BROKEN[case]
    path = _write(tmp_path, data)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message
    assert "broken_space.yaml" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_file_raises_space_error(tmp_path: Path):
    with pytest.raises(SpaceError, match="nowhere.yaml.*not found"):
        load_space(tmp_path / "nowhere.yaml")
    with pytest.raises(SpaceError, match="no_such_space.yaml.*not found"):
        load_space("no_such_space")


def test_space_error_is_a_value_error():
    assert issubclass(SpaceError, ValueError)


# ----------------------------------------------------------------------- rules live in Optuna and the Config


def test_optuna_rejects_a_bad_range(tmp_path: Path):
    path = _write(tmp_path, _with_param("model.num_factors", {"type": "int", "low": 9, "high": 8}))
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: model.num_factors: ")
    with pytest.raises(ValueError) as optuna_says:  # the text is Optuna's own
        optuna.distributions.IntDistribution(9, 8)
    assert "IntDistribution(9, 8)" in message and str(optuna_says.value) in message


def test_heads_that_do_not_divide_hidden_size_fail_by_the_model_configs_rule(tmp_path: Path):
    from fvae.model import ModelConfig

    path = _write(tmp_path, _with_param("model.attn_heads", {"type": "categorical", "choices": [1, 2, 3]}))
    with pytest.raises(SpaceError) as info:
        load_space(path)
    with pytest.raises(ValueError) as rule:
        ModelConfig(hidden_size=32, attn_heads=3)
    message = str(info.value)
    assert message.startswith(f"{path}: model.attn_heads (choice 3): ") and str(rule.value) in message
    assert "model.hidden_size=32" in message  # the combination that was built


def test_unknown_config_key_is_rejected_with_a_hint(tmp_path: Path):
    for section in ("params", "fixed"):
        data = dict(GOOD, fixed={"model.hiden_size": 32}) if section == "fixed" else \
            _with_param("model.hiden_size", {"type": "categorical", "choices": [32]})
        with pytest.raises(SpaceError) as info:
            load_space(_write(tmp_path, data))
        message = str(info.value)
        assert f"{section} key 'model.hiden_size'" in message and "did you mean 'model.hidden_size'" in message
    with pytest.raises(SpaceError, match="'model': not a config key"):  # a section is not a key
        load_space(_write(tmp_path, dict(GOOD, fixed={"model": 3})))


def test_any_config_field_is_searchable_and_judged_by_the_config(tmp_path: Path):
    data = _with_param("train.schedule", {"type": "categorical", "choices": ["cosine", "constant"]})
    data["params"]["data.non_overlap"] = {"type": "categorical", "choices": [True, False]}
    data["fixed"]["train.warmup_steps"] = 10
    space = load_space(_write(tmp_path, data))
    assert {"train.schedule", "data.non_overlap"} <= {p.key for p in space.params}
    data["params"]["train.schedule"]["choices"].append("linear")
    with pytest.raises(SpaceError, match=r"train.schedule \(choice 'linear'\): config.train.schedule: expected one"):
        load_space(_write(tmp_path, data))


def test_inactive_parameters_are_absent_from_the_checked_configs(tmp_path: Path):
    """gat_heads 3 only with hidden_size 48: the check never pairs it with 32 (whose default gat_heads 4 divides)."""
    data = {"metric": "valid_rank_icir",
            "params": {"model.hidden_size": {"type": "categorical", "choices": [32, 48]},
                       "model.gat_heads": {"type": "categorical", "choices": [1, 3],
                                           "when": {"model.hidden_size": {"eq": 48}}}},
            "fixed": {"model.gat_layers": 1}}
    load_space(_write(tmp_path, data))
    data["params"]["model.gat_heads"]["when"] = {"model.hidden_size": {"in": [32, 48]}}
    with pytest.raises(SpaceError, match="gat_heads \\(3\\) must divide hidden_size \\(32\\)"):
        load_space(_write(tmp_path, data))


def test_beyond_max_combinations_each_value_is_checked_against_the_base(tmp_path: Path):
    from fvae.space import MAX_COMBINATIONS

    data = {"metric": "valid_rank_icir", "params": {}, "fixed": {"model.hidden_size": 48}}
    for key in ("model.num_factors", "model.num_portfolios", "model.gat_layers", "train.epochs",
                "train.patience", "train.warmup_steps", "data.batch_days", "train.eval_batch_days", "train.seed"):
        data["params"][key] = {"type": "int", "low": 1, "high": 2}
    data["params"]["model.attn_heads"] = {"type": "categorical", "choices": [1, 2, 5]}
    assert 2 ** 9 * 3 > MAX_COMBINATIONS
    with pytest.raises(SpaceError, match=r"model.attn_heads \(choice 5\): .*attn_heads \(5\) must divide hidden"):
        load_space(_write(tmp_path, data))


def test_space_is_checked_against_the_base_config(tmp_path: Path):
    space_file = _write(tmp_path, {"metric": "valid_rank_icir",
                                   "params": {"model.attn_heads": {"type": "categorical", "choices": [1, 4]}}})
    load_space(space_file)  # the default hidden_size 64 divides by 4
    base = tmp_path / "base.yaml"
    base.write_text("model: {hidden_size: 30}\n")
    with pytest.raises(SpaceError, match=r"model.attn_heads \(choice 4\): .*attn_heads \(4\) must divide .* \(30\)"):
        load_space(space_file, base=base)


def test_metric_must_be_reported_per_epoch(tmp_path: Path):
    assert {"valid_rank_icir", "nll", "loss"} <= set(METRICS)
    with pytest.raises(SpaceError) as info:
        load_space(_write(tmp_path, dict(GOOD, metric="valid_rank_icr")))
    assert "broken_space.yaml: metric:" in str(info.value) and "did you mean 'valid_rank_icir'" in str(info.value)
    space = load_space(_write(tmp_path, dict(GOOD, metric="nll", mode="min")))
    assert (space.metric, space.mode) == ("nll", "min")
