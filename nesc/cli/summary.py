"""``nesc summary``: the per-layer table of a registry model's plan (planned, fitted and frozen as
``compress`` would save it, with whatever ``passes.reuse`` folds; not saved), or of a saved artifact.

    nesc summary resnet18 --ratio 4               # plan + fit a model, print the per-layer table
    nesc summary resnet18_cifar.nesc              # summarise a saved artifact
    nesc summary mlp --flops --json | jq .flop_counter   # cross-check MAdd with torch.utils.flop_counter

``--flops`` counts the frozen model's FLOPs with ``torch.utils.flop_counter`` (``output.flop_count``)
next to nesc's MAdd column; ``--json`` prints the report, the plan notes, the fit errors, the FLOP
count and the timings as one JSON document.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.text import Text

from nesc.api import freeze, load, transform
from nesc.cli.common import (
    Stages,
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
from nesc.cli.flags import OUTPUT_GROUP, add_config_flags, add_input_size, add_report_flags, model_group
from nesc.cli.output import emit_json, flop_count
from nesc.core import names
from nesc.core.errors import ConfigError
from nesc.core.inputs import from_specs
from nesc.report import Report, build_report

STAGE_LABELS = {"fit": "fit pools"}


def add_parser(commands) -> None:
    summary = commands.add_parser(
        "summary", help="per-layer table of a registry model's plan, or of a saved artifact",
        description="Plan and fit a registry model (not saved), or load a saved .nesc artifact, and print "
                    "the per-layer table: shape, pool, parameters and MAdd before and after.")
    add_input_size(model_group(summary, artifact=True))
    add_config_flags(summary)
    output = summary.add_argument_group(OUTPUT_GROUP)
    output.add_argument("--flops", action="store_true",
                        help="also count FLOPs with torch.utils.flop_counter (MAdd = FLOPs / 2 for the ops nesc "
                             "counts; default off)")
    add_report_flags(output)
    summary.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    if is_artifact(args.model):
        return _summarise_artifact(args, out, err)
    spec = model_spec(args.model)
    config = nes_config(args, spec)
    inputs = example_inputs(spec, args.input_size)
    stages = Stages(err, STAGE_LABELS)
    with stages.progress():
        # the factory's initial weights under config.seed: same run, same table
        gm = transform(create_model(spec, config.seed), inputs, config, on_stage=stages.stage)
        with stages.stage("freeze"):
            frozen = freeze(gm)  # what compress would save: routing maps, reuse applied
    report = build_report(frozen)
    print_heading(out, spec.name, f"input {format_shape(inputs[0].shape)}, {describe(config, args.params_of)}")
    out.print(report)
    print_plan_notes(out, gm)
    errors = gm.meta.get(names.FIT_ERRORS, {})
    print_fit_errors(out, errors)
    flops = _print_flops(out, args, frozen, inputs, report)
    if args.json:
        emit_json({"model": spec.name, "input_shape": list(inputs[0].shape), "config": describe(config, args.params_of),
                   "report": report.to_dict(), "plan_notes": list(gm.meta[names.PLAN].notes), "fit_errors": errors,
                   "flop_counter": flops, "seconds": stages.seconds})
    return 0


def _print_flops(out: Console, args: argparse.Namespace, gm, inputs, report: Report) -> dict | None:
    """``--flops``: torch.utils.flop_counter's count of ``gm`` on ``inputs``, next to nesc's MAdd."""
    if not args.flops:
        return None
    flops = flop_count(gm, inputs)
    out.print(f"FLOPs per example (torch.utils.flop_counter): {flops['flops']:,} = {flops['madd']:,} MAdd x 2; "
              f"nesc's MAdd column: {report.madd:,} (weight-bearing ops; regeneration and adds not included)")
    return flops


def _summarise_artifact(args: argparse.Namespace, out: Console, err: Console) -> int:
    given = given_config_flags(args)
    if args.input_size is not None:
        given.append("--input-size")
    if given:
        raise ConfigError(
            f"cannot apply {', '.join(given)} to {args.model!r}: it is a saved artifact, already compressed. "
            f"Drop the flags to summarise it, or pass a registry model name to plan a new compression."
        )
    stages = Stages(err)
    with stages.progress(), stages.stage("load", args.model):
        gm = load(args.model)
    size = Path(args.model).stat().st_size
    print_heading(out, args.model, f"({size:,} bytes)")
    saved_config = gm.meta.get(names.EXTRA, {}).get("config")
    if saved_config:
        out.print(Text(f"saved with {saved_config}", style="dim"), soft_wrap=True)
    report = build_report(gm)
    out.print(report)
    specs = gm.meta.get(names.INPUT_SPECS) or []
    flops = _print_flops(out, args, gm, from_specs(specs, batch=1, seed=0), report) if specs else None
    if args.flops and not specs:
        out.print("FLOPs: the artifact records no input shape to count them with")
    if args.json:
        emit_json({"model": args.model, "artifact": args.model, "file_bytes": size, "config": saved_config,
                   "report": report.to_dict(), "flop_counter": flops, "seconds": stages.seconds})
    return 0
