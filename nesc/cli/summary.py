"""``nesc summary``: the per-layer table of a registry model's plan (planned, fitted and frozen as
``compress`` would save it, with whatever ``passes.reuse`` folds; not saved), or of a saved artifact.

    nesc summary resnet18 --ratio 4               # plan + fit a model, print the per-layer table
    nesc summary resnet18_cifar.nesc              # summarise a saved artifact
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.text import Text

from nesc.api import freeze, load, transform
from nesc.cli.common import (
    ARTIFACT_SUFFIX,
    create_model,
    example_inputs,
    format_shape,
    is_artifact,
    model_spec,
    print_fit_errors,
    print_heading,
    print_plan_notes,
)
from nesc.cli.config import describe, given_config_flags, nes_config
from nesc.core import names
from nesc.core.errors import ConfigError
from nesc.report import build_report


def add_parser(commands, config: argparse.ArgumentParser) -> None:
    summary = commands.add_parser(
        "summary", parents=[config], help="per-layer table of a registry model's plan, or of a saved artifact",
        description="Plan and fit a registry model (not saved), or load a saved .nesc artifact, and print "
                    "the per-layer table: shape, pool, parameters and MAdd before and after.")
    summary.add_argument("model", metavar="MODEL", help=f"a registry model name or a {ARTIFACT_SUFFIX} artifact path")
    summary.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    if is_artifact(args.model):
        return _summarise_artifact(args, out, err)
    spec = model_spec(args.model)
    config = nes_config(args, spec)
    inputs = example_inputs(spec, args.input_size)
    with err.status(Text(f"capture, plan and fit {spec.name}")):
        # the factory's initial weights under config.seed: same run, same table
        gm = transform(create_model(spec, config.seed), inputs, config)
    print_heading(out, spec.name, f"input {format_shape(inputs[0].shape)}, {describe(config, args.params_of)}")
    out.print(build_report(freeze(gm)))  # what compress would save: routing maps, reuse applied
    print_plan_notes(out, gm)
    print_fit_errors(out, gm.meta.get(names.FIT_ERRORS, {}))
    return 0


def _summarise_artifact(args: argparse.Namespace, out: Console, err: Console) -> int:
    given = given_config_flags(args)
    if args.input_size is not None:
        given.append("--input-size")
    if given:
        raise ConfigError(
            f"cannot apply {', '.join(given)} to {args.model!r}: it is a saved artifact, already compressed. "
            f"Drop the flags to summarise it, or pass a registry model name to plan a new compression."
        )
    with err.status(Text(f"load {args.model}")):  # Text: a path is not markup
        gm = load(args.model)
    size = Path(args.model).stat().st_size
    print_heading(out, args.model, f"({size:,} bytes)")
    saved_config = gm.meta.get(names.EXTRA, {}).get("config")
    if saved_config:
        out.print(Text(f"saved with {saved_config}", style="dim"), soft_wrap=True)
    out.print(build_report(gm))
    return 0
