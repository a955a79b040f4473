"""nesc.core.config: frozen dataclasses validated on construction, and the override precedence
(exact name > ``re:`` regex > module type, most derived class first) with loud unused rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import nesc
from nesc import ConfigError, LayerConfig, NESConfig
from nesc.core.config import DEFAULT_RATIO, Candidate, replace_fields, resolve_overrides


def test_defaults_are_a_4x_per_layer_plan() -> None:
    c = NESConfig()
    assert (c.ratio, c.param_budget, c.policy, c.init, c.learner) == (4.0, None, "per_layer", "dense", False)
    assert c.keep_first and c.keep_classifier and c.min_params == 1024


def test_config_is_frozen_and_owns_its_overrides() -> None:
    rules = {"fc": None}
    c = NESConfig(overrides=rules)
    rules["conv"] = None  # the caller's dict changes; the config must not
    assert dict(c.overrides) == {"fc": None}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.ratio = 2.0  # type: ignore[misc]


def test_replace_returns_a_validated_copy() -> None:
    c = NESConfig(ratio=2.0)
    assert c.replace(policy="global").policy == "global" and c.policy == "per_layer"
    with pytest.raises(ConfigError):
        c.replace(ratio=0.5)


def test_param_budget_replaces_the_default_ratio() -> None:
    c = NESConfig(param_budget=1000)
    assert c.ratio is None and c.param_budget == 1000


def test_param_budget_replaces_the_default_ratio_of_a_default_config_too() -> None:
    c = NESConfig().replace(param_budget=1000)  # what nesc.transform(model, x, param_budget=1000) does
    assert c.ratio is None and c.param_budget == 1000
    assert NESConfig(policy="global").replace(param_budget=50).ratio is None


def test_the_default_ratio_is_documented_and_equals_an_explicit_one() -> None:
    assert NESConfig.ratio == DEFAULT_RATIO == 4.0 and f"{NESConfig.ratio:g}" == "4"
    assert NESConfig() == NESConfig(ratio=4.0) and "ratio=4.0" in repr(NESConfig())
    assert NESConfig(ratio=None, param_budget=10).param_budget == 10


def test_the_default_ratio_survives_copies_and_pickling() -> None:
    import copy
    import pickle

    for c in (copy.deepcopy(NESConfig()), copy.copy(NESConfig()), pickle.loads(pickle.dumps(NESConfig()))):
        assert c.ratio == 4.0 and c.replace(param_budget=100).ratio is None


@pytest.mark.parametrize("make", [
    lambda: NESConfig(ratio=4.0, param_budget=1000),  # 4.0 given, even though it is the default's value
    lambda: NESConfig(ratio=8).replace(param_budget=1000),
    lambda: NESConfig(param_budget=1000).replace(ratio=4),
])
def test_an_explicit_ratio_with_a_param_budget_is_an_error(make) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    msg = str(info.value)
    assert "ratio or param_budget, not both" in msg and "param_budget=1000" in msg
    assert "ratio=None" in msg and "param_budget=None" in msg  # how to fix, either way


@pytest.mark.parametrize("ratio", [float("inf"), 1e400])
def test_an_infinite_ratio_is_a_config_error(ratio: float) -> None:
    with pytest.raises(ConfigError) as info:
        NESConfig(ratio=ratio)
    msg = str(info.value)
    assert "ratio" in msg and "finite" in msg and "inf" in msg and "param_budget=" in msg


def test_a_huge_finite_ratio_is_for_the_planner_to_refuse() -> None:
    assert NESConfig(ratio=1e9).ratio == 1e9  # the config cannot know the dense size: plan_pools checks


@pytest.mark.parametrize("kwargs", [dict(ratio=True), dict(param_budget=True)])
def test_a_bool_is_not_a_number_here(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="ratio|param_budget"):
        NESConfig(**kwargs)


@pytest.mark.parametrize("typo, near", [("ration", "ratio"), ("param_budjet", "param_budget"), ("polcy", "policy"),
                                        ("min_param", "min_params")])
def test_replace_with_a_misspelled_field_suggests_the_close_one(typo: str, near: str) -> None:
    with pytest.raises(ConfigError) as info:
        NESConfig().replace(**{typo: 4})
    assert str(info.value) == f"unknown NESConfig field {typo!r}; did you mean {near!r}?"
    assert not isinstance(info.value, TypeError)


def test_replace_with_an_unknown_field_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        NESConfig().replace(zzz=1)
    msg = str(info.value)
    assert "unknown NESConfig field 'zzz'" in msg and "valid fields" in msg and "ratio" in msg and "overrides" in msg


def test_replace_fields_serves_any_config_dataclass() -> None:
    """The helper ``TrainConfig.replace`` (or any other config) can share."""

    @dataclasses.dataclass(frozen=True)
    class Other:
        epochs: int = 1

    assert replace_fields(Other(), {"epochs": 3}) == Other(3)
    with pytest.raises(ConfigError, match="unknown Other field 'epoch'; did you mean 'epochs'"):
        replace_fields(Other(), {"epoch": 3})


def test_nesc_transform_keyword_typo_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown NESConfig field 'ration'; did you mean 'ratio'"):
        nesc.transform(nn.Linear(4, 4), (torch.randn(1, 4),), ration=4)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(ratio=0.5), ["ratio", ">= 1", "0.5"]),
        (dict(ratio=float("nan")), ["ratio", ">= 1"]),
        (dict(ratio="4"), ["ratio", "number"]),
        (dict(ratio=None), ["budget", "ratio=", "param_budget="]),
        (dict(ratio=8.0, param_budget=100), ["ratio or param_budget", "ratio=None"]),
        (dict(param_budget=0), ["param_budget", "positive"]),
        (dict(param_budget=1.5), ["param_budget", "int"]),
        (dict(policy="per_block"), ["per_block", "per_layer", "per_type", "per_stage", "global"]),
        (dict(init="zeros"), ["zeros", "dense", "random"]),
        (dict(min_params=-1), ["min_params", ">= 0"]),
        (dict(overrides={3: None}), ["3", "module name", "re:", "class"]),
        (dict(overrides={"re:(": None}), ["re:(", "regular expression"]),
        (dict(overrides={"fc": 4}), ["fc", "LayerConfig", "None"]),
    ],
)
def test_invalid_config_raises_config_error_saying_what_and_how(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        NESConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(ratio=0.9), ["ratio", ">= 1", "None"]),
        (dict(ratio=float("inf")), ["ratio", "finite", "inf"]),
        (dict(pool_shape=(4, 4, 3)), ["pool_shape", "four positive ints"]),
        (dict(pool_shape=(4, 0, 3, 3)), ["pool_shape", "four positive ints"]),
        (dict(ratio=2.0, pool_shape=(4, 4, 3, 3)), ["ratio or pool_shape"]),
    ],
)
def test_invalid_layer_config(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        LayerConfig(**kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_layer_config_pool_shape_becomes_a_tuple() -> None:
    assert LayerConfig(pool_shape=[8, 4, 3, 3]).pool_shape == (8, 4, 3, 3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- override precedence


class MyConv(nn.Conv2d):
    pass


CANDIDATES = [
    Candidate("stem.weight", "stem", nn.Conv2d),
    Candidate("layer1.conv1.weight", "layer1.conv1", nn.Conv2d),
    Candidate("layer1.conv2.weight", "layer1.conv2", MyConv),
    Candidate("fc.weight", "fc", nn.Linear),
]
MODULES = {c.module_name: c.module_type for c in CANDIDATES} | {"layer1.bn": nn.BatchNorm2d, "": nn.Module}

BY_NAME, BY_REGEX, BY_REGEX2, BY_TYPE, BY_SUBTYPE = (LayerConfig(pool=p) for p in ("name", "rx", "rx2", "type", "sub"))


def _resolved(rules) -> dict[str, str | None]:
    out = resolve_overrides(rules, CANDIDATES, MODULES)
    return {w: (cfg.pool if cfg is not None else None) for w, (_, cfg) in out.items()}


def test_exact_beats_regex_beats_type() -> None:
    rules = {nn.Conv2d: BY_TYPE, "re:layer1\\..*": BY_REGEX, "layer1.conv1": BY_NAME}
    assert _resolved(rules) == {"stem.weight": "type", "layer1.conv1.weight": "name", "layer1.conv2.weight": "rx"}


def test_exact_name_matches_the_weight_name_too() -> None:
    assert _resolved({"fc.weight": None}) == {"fc.weight": None}


def test_first_regex_in_the_order_given_wins() -> None:
    assert _resolved({"re:layer1\\.conv.*": BY_REGEX, "re:.*conv2.*": BY_REGEX2})["layer1.conv2.weight"] == "rx"
    assert _resolved({"re:.*conv2.*": BY_REGEX2, "re:layer1\\.conv.*": BY_REGEX})["layer1.conv2.weight"] == "rx2"


def test_regex_is_a_full_match() -> None:
    with pytest.raises(ConfigError, match="re:conv"):
        _resolved({"re:conv": None})  # matches no name entirely


def test_most_derived_type_wins() -> None:
    got = _resolved({nn.Conv2d: BY_TYPE, MyConv: BY_SUBTYPE, nn.Module: LayerConfig(pool="any")})
    assert got == {
        "stem.weight": "type",
        "layer1.conv1.weight": "type",
        "layer1.conv2.weight": "sub",
        "fc.weight": "any",
    }


def test_none_means_dense() -> None:
    assert _resolved({"re:.*": None}) == dict.fromkeys(c.weight_name for c in CANDIDATES)


def test_rule_shadowed_by_precedence_is_not_unused() -> None:
    # The type rule loses everywhere to the exact name but still matches: no error.
    assert _resolved({"fc": BY_NAME, nn.Linear: BY_TYPE}) == {"fc.weight": "name"}


def test_unused_rule_names_the_key_and_suggests_close_names() -> None:
    with pytest.raises(ConfigError) as info:
        _resolved({"layer1.conv": None, "stem": None})
    msg = str(info.value)
    assert "'layer1.conv'" in msg and "did you mean" in msg and "'layer1.conv1'" in msg
    assert len(msg.splitlines()) == 1 and not msg.startswith("override 'stem'"), "the used rule 'stem' is reported"


def test_rule_naming_a_module_without_compressible_weight_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        _resolved({"layer1.bn": LayerConfig()})
    msg = str(info.value)
    assert "'layer1.bn'" in msg and "BatchNorm2d" in msg and "conv" in msg and "remove the rule" in msg


def test_unused_type_rule_is_an_error() -> None:
    with pytest.raises(ConfigError, match="LSTM matches no compressible weight"):
        _resolved({nn.LSTM: None})


@pytest.mark.parametrize("build, message", [
    (lambda: NESConfig(ration=4), "unknown NESConfig field 'ration'; did you mean 'ratio'?"),
    (lambda: LayerConfig(pool_shap=(1, 1, 1, 1)), "unknown LayerConfig field 'pool_shap'; did you mean 'pool_shape'?"),
])
def test_a_misspelled_constructor_keyword_suggests_the_field(build, message) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value) == message


def test_train_config_typos_suggest_the_field() -> None:
    from nesc.train import TrainConfig

    with pytest.raises(ConfigError, match="unknown TrainConfig field 'epoch'; did you mean 'epochs'"):
        TrainConfig(epoch=3)
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        TrainConfig().replace(epoch=3)


@pytest.mark.parametrize("value, stored", [(False, False), (True, "inputs"), ("inputs", "inputs"), ("outputs", "outputs")])
def test_reuse_takes_a_bool_or_a_level_and_true_means_inputs(value, stored) -> None:
    assert NESConfig(reuse=value).reuse == stored


@pytest.mark.parametrize("value", ["all", 1, None, "Outputs"])
def test_an_unknown_reuse_level_is_a_config_error_naming_the_levels(value) -> None:
    with pytest.raises(ConfigError, match="'inputs'.*'outputs'"):
        NESConfig(reuse=value)
