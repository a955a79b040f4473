"""The ``nesc`` command line: the public verbs for registry models and saved artifacts.

    nesc models                                   # the reference models: params, input shapes
    nesc summary resnet18 --ratio 4               # plan + fit a model, print the per-layer table
    nesc summary resnet18_cifar.nesc              # summarise a saved artifact
    nesc compress resnet18_cifar --init dense.pt  # transform, fit, freeze, save resnet18_cifar.nesc
    nesc train resnet_fmnist --dataset fashion_mnist                   # train a dense model (nesc/cli_train.py)
    nesc compress resnet_fmnist --dataset fashion_mnist --ratio 4      # train, compress, fine-tune, freeze, save
    nesc export r18.nesc --onnx r18.onnx          # compressed ONNX: pools + routing maps, weights as ops

Tables go to stdout, progress and errors to stderr. Every ``nesc.NescError`` (and an unknown model
name) is printed as one red message without a traceback and exits with 2, like an argparse usage
error. ``main(argv)`` returns the exit code, so tests and scripts can call it in-process.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from torch import fx

import nesc
from nesc import api, cli_train
from nesc.core import names
from nesc.core.config import POLICIES, NESConfig
from nesc.core.errors import ConfigError, InputError, NescError
from nesc.models import ModelSpec, get_spec, list_models
from nesc.report import Report

DEFAULT_MODEL = "resnet18_cifar"
ARTIFACT_SUFFIX = ".nesc"
USAGE_ERROR = 2  # the code argparse uses for usage errors; nesc's own errors share it
INTERRUPTED = 130
# Width for output that goes to a pipe or a file: there is no terminal to fit, and a fixed width keeps
# the tables unwrapped and the output identical from run to run. $COLUMNS still wins.
PIPE_WIDTH = 160
FLOAT32_BYTES = 4
# NESConfig fields the command line sets, and the flag that sets each (for messages).
CONFIG_FLAGS = {"ratio": "--ratio", "param_budget": "--params", "policy": "--policy",
                "min_params": "--min-params", "learner": "--learner"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed its message
        return e.code if isinstance(e.code, int) else (0 if e.code is None else USAGE_ERROR)
    out, err = _console(stderr=False), _console(stderr=True)
    try:
        return args.run(args, out, err)
    except NescError as e:
        _print_error(err, str(e))
        return USAGE_ERROR
    except KeyboardInterrupt:
        _print_error(err, "interrupted")
        return INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nesc", description="Neural Epitome Search as a compiler: compress PyTorch models into shared "
                                 "epitome pools.")
    parser.add_argument("--version", action="version",
                        version=f"nesc {nesc.__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="list the registry's reference models")
    models.set_defaults(run=run_models)

    config = _config_flags()
    summary = commands.add_parser(
        "summary", parents=[config], help="per-layer table of a registry model's plan, or of a saved artifact",
        description="Plan and fit a registry model (not saved), or load a saved .nesc artifact, and print "
                    "the per-layer table: shape, pool, parameters and MAdd before and after.")
    summary.add_argument("model", metavar="MODEL", help=f"a registry model name or a {ARTIFACT_SUFFIX} artifact path")
    summary.set_defaults(run=run_summary)

    training = cli_train.training_flags()
    compress = commands.add_parser(
        "compress", parents=[config, training], help="transform, fit, freeze and save a model as a .nesc artifact",
        description="Build a registry model (optionally from a local dense checkpoint), fit its epitome "
                    "pools to the dense weights, freeze the routing maps and save one .nesc artifact.")
    compress.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL,
                          help=f"a registry model name (default: {DEFAULT_MODEL})")
    compress.add_argument("--init", metavar="CHECKPOINT", type=Path,
                          help="local dense checkpoint (.safetensors or .pt state_dict) to start from")
    compress.add_argument("--out", metavar="PATH", type=Path,
                          help=f"where to write the artifact (default: ./MODEL{ARTIFACT_SUFFIX})")
    compress.set_defaults(run=run_compress)
    _add_compile_command(commands, config)
    cli_train.add_compress_flags(compress)
    cli_train.add_train_parser(commands, [training])
    _add_export_command(commands, config)
    return parser


def _config_flags() -> argparse.ArgumentParser:
    """The NESConfig flags shared by summary and compress. Defaults are None so that we can tell what
    the user set; NESConfig supplies the real defaults and validates every value."""
    group = argparse.ArgumentParser(add_help=False)
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, metavar="R",
                        help=f"store 1/R of the dense parameters (R >= 1; default {NESConfig.ratio:g})")
    budget.add_argument("--params", type=int, metavar="N", help="parameter budget for the whole model")
    group.add_argument("--policy", choices=POLICIES, help="which layers share a pool (default per_layer)")
    group.add_argument("--min-params", type=int, metavar="N",
                       help=f"weights with fewer elements stay dense (default {NESConfig.min_params})")
    group.add_argument("--learner", action="store_true", default=None,
                       help="feature-conditioned transformation learner for start indices (the paper's mode)")
    group.add_argument("--input-size", type=int, nargs="+", metavar="D",
                       help="example input shape without the batch dimension, e.g. 3 64 64 "
                            "(default: the model's registered shape)")
    return group


# ------------------------------------------------------------------------------------------ commands


def run_models(args: argparse.Namespace, out: Console, err: Console) -> int:
    table = Table(title=f"nesc models ({len(list_models())} registered)")
    for col, justify in [("name", "left"), ("family", "left"), ("params", "right"), ("input", "left"),
                         ("test input", "left"), ("classes", "right")]:
        table.add_column(col, justify=justify)
    with err.status(Text("building models to count their parameters")):
        for name in list_models():
            spec = get_spec(name)
            params = sum(p.numel() for p in spec.create().parameters())
            table.add_row(name, spec.family, f"{params:,}", _shape(spec.input_shape),
                          _shape(spec.test_input_shape), str(spec.num_classes))
    out.print(table)
    return 0


def run_summary(args: argparse.Namespace, out: Console, err: Console) -> int:
    if _is_artifact(args.model):
        return _summarise_artifact(args, out, err)
    spec, config = _spec(args.model), _config(args)
    inputs = _example_inputs(spec, args.input_size)
    with err.status(Text(f"capture, plan and fit {spec.name}")):
        torch.manual_seed(config.seed)  # the factory's initial weights: same run, same table
        gm = nesc.transform(spec.create(), inputs, config)
    _print_heading(out, spec.name, f"input {_shape(inputs[0].shape)}, {_describe(config)}")
    out.print(nesc.summary(gm, print_table=False))
    _print_plan_notes(out, gm)
    _print_fit_errors(out, gm.meta.get(api.FIT_ERRORS, {}))
    return 0


def run_compress(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.dataset is not None:  # train dense, compress, fine-tune, freeze, save: nesc/cli_train.py
        return cli_train.run_compress_trained(args, out, err)
    cli_train.check_training_flags_unused(args)
    spec, config = _spec(args.model), _config(args)
    inputs = _example_inputs(spec, args.input_size)
    path = args.out if args.out is not None else Path(f"{spec.name}{ARTIFACT_SUFFIX}")
    _check_writable(path)
    stages = Stages(err)
    with stages.progress():
        with stages.stage("build", spec.name + (f" from {args.init}" if args.init else "")):
            torch.manual_seed(config.seed)
            model = spec.create()
            if args.init is not None:
                nesc.load_checkpoint(model, args.init)
        with stages.stage("capture + plan"):
            gm = nesc.transform(model, inputs, config.replace(init="random"))
        with stages.stage("fit pools"):  # what transform does for init="dense", timed on its own
            api.fit_to_model(gm, model)
            gm.meta[api.CONFIG] = config
        with stages.stage("freeze"):
            frozen = nesc.freeze(gm)
        with stages.stage("save", str(path)):
            nesc.save(frozen, path)
    report = nesc.summary(frozen, print_table=False)
    _print_heading(out, spec.name, f"input {_shape(inputs[0].shape)}, {_describe(config)}")
    out.print(report)
    _print_plan_notes(out, gm)
    out.print(f"ratio: {report.ratio:.2f}x achieved (asked: {_budget(config)})")
    _print_fit_errors(out, gm.meta[api.FIT_ERRORS])
    if args.init is None:
        out.print(Text("  (no --init checkpoint: the pools were fitted to the model's random initial weights)",
                       style="dim"))
    _print_sizes(out, path, report)
    out.print("time: " + ", ".join(f"{label} {s:.1f}s" for label, s in stages.seconds.items())
              + f"; total {sum(stages.seconds.values()):.1f}s")
    return 0


def _summarise_artifact(args: argparse.Namespace, out: Console, err: Console) -> int:
    given = [flag for field, flag in CONFIG_FLAGS.items() if getattr(args, _dest(flag)) is not None]
    if args.input_size is not None:
        given.append("--input-size")
    if given:
        raise ConfigError(
            f"cannot apply {', '.join(given)} to {args.model!r}: it is a saved artifact, already compressed. "
            f"Drop the flags to summarise it, or pass a registry model name to plan a new compression."
        )
    with err.status(Text(f"load {args.model}")):  # Text: a path is not markup
        gm = nesc.load(args.model)
    size = Path(args.model).stat().st_size
    _print_heading(out, args.model, f"({size:,} bytes)")
    saved_config = gm.meta.get("nesc_extra", {}).get("config")
    if saved_config:
        out.print(Text(f"saved with {saved_config}", style="dim"), soft_wrap=True)
    out.print(nesc.summary(gm, print_table=False))
    return 0


# ---------------------------------------------------------------------------------------- arguments


def _is_artifact(model: str) -> bool:
    """A registry name wins; otherwise anything that looks like a file is read as an artifact."""
    if model in list_models():
        return False
    return model.endswith(ARTIFACT_SUFFIX) or os.sep in model or Path(model).is_file()


def _spec(name: str) -> ModelSpec:
    try:
        return get_spec(name)
    except KeyError as e:
        near = difflib.get_close_matches(name, list_models(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise InputError(f"{e.args[0]}{hint} (`nesc models` lists them with their input shapes)") from None


def _config(args: argparse.Namespace) -> NESConfig:
    changes = {field: getattr(args, _dest(flag)) for field, flag in CONFIG_FLAGS.items()}
    return NESConfig(**{field: value for field, value in changes.items() if value is not None})


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _example_inputs(spec: ModelSpec, size: list[int] | None) -> tuple[torch.Tensor, ...]:
    if size is None:
        return spec.example_inputs(1)
    if len(size) != len(spec.input_shape) or any(d < 1 for d in size):
        raise InputError(
            f"--input-size {' '.join(map(str, size))} does not fit {spec.name}: it takes inputs of "
            f"{len(spec.input_shape)} positive sizes without the batch dimension, e.g. "
            f"--input-size {' '.join(map(str, spec.input_shape))}"
        )
    generator = torch.Generator().manual_seed(0)
    return (torch.randn((1, *size), generator=generator),)


def _check_writable(path: Path) -> None:
    """Fail before the work, not after it: a missing folder or a folder given as the file."""
    if path.is_dir():
        raise InputError(f"--out {str(path)!r} is a directory; pass a file path such as {str(path / 'model.nesc')!r}")
    if not path.parent.is_dir():
        raise InputError(f"--out {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first")


# ------------------------------------------------------------------------------------------- output


class Stages:
    """Named stages under a spinner (on a terminal only) and how long each took, in seconds."""

    def __init__(self, console: Console) -> None:
        self.seconds: dict[str, float] = {}
        self._bar = Progress(SpinnerColumn(finished_text=Text("done", style="green")),
                             TextColumn("{task.description}", markup=False),
                             TimeElapsedColumn(), console=console,
                             disable=not console.is_terminal)

    @contextmanager
    def progress(self) -> Iterator[None]:
        with self._bar:
            yield

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        task = self._bar.add_task(f"{name} {detail}".strip(), total=1)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self._bar.update(task, completed=1)


def _console(stderr: bool) -> Console:
    # No markup: paths, layer names and config reprs are printed as they are, brackets included.
    console = Console(stderr=stderr, highlight=False, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


def _print_error(err: Console, message: str) -> None:
    # soft_wrap: one paragraph, no line breaks of ours; the terminal wraps it.
    err.print(Text.assemble(("error: ", "bold red"), (message, "red")), soft_wrap=True)


def _print_heading(out: Console, name: str, rest: str) -> None:
    out.print(Text.assemble((name, "bold"), " ", rest))


def _print_plan_notes(out: Console, gm: fx.GraphModule) -> None:
    notes = gm.meta[names.PLAN].notes
    out.print("plan notes:" if notes else "plan notes: none (the budget overrode no preference)")
    for note in notes:
        out.print(f"  - {note}")


def _print_fit_errors(out: Console, errors: dict[str, float]) -> None:
    if not errors:
        out.print("reconstruction error: no layer was compressed")
        return
    worst = max(errors, key=errors.__getitem__)
    mean = sum(errors.values()) / len(errors)
    out.print(f"reconstruction error ||W_hat - W|| / ||W|| over {len(errors)} layers: mean {mean:.4f}, "
              f"max {errors[worst]:.4f} ({worst})")


def _print_sizes(out: Console, path: Path, report: Report) -> None:
    size, dense = path.stat().st_size, report.dense_params * FLOAT32_BYTES
    out.print(f"artifact: {path} {_bytes(size)}; dense float32 {_bytes(dense)}; {dense / max(size, 1):.2f}x smaller")


def _describe(config: NESConfig) -> str:
    return (f"{_budget(config)}, policy {config.policy}, min_params {config.min_params:,}"
            + (", learner" if config.learner else ""))


def _budget(config: NESConfig) -> str:
    if config.param_budget is not None:
        return f"budget {config.param_budget:,} params"
    return f"ratio {config.ratio:g}x"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"


# ----------------------------------------------------------------------------- compile (TVM backend)


def _add_compile_command(commands, config: argparse.ArgumentParser) -> None:
    compile_ = commands.add_parser(
        "compile", parents=[config], help="build a model with TVM into a deployable .so (+ .params.safetensors)",
        description="Compress a registry model (or load a saved .nesc artifact), build it with Apache TVM "
                    "and export the library and its parameters file; runtime.py runs them with tvm and numpy.")
    compile_.add_argument("model", metavar="MODEL_OR_ARTIFACT",
                          help=f"a registry model name or a {ARTIFACT_SUFFIX} artifact path")
    compile_.add_argument("-o", "--out", metavar="PATH", type=Path, required=True, help="the library to write (.so)")
    compile_.add_argument("--target", default="llvm", help="llvm (this CPU, default), aarch64 (cross) or cuda")
    compile_.add_argument("--tune", metavar="N|Ss", help="MetaSchedule budget: N trials or S seconds ('120s')")
    compile_.add_argument("--batch", type=int, default=1, help="batch size the library is built for (default 1)")
    compile_.add_argument("--dynamic-batch", action="store_true",
                          help="one library for any batch size (about 2x slower in the VM; no tuning)")
    compile_.add_argument("--cache-dir", type=Path, help="tuning database folder (default ~/.cache/nesc/tvm)")
    compile_.add_argument("--init", metavar="CHECKPOINT", type=Path,
                          help="local dense checkpoint (.safetensors or .pt state_dict) to start from")
    compile_.add_argument("--compare-dense", action="store_true",
                          help="also build the dense registry model the same way and print its deployed size")
    compile_.set_defaults(run=run_compile)


def run_compile(args: argparse.Namespace, out: Console, err: Console) -> int:
    from nesc.backends.tvm.build import compile as tvm_compile
    from nesc.backends.tvm.targets import get_target
    from nesc.backends.tvm.tune import as_tune_config

    if args.batch < 1:
        raise InputError(f"--batch must be >= 1; got {args.batch}")
    if args.dynamic_batch and args.tune:
        raise InputError("--dynamic-batch and --tune exclude each other: tuning needs a static batch (--batch B)")
    target, tune = get_target(args.target), as_tune_config(args.tune)  # fail before the work
    if args.out.suffix != ".so":
        raise InputError(f"-o {str(args.out)!r} must end in .so (a shared library)")
    _check_writable(args.out)
    if args.compare_dense and _is_artifact(args.model):
        raise InputError(f"--compare-dense needs a registry model name, not the artifact {args.model!r}: "
                         f"an artifact holds no dense weights to build")
    stages = Stages(err)
    with stages.progress():
        with stages.stage("load" if _is_artifact(args.model) else "compress", args.model):
            frozen, inputs = _frozen_for_compile(args)
        with stages.stage("compile", f"for {target.name}" + (f", tuning {args.tune}" if tune else "")):
            compiled = tvm_compile(frozen, inputs, target, tune=tune, cache_dir=args.cache_dir,
                                   dynamic_batch=args.dynamic_batch)
        with stages.stage("export", str(args.out)):
            files = compiled.export_library(args.out)
        if args.compare_dense:
            with stages.stage("dense", "compile and export the dense model the same way"):
                dense_bytes = _dense_deployed_bytes(args, inputs, target, tune)
    report = nesc.summary(frozen, print_table=False)
    _print_heading(out, args.model, f"compiled for {target.name} ({target.describe}), input {_shape(inputs[0].shape)}")
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in compiled.bytes_by_kind().items())
    dense = report.dense_params * FLOAT32_BYTES
    out.print(f"library: {files.library} {_bytes(files.library_bytes)}")
    out.print(f"parameters: {files.params} {_bytes(files.params_bytes)} ({kinds} bytes)")
    out.print(f"dense float32 weights {_bytes(dense)}; parameters {dense / max(compiled.param_bytes, 1):.2f}x smaller")
    if args.compare_dense:
        out.print(f"deployed: {_bytes(files.total_bytes)}; the dense model built the same way: {_bytes(dense_bytes)} "
                  f"({dense_bytes / max(files.total_bytes, 1):.2f}x)")
    if compiled.tuning is not None:
        t = compiled.tuning
        out.print(f"tuning: {len(t.tuned)} kernels tuned ({t.trials} trials, {t.seconds:.0f}s), {len(t.reused)} "
                  f"from the cache, {len(t.small)} too small to tune; database {t.database}")
    out.print("time: " + ", ".join(f"{label} {s:.1f}s" for label, s in stages.seconds.items()))
    return 0


def _dense_deployed_bytes(args: argparse.Namespace, inputs: tuple, target, tune) -> int:
    """Library + parameters file of the dense registry model (the weights compress started from)."""
    import tempfile

    from nesc.backends.tvm.build import compile as tvm_compile

    torch.manual_seed(_config(args).seed)
    model = _spec(args.model).create()
    if args.init is not None:
        nesc.load_checkpoint(model, args.init)
    with tempfile.TemporaryDirectory() as folder:
        files = tvm_compile(model.eval(), inputs, target, tune=tune, cache_dir=args.cache_dir,
                            dynamic_batch=args.dynamic_batch).export_library(Path(folder) / "dense.so")
        return files.total_bytes


def _frozen_for_compile(args: argparse.Namespace) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """(frozen model, example inputs at --batch) from a saved artifact or a freshly compressed registry model."""
    if _is_artifact(args.model):
        frozen = nesc.load(args.model)
        generator = torch.Generator().manual_seed(0)
        specs = frozen.meta[names.INPUT_SPECS]
        return frozen, tuple(torch.randn((args.batch, *shape[1:]), generator=generator, dtype=getattr(torch, dtype))
                             for shape, dtype in specs)
    spec, config = _spec(args.model), _config(args)
    inputs = tuple(x.expand(args.batch, *x.shape[1:]).contiguous() for x in _example_inputs(spec, args.input_size))
    torch.manual_seed(config.seed)
    model = spec.create()
    if args.init is not None:
        nesc.load_checkpoint(model, args.init)
    return nesc.freeze(nesc.transform(model, inputs, config)), inputs
# ----------------------------------------------------------------------------------- nesc export


def _add_export_command(commands, config: argparse.ArgumentParser) -> None:
    export = commands.add_parser(
        "export", parents=[config], help="export a .nesc artifact or a registry model to compressed ONNX",
        description="Write one ONNX file that stores the epitome pools and routing maps and regenerates the "
                    "weights with Gather + interpolation nodes (simplified with onnxsim, without folding "
                    "them back). MODEL is a saved .nesc artifact (input shape from the artifact, or "
                    "--input-size) or a registry model name, compressed on the fly with the config flags; "
                    "a registry model's dense ONNX is exported the same way to compare sizes.")
    export.add_argument("model", metavar="MODEL", help=f"a {ARTIFACT_SUFFIX} artifact path or a registry model name")
    export.add_argument("--onnx", metavar="OUT", type=Path, required=True, help="where to write the .onnx file")
    export.add_argument("--no-simplify", action="store_true", help="skip onnxsim (the raw exporter output)")
    export.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default 18, the lowest supported)")
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace, out: Console, err: Console) -> int:
    from nesc.backends import onnx as onnx_backend

    opset = onnx_backend.DEFAULT_OPSET if args.opset is None else args.opset
    stages = Stages(err)
    with stages.progress():
        frozen, inputs, dense, label = _export_source(args, stages)
        with stages.stage("export", f"{args.onnx} (opset {opset}{', dense too' if dense is not None else ''})"):
            report = nesc.export_onnx(frozen, inputs, args.onnx, simplify=not args.no_simplify, opset=opset,
                                      dense=dense)
    _print_heading(out, label, f"-> {report.path}, input {_shape(inputs[0].shape[1:])} with a symbolic batch")
    out.print(_export_table(report, frozen))
    out.print(f"ops: {', '.join(report.ops)}")
    out.print("time: " + ", ".join(f"{name} {s:.1f}s" for name, s in stages.seconds.items()))
    return 0


def _export_source(args: argparse.Namespace, stages: Stages):
    """(frozen model, example inputs, dense model or None, label) from an artifact or a registry name."""
    if not _is_artifact(args.model):
        spec, config = _spec(args.model), _config(args)
        inputs = tuple(torch.cat([x, x]) for x in _example_inputs(spec, args.input_size))  # batch 2
        with stages.stage("compress", f"{spec.name}, {_describe(config)}"):
            torch.manual_seed(config.seed)
            dense = spec.create().eval()
            frozen = nesc.freeze(nesc.transform(dense, inputs, config))
        return frozen, inputs, dense, spec.name
    given = [flag for field, flag in CONFIG_FLAGS.items() if getattr(args, _dest(flag)) is not None]
    if given:
        raise ConfigError(f"cannot apply {', '.join(given)} to {args.model!r}: it is a saved artifact, already "
                          f"compressed. Drop the flags, or pass a registry model name to compress one.")
    with stages.stage("load", args.model):
        frozen = nesc.load(args.model)
    return frozen, _artifact_inputs(frozen, args), None, args.model


def _artifact_inputs(gm: fx.GraphModule, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    specs = gm.meta.get(names.INPUT_SPECS) or []
    if args.input_size is not None:
        if len(specs) > 1:
            raise InputError(f"--input-size sets one input, but {args.model!r} takes {len(specs)}; drop the flag to "
                             f"use the shapes saved in the artifact")
        specs = [((1, *args.input_size), specs[0][1] if specs else "float32")]
    if not specs:
        raise InputError(f"{args.model!r} records no input shape; pass --input-size D ... (without the batch "
                         f"dimension, e.g. --input-size 3 32 32)")
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(tuple(shape), generator=generator, dtype=getattr(torch, dtype)) for shape, dtype in specs)


def _export_table(report, frozen: fx.GraphModule) -> Table:
    table = Table(title="ONNX file size")
    for col, justify in [("file", "left"), ("bytes", "right"), ("tensors", "right"), ("ratio", "right")]:
        table.add_column(col, justify=justify)
    table.add_row("compressed (pools + routing maps)", f"{report.file_bytes:,}", f"{report.tensor_bytes:,}", "1.00x")
    if report.dense_file_bytes is not None:
        table.add_row("dense, exported the same way", f"{report.dense_file_bytes:,}", f"{report.dense_tensor_bytes:,}",
                      f"{report.file_ratio:.2f}x")
    else:  # an artifact carries no dense model; its float32 weights are what a dense file would hold
        dense = nesc.summary(frozen, print_table=False).dense_params * FLOAT32_BYTES
        table.add_row("dense float32 weights (not exported)", "-", f"{dense:,}",
                      f"{dense / report.tensor_bytes:.2f}x (tensors)")
    return table


if __name__ == "__main__":
    sys.exit(main())
