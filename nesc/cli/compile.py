"""``nesc compile``: build a registry model (compressed on the fly) or a saved artifact with Apache TVM
into a deployable library and its parameters file.

    nesc compile resnet18_cifar -o r18.so --compare-dense   # compress, freeze, build, export; + dense size
    nesc compile r18.nesc -o r18-arm64.so --target aarch64
    nesc compile mlp -o mlp.so --regenerate per_call     # weights rebuilt in every call: less memory

``nesc/backends/tvm/runtime.py`` runs the exported files with tvm and numpy only. TVM is an optional
extra, so its modules are imported when the verb runs, not when the command line starts. Both files
(``-o/--out`` and the parameters file next to it) are checked before any work; existing ones are replaced
only with ``--force``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from torch import fx

from nesc.api import REGENERATE_DEFAULT
from nesc.api import compile as tvm_compile
from nesc.api import freeze, load, transform
from nesc.cli.common import (
    FLOAT32_BYTES,
    Stages,
    check_out,
    create_model,
    example_inputs,
    format_bytes,
    format_shape,
    is_artifact,
    model_spec,
    print_heading,
)
from nesc.cli.config import nes_config
from nesc.cli.flags import BACKEND_GROUP, add_config_flags, add_init, add_input_size, add_output_flags, model_group
from nesc.cli.output import emit_json
from nesc.core import names
from nesc.core.errors import InputError
from nesc.core.inputs import from_specs
from nesc.report import build_report


def add_parser(commands) -> None:
    compile_ = commands.add_parser(
        "compile", help="build a model with TVM into a deployable .so (+ .params.safetensors)",
        description="Compress a registry model (or load a saved .nesc artifact), build it with Apache TVM "
                    "and export the library and its parameters file; runtime.py runs them with tvm and numpy.")
    model = model_group(compile_, artifact=True)
    add_init(model)
    add_input_size(model)
    add_config_flags(compile_)
    backend = compile_.add_argument_group(BACKEND_GROUP)
    backend.add_argument("--target", default="llvm", help="llvm (this CPU), aarch64 (cross) or cuda (default llvm)")
    backend.add_argument("--tune", metavar="N|Ss", help="MetaSchedule budget: N trials or S seconds ('120s'; "
                                                        "default: no tuning)")
    backend.add_argument("--batch", type=int, default=1, help="batch size the library is built for (default 1)")
    backend.add_argument("--dynamic-batch", action="store_true",
                         help="one library for any batch size (about 2x slower in the VM; no tuning; default off)")
    backend.add_argument("--regenerate", choices=("once", "per_call"), default=REGENERATE_DEFAULT,
                         help="once: weights rebuilt from the pools when the model loads (dense speed); "
                              f"per_call: in every call (less memory; default {REGENERATE_DEFAULT})")
    backend.add_argument("--cache-dir", type=Path, help="tuning database folder (default ~/.cache/nesc/tvm)")
    backend.add_argument("--compare-dense", action="store_true",
                         help="also build the dense registry model the same way and print its deployed size "
                              "(default off)")
    add_output_flags(compile_, "the library to write (.so; its parameters file goes next to it, and --force "
                               "replaces both)", None)
    compile_.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    target, tune = _check(args)
    stages = Stages(err, {"fit": "fit pools"})
    with stages.progress():
        frozen, inputs = _frozen(args, stages)
        with stages.stage("compile", f"for {target.name}, regenerate {args.regenerate}"
                          + (f", tuning {args.tune} (MetaSchedule)" if tune else "")):
            compiled = tvm_compile(frozen, inputs, target, tune=tune, cache_dir=args.cache_dir,
                                   dynamic_batch=args.dynamic_batch, regenerate=args.regenerate)
        with stages.stage("export", str(args.out)):
            files = compiled.export_library(args.out, overwrite=args.force)
        dense_bytes = None
        if args.compare_dense:
            with stages.stage("dense", "compile and export the dense model the same way"):
                dense_bytes = _dense_deployed_bytes(args, inputs, target, tune)
    report = build_report(frozen)
    print_heading(out, args.model,
                  f"compiled for {target.name} ({target.describe}), input {format_shape(inputs[0].shape)}")
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in compiled.bytes_by_kind().items())
    dense = report.dense_params * FLOAT32_BYTES
    out.print(f"library: {files.library} {format_bytes(files.library_bytes)}")
    out.print(f"parameters: {files.params} {format_bytes(files.params_bytes)} ({kinds} bytes)")
    out.print(f"dense float32 weights {format_bytes(dense)}; "
              f"parameters {dense / max(compiled.param_bytes, 1):.2f}x smaller")
    if args.compare_dense:
        out.print(f"deployed: {format_bytes(files.total_bytes)}; the dense model built the same way: "
                  f"{format_bytes(dense_bytes)} ({dense_bytes / max(files.total_bytes, 1):.2f}x)")
    if compiled.tuning is not None:
        t = compiled.tuning
        out.print(f"tuning: {len(t.tuned)} kernels tuned ({t.trials} trials, {t.seconds:.0f}s), {len(t.reused)} "
                  f"from the cache, {len(t.small)} too small to tune; database {t.database}")
    out.print(stages.times())
    if args.json:
        emit_json({"model": args.model, "target": target.name, "input_shape": list(inputs[0].shape),
                   "library": files.library, "library_bytes": files.library_bytes, "params": files.params,
                   "params_bytes": files.params_bytes, "param_bytes_by_kind": compiled.bytes_by_kind(),
                   "dense_float32_bytes": dense, "dense_deployed_bytes": dense_bytes,
                   "tuning": compiled.tuning, "report": report.to_dict(), "seconds": stages.seconds})
    return 0


def _check(args: argparse.Namespace):
    """(target, tune config), after every flag is checked: fail before the work, not after it."""
    from nesc.backends.tvm.runtime import params_path
    from nesc.backends.tvm.targets import get_target
    from nesc.backends.tvm.tune import as_tune_config

    if args.out is None:
        raise InputError("nesc compile needs -o/--out PATH: the library to write (.so)")
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1; got {args.batch}")
    if args.dynamic_batch and args.tune:
        raise InputError("--dynamic-batch and --tune exclude each other: tuning needs a static batch (--batch B)")
    target, tune = get_target(args.target), as_tune_config(args.tune)
    if args.out.suffix != ".so":
        raise InputError(f"-o/--out {str(args.out)!r} must end in .so (a shared library)")
    if args.compare_dense and is_artifact(args.model):
        raise InputError(f"--compare-dense needs a registry model name, not the artifact {args.model!r}: "
                         f"an artifact holds no dense weights to build")
    check_out(args, args.out, "-o/--out")
    check_out(args, params_path(args.out), "-o/--out's parameters file")
    return target, tune


def _frozen(args: argparse.Namespace, stages: Stages) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """(frozen model, example inputs at --batch) from a saved artifact or a freshly compressed registry model
    (transform's stages shown one by one)."""
    if is_artifact(args.model):
        with stages.stage("load", args.model):
            frozen = load(args.model)
        return frozen, from_specs(frozen.meta[names.INPUT_SPECS], batch=args.batch, seed=0)
    spec = model_spec(args.model)
    config = nes_config(args, spec)
    inputs = tuple(x.expand(args.batch, *x.shape[1:]).contiguous() for x in example_inputs(spec, args.input_size))
    model = create_model(spec, config.seed, args.init)
    gm = transform(model, inputs, config, on_stage=stages.stage)
    with stages.stage("freeze"):
        return freeze(gm), inputs


def _dense_deployed_bytes(args: argparse.Namespace, inputs: tuple, target, tune) -> int:
    """Library + parameters file of the dense registry model (the weights compress started from)."""
    spec = model_spec(args.model)
    model = create_model(spec, nes_config(args, spec).seed, args.init)
    with tempfile.TemporaryDirectory() as folder:
        files = tvm_compile(model.eval(), inputs, target, tune=tune, cache_dir=args.cache_dir,
                            dynamic_batch=args.dynamic_batch, regenerate=args.regenerate).export_library(
                                Path(folder) / "dense.so")
        return files.total_bytes
