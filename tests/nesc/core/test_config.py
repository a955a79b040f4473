"""nesc.core.config: frozen dataclasses validated on construction, and the override precedence
(exact name > ``re:`` regex > module type, most derived class first) with loud unused rules."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from nesc import ConfigError, LayerConfig, NESConfig
from nesc.core.config import Candidate, resolve_overrides


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
