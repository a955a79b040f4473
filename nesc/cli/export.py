"""``nesc export -o FILE.onnx``: one compressed ONNX file that stores the pools and routing maps and
regenerates the weights with Gather + interpolation nodes.

    nesc export r18.nesc -o r18.onnx                  # an artifact: input shape from the artifact
    nesc export resnet18_cifar --ratio 4 -o r18.onnx  # compressed on the fly; its dense ONNX to compare

The onnx backend is an optional extra, so it is imported when the verb runs. ``-o/--out`` is checked
before any work; an existing file is replaced only with ``--force``. ``--onnx PATH``, the old spelling,
still works (with a deprecation note).
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table
from torch import fx

from nesc.api import export_onnx, freeze, load, transform
from nesc.cli.common import (
    FLOAT32_BYTES,
    Stages,
    check_out,
    create_model,
    example_inputs,
    format_shape,
    is_artifact,
    model_spec,
    print_heading,
)
from nesc.cli.config import describe, given_config_flags, nes_config
from nesc.cli.flags import (
    BACKEND_GROUP,
    add_config_flags,
    add_deprecated_alias,
    add_input_size,
    add_output_flags,
    model_group,
)
from nesc.cli.output import emit_json
from nesc.core import names
from nesc.core.errors import ConfigError, InputError
from nesc.core.inputs import from_specs
from nesc.report import build_report


def add_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="export a .nesc artifact or a registry model to compressed ONNX",
        description="Write one ONNX file that stores the epitome pools and routing maps and regenerates the "
                    "weights with Gather + interpolation nodes (simplified with onnxsim, without folding "
                    "them back). MODEL is a saved .nesc artifact (input shape from the artifact, or "
                    "--input-size) or a registry model name, compressed on the fly with the config flags; "
                    "a registry model's dense ONNX is exported the same way to compare sizes.")
    add_input_size(model_group(export, artifact=True))
    add_config_flags(export)
    backend = export.add_argument_group(BACKEND_GROUP)
    backend.add_argument("--no-simplify", action="store_true",
                         help="skip onnxsim (the raw exporter output; default: simplified)")
    backend.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default 18, the lowest supported)")
    output = add_output_flags(export, "where to write the .onnx file", None)
    add_deprecated_alias(output, "--onnx", "-o/--out", dest="out")
    export.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    from nesc.backends.onnx import DEFAULT_OPSET

    opset = DEFAULT_OPSET if args.opset is None else args.opset
    if args.out is None:
        raise InputError("nesc export needs -o/--out PATH: where to write the .onnx file")
    check_out(args, args.out, "-o/--out")
    stages = Stages(err)
    with stages.progress():
        frozen, inputs, dense, label = _source(args, stages)
        with stages.stage("export", f"{args.out} (opset {opset}{', dense too' if dense is not None else ''})"):
            report = export_onnx(frozen, inputs, args.out, simplify=not args.no_simplify, opset=opset, dense=dense,
                                 overwrite=args.force)
    print_heading(out, label, f"-> {report.path}, input {format_shape(inputs[0].shape[1:])} with a symbolic batch")
    out.print(_size_table(report, frozen))
    out.print(f"ops: {', '.join(report.ops)}")
    out.print(stages.times())
    if args.json:
        emit_json({"model": label, "onnx": report, "report": build_report(frozen).to_dict(), "seconds": stages.seconds})
    return 0


def _source(args: argparse.Namespace, stages: Stages):
    """(frozen model, example inputs, dense model or None, label) from an artifact or a registry name."""
    if not is_artifact(args.model):
        spec = model_spec(args.model)
        config = nes_config(args, spec)
        inputs = tuple(torch.cat([x, x]) for x in example_inputs(spec, args.input_size))  # batch 2
        dense = create_model(spec, config.seed).eval()
        gm = transform(dense, inputs, config, on_stage=stages.stage)
        with stages.stage("freeze", f"{spec.name}, {describe(config, args.params_of)}"):
            frozen = freeze(gm)
        return frozen, inputs, dense, spec.name
    given = given_config_flags(args)
    if given:
        raise ConfigError(f"cannot apply {', '.join(given)} to {args.model!r}: it is a saved artifact, already "
                          f"compressed. Drop the flags, or pass a registry model name to compress one.")
    with stages.stage("load", args.model):
        frozen = load(args.model)
    return frozen, _artifact_inputs(frozen, args), None, args.model


def _artifact_inputs(gm: fx.GraphModule, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """Inputs of the shapes the artifact recorded (at their recorded batch), or of ``--input-size``."""
    specs = gm.meta.get(names.INPUT_SPECS) or []
    if args.input_size is not None:
        if len(specs) > 1:
            raise InputError(f"--input-size sets one input, but {args.model!r} takes {len(specs)}; drop the flag to "
                             f"use the shapes saved in the artifact")
        specs = [((1, *args.input_size), specs[0][1] if specs else "float32")]
    if not specs:
        raise InputError(f"{args.model!r} records no input shape; pass --input-size D ... (without the batch "
                         f"dimension, e.g. --input-size 3 32 32)")
    return from_specs(specs, seed=0)


def _size_table(report, frozen: fx.GraphModule) -> Table:
    table = Table(title="ONNX file size")
    for col, justify in [("file", "left"), ("bytes", "right"), ("tensors", "right"), ("ratio", "right")]:
        table.add_column(col, justify=justify)
    table.add_row("compressed (pools + routing maps)", f"{report.file_bytes:,}", f"{report.tensor_bytes:,}", "1.00x")
    if report.dense_file_bytes is not None:
        table.add_row("dense, exported the same way", f"{report.dense_file_bytes:,}", f"{report.dense_tensor_bytes:,}",
                      f"{report.file_ratio:.2f}x")
    else:  # an artifact carries no dense model; its float32 weights are what a dense file would hold
        dense = build_report(frozen).dense_params * FLOAT32_BYTES
        table.add_row("dense float32 weights (not exported)", "-", f"{dense:,}",
                      f"{dense / report.tensor_bytes:.2f}x (tensors)")
    return table
