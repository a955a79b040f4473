"""Configuration: one frozen dataclass for the model, one per-layer override, validated on construction.

Per-module overrides are keyed by, in this order of precedence (the first that matches wins):

1. an exact name: the module that owns the weight (``"layer1.0.conv1"``) or the weight's fully
   qualified name (``"layer1.0.conv1.weight"``);
2. a regular expression, written ``"re:<pattern>"`` and matched with ``re.fullmatch`` against the
   same two names; among several, the first in the order given wins;
3. a module type (a class): matches modules that are instances of it; the most derived class wins.

The value is a ``LayerConfig`` (compress this layer, with these settings) or ``None`` (leave this
layer dense). A rule that matches no weight of the model is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Union

from nesc.core.errors import ConfigError

Policy = Literal["per_layer", "per_type", "per_stage", "global"]
POLICIES: tuple[str, ...] = ("per_layer", "per_type", "per_stage", "global")
INITS: tuple[str, ...] = ("dense", "random")
REUSE_LEVELS: tuple[str, ...] = ("inputs", "outputs")  # NESConfig.reuse besides False / True (= "inputs")
OverrideKey = Union[str, type]
DEFAULT_RATIO = 4.0


class _DefaultRatio(float):
    """``NESConfig.ratio`` when the caller did not set it: equal to ``DEFAULT_RATIO``, but told apart
    from an explicit ``ratio=4.0`` by its type, so that a ``param_budget`` may replace the default
    (and only the default) without a word."""


_UNSET_RATIO = _DefaultRatio(DEFAULT_RATIO)


def replace_fields(config, changes: Mapping[str, object]):
    """``dataclasses.replace(config, **changes)``, but a misspelled field is a ``ConfigError`` that
    names it and suggests the nearest field, not a bare ``TypeError``. Shared by every config
    dataclass's ``replace`` (``NESConfig``, ``TrainConfig``)."""
    _check_fields(type(config), changes)
    return dataclasses.replace(config, **changes)


def checked_fields(cls):
    """Class decorator for a config dataclass: a misspelled keyword of its constructor is a
    ``ConfigError`` suggesting the nearest field (``NESConfig(ration=4)``), not a bare ``TypeError``."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _check_fields(cls, kwargs)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _check_fields(cls, changes: Mapping[str, object]) -> None:
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [key for key in changes if key not in fields]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, fields, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"valid fields: {', '.join(fields)}"
        raise ConfigError(f"unknown {cls.__name__} field {key!r}; {hint}")


@checked_fields
@dataclass(frozen=True)
class LayerConfig:
    """Settings for one layer that override the model-wide plan.

    ratio: this layer's own compression ratio (its pool holds ``numel / ratio`` parameters).
    pool: the name of a shared pool to join; layers naming the same pool share it, whatever their type.
    pool_shape: an explicit pool shape ``(Op, Ip, Kh, Kw)``.
    """

    ratio: float | None = None
    pool: str | None = None
    pool_shape: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None and not (_is_number(self.ratio) and 1.0 <= self.ratio < math.inf):
            raise ConfigError(
                f"LayerConfig.ratio must be a finite number >= 1 (got {self.ratio!r}): a ratio r keeps 1/r "
                f"of the layer's parameters. To leave the layer dense, map it to None instead."
            )
        if self.pool_shape is not None:
            shape = tuple(self.pool_shape)
            if len(shape) != 4 or any(not isinstance(d, int) or d < 1 for d in shape):
                raise ConfigError(
                    f"LayerConfig.pool_shape must be four positive ints (Op, Ip, Kh, Kw), got "
                    f"{self.pool_shape!r}"
                )
            object.__setattr__(self, "pool_shape", shape)
        if self.ratio is not None and self.pool_shape is not None:
            raise ConfigError("LayerConfig takes ratio or pool_shape, not both: pool_shape fixes the size")


@checked_fields
@dataclass(frozen=True)
class NESConfig:
    """How to compress a model.

    ratio: the whole model stores ``1/ratio`` of its dense parameters (pools + routing maps +
        what stays dense); a finite number >= 1, ``DEFAULT_RATIO`` (4) unless given. Exclusive with
        ``param_budget``: an explicit ratio with a budget is an error, the default gives way to it.
    param_budget: the same budget as an absolute parameter count.
    policy: which compressed layers share a pool: ``per_layer`` (each its own), ``per_type``
        (one pool per op kind and kernel size), ``per_stage`` (one per feature-map resolution, across
        layer types), ``global`` (one pool for every compressed layer, across layer types).
    min_params: layers whose weight has fewer elements stay dense.
    keep_first / keep_classifier: the first conv and the last weight-bearing op stay dense, unless
        what stays dense would then take more than half of the budget (the plan's notes say so).
    pool_extent: extra pool cells along every spatial axis whose kernel is wider than 1 (a 1-D
        conv with kernel 3 and ``pool_extent=4`` samples from pools 7 long): blocks then also
        sample along time / space, as WSNet's condensed filters do, at the cost of fewer channels
        for the same budget. 0 = pools exactly kernel-sized (nothing sampled along those axes).
    reuse: train toward routing that ``passes.reuse`` turns into fewer multiply-adds: the blocks of
        an output row share their output-channel and spatial starts and read consecutive pool
        columns from a fixed integer input start, so every weight's input columns repeat with the
        pool's period and its input channels fold exactly (``EpitomeSampler.tie``). ``True`` is
        ``"inputs"``; ``"outputs"`` also gives every output row the same input and spatial starts, so
        each layer runs with its pool's ``Op`` output channels and copies (or interpolates) the rest:
        fewer multiply-adds still, for routing that differs only along the output channels.
    learner: start-index offsets predicted from the batch-mean input features.
    init: ``dense`` fits the pools to the model's current weights by least squares;
        ``random`` draws them (N(0, 1) times each layer's dense standard deviation: the sampled
        weights have the dense initialisation's spread).
    match_spread: with ``init="dense"``, rescale each layer's gain after the fit so its sampled
        weight has the dense weight's spread (``nesc.fitting.fit_pools``).
    overrides: per-module rules (see the module docstring for keys and precedence).
    """

    ratio: float | None = _UNSET_RATIO
    param_budget: int | None = None
    policy: Policy = "per_layer"
    min_params: int = 1024
    keep_first: bool = True
    keep_classifier: bool = True
    pool_extent: int = 0
    reuse: bool | Literal["inputs", "outputs"] = False
    learner: bool = False
    init: Literal["dense", "random"] = "dense"
    match_spread: bool = False
    seed: int = 0
    overrides: Mapping[OverrideKey, LayerConfig | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.param_budget is not None:
            if self.ratio is not None and not isinstance(self.ratio, _DefaultRatio):
                raise ConfigError(
                    f"NESConfig takes ratio or param_budget, not both (got ratio={self.ratio!r}, "
                    f"param_budget={self.param_budget!r}); pass ratio=None with a param_budget, or "
                    f"param_budget=None with a ratio"
                )
            object.__setattr__(self, "ratio", None)
            if isinstance(self.param_budget, bool) or not isinstance(self.param_budget, int) or self.param_budget < 1:
                raise ConfigError(f"param_budget must be a positive int, got {self.param_budget!r}")
        elif self.ratio is None:
            raise ConfigError("NESConfig needs a budget: ratio=<float >= 1> or param_budget=<int>")
        elif not _is_number(self.ratio) or not self.ratio >= 1.0:
            raise ConfigError(
                f"ratio must be a number >= 1, got {self.ratio!r}: ratio r stores 1/r of the dense "
                f"parameters (ratio=4 is a 4x smaller model). A model that should stay dense needs no "
                f"transform."
            )
        elif math.isinf(self.ratio):
            raise ConfigError(
                f"ratio must be a finite number >= 1, got {self.ratio!r}: it would leave no parameter at "
                f"all. Pass a finite ratio, or param_budget=<int> for an absolute size."
            )
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; valid policies: {', '.join(POLICIES)}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        if not isinstance(self.min_params, int) or self.min_params < 0:
            raise ConfigError(f"min_params must be an int >= 0, got {self.min_params!r}")
        if isinstance(self.pool_extent, bool) or not isinstance(self.pool_extent, int) or self.pool_extent < 0:
            raise ConfigError(f"pool_extent must be an int >= 0 (extra pool cells per spatial axis), "
                              f"got {self.pool_extent!r}")
        if not (isinstance(self.reuse, bool) or (isinstance(self.reuse, str) and self.reuse in REUSE_LEVELS)):
            raise ConfigError(f"reuse must be False, True (= 'inputs'), 'inputs' (fold input channels) or "
                              f"'outputs' (fold inputs and share products across outputs), got {self.reuse!r}")
        if self.reuse is True:
            object.__setattr__(self, "reuse", "inputs")
        for key, value in self.overrides.items():
            _check_rule(key, value)
        # Frozen means frozen: keep a private copy of the rules so the caller's dict cannot change us.
        object.__setattr__(self, "overrides", dict(self.overrides))

    def replace(self, **changes) -> "NESConfig":
        """A validated copy with ``changes``; a misspelled field is a ``ConfigError`` with a suggestion."""
        return replace_fields(self, changes)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rule(key: object, value: object) -> None:
    if not isinstance(key, (str, type)):
        raise ConfigError(
            f"override key {key!r} must be a module name, 're:<regex>' or a module class, "
            f"not {type(key).__name__}"
        )
    if isinstance(key, str) and key.startswith("re:"):
        try:
            re.compile(key[3:])
        except re.error as e:
            raise ConfigError(f"override key {key!r} is not a valid regular expression: {e}") from None
    if value is not None and not isinstance(value, LayerConfig):
        raise ConfigError(
            f"override {key!r} maps to {value!r}; expected a LayerConfig (compress) or None (keep "
            f"dense)"
        )


@dataclass(frozen=True)
class Candidate:
    """What an override can match: one weight of the model."""

    weight_name: str
    module_name: str
    module_type: type | None


def resolve_overrides(
    rules: Mapping[OverrideKey, LayerConfig | None], candidates: list[Candidate], all_modules: Mapping[str, type]
) -> dict[str, tuple[OverrideKey, LayerConfig | None]]:
    """Map each weight name to the rule that governs it, following the documented precedence.

    ``all_modules`` (name -> type of every module of the model) lets us tell "names a module that
    owns no compressible weight" (an error: nesc cannot compress it) from "names nothing" (a typo).
    """
    exact = {k: v for k, v in rules.items() if isinstance(k, str) and not k.startswith("re:")}
    regex = [(k, re.compile(k[3:]), v) for k, v in rules.items() if isinstance(k, str) and k.startswith("re:")]
    typed = [(k, v) for k, v in rules.items() if isinstance(k, type)]
    used: set[OverrideKey] = set()
    out: dict[str, tuple[OverrideKey, LayerConfig | None]] = {}
    for c in candidates:
        names = (c.module_name, c.weight_name)
        rule = next(((k, exact[k]) for k in names if k in exact), None)
        if rule is None:
            rule = next(((k, v) for k, pat, v in regex if any(pat.fullmatch(n) for n in names)), None)
        if rule is None and c.module_type is not None:
            hits = [(k, v) for k, v in typed if issubclass(c.module_type, k)]
            if hits:
                rule = min(hits, key=lambda kv: c.module_type.__mro__.index(kv[0]))
        if rule is not None:
            out[c.weight_name] = rule
            used.add(rule[0])
        # A regex or type rule that lost on precedence still matched something.
        for k, pat, _ in regex:
            if any(pat.fullmatch(n) for n in names):
                used.add(k)
        for k, _ in typed:
            if c.module_type is not None and issubclass(c.module_type, k):
                used.add(k)
    unused = [k for k in rules if k not in used]
    if unused:
        raise ConfigError(_explain_unused(unused, rules, candidates, all_modules))
    return out


def _explain_unused(unused, rules, candidates: list[Candidate], all_modules: Mapping[str, type]) -> str:
    known = sorted({c.module_name for c in candidates} | {c.weight_name for c in candidates})
    lines = []
    for k in unused:
        if isinstance(k, str) and not k.startswith("re:") and k in all_modules:
            kind = all_modules[k].__name__
            what = "forced" if rules[k] is not None else "kept dense"
            lines.append(
                f"override {k!r} ({what}) names a {kind}, which owns no weight nesc can compress "
                f"(nesc compresses the weights of conv1d/conv2d, linear and matmul against a "
                f"parameter); remove the rule or name one of its conv/linear children"
            )
        else:
            label = k.__name__ if isinstance(k, type) else repr(k)
            near = difflib.get_close_matches(k, known, n=3) if isinstance(k, str) else []
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            lines.append(
                f"override {label} matches no compressible weight of the model{hint} "
                f"(compressible: {len(candidates)} weights, e.g. {', '.join(known[:4])})"
            )
    return "\n".join(lines)
