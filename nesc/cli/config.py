"""From the NESConfig flags (``common.config_flags``) to a ``NESConfig``, and back to words.

The budget is one of ``--ratio R``, ``--params N`` or ``--params-of MODEL[@WIDTH]``: the last is the
dense size of another registry model, which is how a wide model is compressed to a narrow one's size
(DESIGN.md, "wide at equal size"):

    nesc compress cnn1d --width 2 --params-of cnn1d --dataset mnist1d   # 2x-wide cnn1d, dense cnn1d's size

MODEL is built with the classes of the model being compressed (the dataset's with ``--dataset``) and
at width multiplier WIDTH (default: its factory's). Its count is checked before any work against the
dense size of the model being compressed (``--width`` included): a larger budget compresses nothing.
"""

from __future__ import annotations

import argparse

from nesc.cli.common import has_width, model_spec, width_kwargs
from nesc.core.config import NESConfig
from nesc.core.errors import InputError
from nesc.models import ModelSpec, dense_params

# NESConfig fields the command line sets, and the flag that sets each (for messages).
CONFIG_FLAGS = {"ratio": "--ratio", "param_budget": "--params", "policy": "--policy",
                "min_params": "--min-params", "learner": "--learner", "pool_extent": "--pool-extent",
                "reuse": "--reuse"}
PARAMS_OF = "--params-of"  # sets param_budget too, counted by params_of_budget


def nes_config(args: argparse.Namespace, spec: ModelSpec, num_classes: int | None = None) -> NESConfig:
    """The ``NESConfig`` of the flags the user set, for compressing ``spec``'s model with ``num_classes``
    classes (default the spec's). Flags left unset (None) take NESConfig's defaults, and NESConfig
    validates every value."""
    changes = {field: getattr(args, _dest(flag)) for field, flag in CONFIG_FLAGS.items()}
    if args.params_of is not None:
        changes["param_budget"] = params_of_budget(args, spec, num_classes or spec.num_classes)
    return NESConfig(**{field: value for field, value in changes.items() if value is not None})


def given_config_flags(args: argparse.Namespace) -> list[str]:
    """The NESConfig flags the user set, for verbs that refuse them on a saved artifact."""
    given = [flag for field, flag in CONFIG_FLAGS.items() if getattr(args, _dest(flag)) is not None]
    return given + ([PARAMS_OF] if args.params_of is not None else [])


def params_of_budget(args: argparse.Namespace, spec: ModelSpec, num_classes: int) -> int:
    """``--params-of MODEL[@WIDTH]`` as a parameter count: MODEL's dense size with ``num_classes`` classes,
    no larger than that of ``spec``'s model at ``--width`` (the model being compressed)."""
    flag = f"{PARAMS_OF} {args.params_of}"
    name, width = parse_params_of(args.params_of)
    try:
        reference = model_spec(name)
    except InputError as e:  # the did-you-mean, said of this flag
        raise InputError(f"{flag}: {e}") from None
    wide = getattr(args, "width", None)  # only the verbs that train have --width
    drop = "@" + args.params_of.partition("@")[2]
    budget = dense_params(reference.name, num_classes=num_classes, **width_kwargs(reference, width, flag, drop))
    own = dense_params(spec.name, num_classes=num_classes, **width_kwargs(spec, wide, "--width", "--width"))
    if budget > own:
        compressed = f"dense {spec.name}" + (f" at width {wide:g}" if wide is not None else "")
        widen = ""
        if hasattr(args, "width") and has_width(spec):  # compress: --width needs --dataset
            widen = ", or widen the model being compressed (--width" + ("" if args.dataset else " with --dataset") + ")"
        raise InputError(
            f"{flag}: the budget, {budget:,} parameters ({params_of_label(args.params_of)}, {num_classes} classes), "
            f"exceeds the {own:,} parameters of the model being compressed ({compressed}, {num_classes} classes): "
            f"there is nothing to compress. Name a smaller MODEL or WIDTH{widen}")
    return budget


def parse_params_of(text: str) -> tuple[str, float | None]:
    """``MODEL[@WIDTH]`` as (MODEL, WIDTH or None). WIDTH must read as a number (``width_kwargs`` then
    checks that it is positive and that MODEL has a width multiplier)."""
    name, at, width = text.partition("@")
    if not at:
        return name, None
    try:
        return name, float(width)
    except ValueError:
        raise InputError(f"{PARAMS_OF} {text}: WIDTH {width!r} is not a number; write MODEL@WIDTH with a positive "
                         f"width multiplier, e.g. {name or 'cnn1d'}@0.5, or MODEL alone for its default width") from None


def params_of_label(text: str) -> str:
    """``dense cnn1d`` or ``dense cnn1d at width 0.5``: what a ``--params-of`` budget is the size of."""
    name, width = parse_params_of(text)
    return f"dense {name}" + (f" at width {width:g}" if width is not None else "")


# -------------------------------------------------------------------------------------- printing


def describe(config: NESConfig, params_of: str | None = None) -> str:
    """``budget 32,618 params (= dense cnn1d), policy per_layer, min_params 1,024``; ``params_of`` is the
    ``--params-of`` text the budget came from, if it did."""
    return (f"{budget(config, params_of)}, policy {config.policy}, min_params {config.min_params:,}"
            + (", learner" if config.learner else "") + (f", reuse {config.reuse}" if config.reuse else ""))


def budget(config: NESConfig, params_of: str | None = None) -> str:
    if config.param_budget is None:
        return f"ratio {config.ratio:g}x"
    origin = f" (= {params_of_label(params_of)})" if params_of is not None else ""
    return f"budget {config.param_budget:,} params{origin}"


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
