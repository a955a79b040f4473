"""``nesc compress``: transform, fit, freeze and save a registry model as one ``.nesc`` artifact.

    nesc compress resnet18_cifar --init dense.pt                    # fit the pools to a dense checkpoint
    nesc compress resnet_fmnist --dataset fashion_mnist --ratio 4   # train, compress, fine-tune, freeze, save
    nesc compress cnn1d --dataset mnist1d --width 2 --params-of cnn1d  # a 2x-wide cnn1d at cnn1d's size

Without ``--dataset`` the pools are fitted to the model's weights (``--init CHECKPOINT``, or the
factory's initial ones) and each stage is timed: capture, plan and fit through ``nesc.api.transform``'s
``on_stage`` hook, freeze and save as their own calls. With ``--dataset`` the dense model is trained
first (or ``--init CHECKPOINT`` evaluated), the pools are fitted to it, the compressed model is trained
(distilled from the dense one with ``--distill``, or from ``--teacher CHECKPOINT``), frozen and saved,
and the summary shows both accuracies. Logs and per-epoch checkpoints go under ``--run-dir``; running
the same command again resumes. ``-o/--out`` and ``--run-dir`` are checked before any work; an existing
artifact is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text
from torch import nn

from nesc.api import freeze, load, save, transform
from nesc.cli.common import (
    ARTIFACT_SUFFIX,
    FLOAT32_BYTES,
    TRAIN_FIELDS,
    Stages,
    build_model,
    check_out,
    create_model,
    example_inputs,
    fit_options,
    format_bytes,
    format_shape,
    load_data,
    model_spec,
    print_fit_errors,
    print_heading,
    print_plan_notes,
    print_results,
    run_dir,
    train_config,
)
from nesc.cli.config import budget, describe, nes_config
from nesc.cli.flags import add_config_flags, add_init, add_input_size, add_output_flags, add_training_flags, model_group
from nesc.cli.output import emit_json
from nesc.cli.search import plan_config
from nesc.core import names
from nesc.core.errors import InputError
from nesc.core.modules import samplers_by_pool
from nesc.core.quant import POOL_DTYPES
from nesc.data import Dataset, list_datasets
from nesc.fitting import load_checkpoint
from nesc.models import ModelSpec
from nesc.report import Report, build_report
from nesc.train import TrainConfig, TrainResult, evaluate, fit, model_size

# --pool-dtype's choices: "int8", "float16", "bfloat16".
POOL_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in POOL_DTYPES}
# What transform's stages are called in the spinner and the timings.
STAGE_LABELS = {"fit": "fit pools"}
# Flags that only mean something when training, besides TrainConfig's, by destination.
OTHER_TRAIN_FLAGS = {"data_dir": "--data-dir", "width": "--width", "run_dir": "--run-dir", "distill": "--distill",
                     "teacher": "--teacher", "no_resume": "--no-resume", "strict_resume": "--strict-resume",
                     "resume": "--resume", "trainable": "--trainable"}


def add_parser(commands) -> None:
    compress = commands.add_parser(
        "compress", help="transform, fit, freeze and save a model as a .nesc artifact",
        description="Build a registry model (optionally from a local dense checkpoint), fit its epitome "
                    "pools to the dense weights, freeze the routing maps and save one .nesc artifact.")
    model = model_group(compress, artifact=False)
    add_init(model)
    add_input_size(model)
    plan = add_config_flags(compress)
    plan.add_argument("--plan", type=Path, metavar="PLAN",
                      help="a plan from nesc search (RUN_DIR/best.json): per-layer ratios, dense layers, shared "
                           "pools, width and budget (instead of --ratio/--params/--policy/--min-params; default none)")
    plan.add_argument("--fold-batchnorm", action="store_true",
                      help="store every batch norm as a per-channel scale and shift (two tensors instead of "
                           "four: a smaller artifact; outputs equal up to float rounding, and the batch norms "
                           "no longer use batch statistics if the loaded model is trained; default off)")
    plan.add_argument("--pool-dtype", choices=list(POOL_DTYPE_NAMES),
                      help="store the frozen pools as int8 (one symmetric scale per pool row, about a quarter of the "
                           "float32 pool bytes) or as float16 / bfloat16, dequantised in the graph before the "
                           "regeneration (nesc.freeze(gm, pool_dtype=...); outputs change by the pools' rounding; "
                           "default: float32 pools)")
    training = add_training_flags(compress)
    training.add_argument("--distill", action="store_true", default=None,
                          help="with --dataset: distil the compressed model from the dense one (default off)")
    training.add_argument("--teacher", type=Path, metavar="CHECKPOINT",
                          help="with --dataset: distil from this dense checkpoint of the same model (default none)")
    training.add_argument("--resume", type=Path, metavar="ARTIFACT",
                          help="with --dataset: train on the trainable model of ARTIFACT (from --trainable, or nesc.save "
                               "of a model that trains) instead of training the dense model and transforming it; "
                               "no dense baseline then (default none)")
    output = add_output_flags(compress, "where to write the artifact", f"./MODEL{ARTIFACT_SUFFIX}")
    output.add_argument("--trainable", type=Path, metavar="PATH",
                        help="with --dataset: also save the trained model before freezing, as an artifact that loads "
                             "trainable (--resume PATH continues it; default none)")
    compress.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.dataset is not None:
        return _run_trained(args, out, err)
    _check_training_flags_unused(args)
    return _run_fitted(args, out, err)


def _check_training_flags_unused(args: argparse.Namespace) -> None:
    """Without ``--dataset`` nothing is trained: training flags would be ignored, so refuse them."""
    given = [flag for dest, flag in {**TRAIN_FIELDS, **OTHER_TRAIN_FLAGS}.items()
             if getattr(args, dest, None) not in (None, False)]
    if given:
        raise InputError(f"{', '.join(given)} only apply when training: add --dataset NAME "
                         f"({', '.join(list_datasets())}) or drop them")


def _freeze(gm, args: argparse.Namespace):
    """``nesc.freeze`` with the flags that shape the artifact: ``--fold-batchnorm``, ``--pool-dtype``."""
    pool_dtype = POOL_DTYPE_NAMES[args.pool_dtype] if args.pool_dtype is not None else None
    return freeze(gm, fold_batchnorm=args.fold_batchnorm, pool_dtype=pool_dtype)


def _artifact_path(args: argparse.Namespace, spec: ModelSpec) -> Path:
    path = args.out if args.out is not None else Path(f"{spec.name}{ARTIFACT_SUFFIX}")
    return check_out(args, path, "-o/--out")


# ------------------------------------------------------------------ fitted to the dense weights


def _run_fitted(args: argparse.Namespace, out: Console, err: Console) -> int:
    spec = model_spec(args.model)
    config = plan_config(args, spec, trained=False) if args.plan else nes_config(args, spec)
    inputs = example_inputs(spec, args.input_size)
    path = _artifact_path(args, spec)
    stages = Stages(err, STAGE_LABELS)
    with stages.progress():
        with stages.stage("build", spec.name + (f" from {args.init}" if args.init else "")):
            model = create_model(spec, config.seed, args.init)
        gm = transform(model, inputs, config, on_stage=stages.stage)  # capture, plan, fit pools
        with stages.stage("freeze"):
            frozen = _freeze(gm, args)
        with stages.stage("save", str(path)):
            save(frozen, path, overwrite=args.force)
    report = build_report(frozen)
    print_heading(out, spec.name, f"input {format_shape(inputs[0].shape)}, {describe(config, args.params_of)}")
    out.print(report)
    print_plan_notes(out, gm)
    out.print(f"ratio: {report.ratio:.2f}x achieved (asked: {budget(config, args.params_of)})")
    print_fit_errors(out, gm.meta[names.FIT_ERRORS])
    if args.init is None:
        out.print(Text("  (no --init checkpoint: the pools were fitted to the model's random initial weights)",
                       style="dim"))
    _print_sizes(out, path, report)
    out.print(stages.times(total=True))
    if args.json:
        emit_json({"model": spec.name, "artifact": path, **_sizes(path, report), "config": describe(config, args.params_of),
                   "report": report.to_dict(), "fit_errors": gm.meta[names.FIT_ERRORS], "seconds": stages.seconds})
    return 0


def _sizes(path: Path, report: Report) -> dict[str, int]:
    return {"file_bytes": path.stat().st_size, "dense_float32_bytes": report.dense_params * FLOAT32_BYTES}


def _print_sizes(out: Console, path: Path, report: Report) -> None:
    size, dense = path.stat().st_size, report.dense_params * FLOAT32_BYTES
    out.print(f"artifact: {path} {format_bytes(size)}; dense float32 {format_bytes(dense)}; "
              f"{dense / max(size, 1):.2f}x smaller")


# --------------------------------------------------------------------------- trained on a dataset


def _run_trained(args: argparse.Namespace, out: Console, err: Console) -> int:
    spec = model_spec(args.model)
    if args.input_size is not None:
        raise InputError("--input-size does not apply with --dataset: the dataset fixes the input shape")
    config = train_config(args)
    path = _artifact_path(args, spec)
    trainable = check_out(args, args.trainable, "--trainable") if args.trainable is not None else None
    folder = run_dir(args, spec)
    ds = load_data(args, spec)
    nes = (plan_config(args, spec, trained=True) if args.plan  # --plan sets args.width: before the models are built
           else nes_config(args, spec, ds.spec.num_classes))  # --params-of counts a model with the dataset's classes
    if args.resume is not None and (args.distill or args.init is not None):
        raise InputError(f"--resume trains the artifact's model, so there is no dense model for "
                         f"{'--distill' if args.distill else '--init'}: drop it (distil with --teacher CHECKPOINT)")
    dense, dense_result = _dense(args, spec, ds, config, err) if args.resume is None else (None, None)
    teacher = None
    if args.teacher is not None:
        teacher = load_checkpoint(build_model(args, spec, ds, config.seed), args.teacher)
    elif args.distill:
        teacher = dense
    gm = transform(dense, (ds.x_train[:2],), nes) if dense is not None else _resumed(args.resume, ds)
    err.print(Text(f"training the compressed model -> {folder / 'nesc'}"))
    result = fit(gm, ds, config, out_dir=folder / "nesc", teacher=teacher, **fit_options(args))
    if trainable is not None:
        save(gm.cpu(), trainable, overwrite=args.force)
    frozen = _freeze(gm, args)
    frozen_loss, frozen_acc = evaluate(frozen, ds, config.resolved_device())
    save(frozen.cpu(), path, overwrite=args.force)
    width = f" at width {args.width:g}" if args.width is not None else ""
    print_heading(out, spec.name + width, f"on {ds.spec.name}, {describe(nes, args.params_of)}")
    report = build_report(frozen)
    out.print(report)
    print_fit_errors(out, gm.meta.get(names.FIT_ERRORS, {}))
    params, nbytes, madd = model_size(frozen, ds)
    frozen_result = TrainResult(frozen_acc, frozen_loss, params, nbytes, madd, result.seconds, result.epochs,
                                result.history)  # the curves of the training before freeze
    rows = {"dense": dense_result} if dense_result is not None else {}
    print_results(out, f"{spec.name}{width} on {ds.spec.name}", {**rows, "nesc (frozen)": frozen_result})
    versus = (f" vs dense {dense_result.test_acc:.2%} ({frozen_acc - dense_result.test_acc:+.2%})"
              if dense_result is not None else f" (resumed from {args.resume})")
    out.print(f"ratio: {report.ratio:.2f}x; artifact: {path} ({path.stat().st_size:,} bytes); "
              f"accuracy {frozen_acc:.2%}{versus}")
    if args.json:
        emit_json({"model": spec.name, "dataset": ds.spec.name, "width": args.width, "artifact": path,
                   **_sizes(path, report), "config": describe(nes, args.params_of), "report": report.to_dict(),
                   "dense": dense_result, "nesc": frozen_result, "run_dir": folder})
    return 0


def _resumed(artifact: Path, ds: Dataset):
    """The trainable model of ``artifact`` (``nesc.load``; its plan, not the plan flags), checked against the
    dataset; a frozen one cannot train its routing."""
    gm = load(artifact)
    if not samplers_by_pool(gm):
        raise InputError(f"--resume {artifact}: a frozen model (no trainable sampler); pass an artifact saved before "
                         f"nesc.freeze (nesc compress --trainable PATH writes one)")
    shape = tuple(gm.meta[names.INPUT_SPECS][0][0][1:])
    if shape != tuple(ds.spec.input_shape):
        raise InputError(f"--resume {artifact}: the model takes inputs of shape {shape}, dataset {ds.spec.name} has "
                         f"{tuple(ds.spec.input_shape)}")
    return gm


def _dense(args: argparse.Namespace, spec: ModelSpec, ds: Dataset, config: TrainConfig,
           err: Console) -> tuple[nn.Module, TrainResult]:
    """The dense model and its result: ``--init`` evaluated, or trained under ``--run-dir``/dense."""
    dense = build_model(args, spec, ds, config.seed)
    if args.init is not None:
        load_checkpoint(dense, args.init)
        return dense, _evaluate_only(dense, ds, config)
    folder = run_dir(args, spec) / "dense"
    err.print(f"training the dense {spec.name} on {ds.spec.name} -> {folder}")
    return dense, fit(dense, ds, config, out_dir=folder, **fit_options(args))


def _evaluate_only(model: nn.Module, ds: Dataset, config: TrainConfig) -> TrainResult:
    t0 = time.perf_counter()
    loss, acc = evaluate(model, ds, config.resolved_device())
    params, nbytes, madd = model_size(model, ds)
    return TrainResult(acc, loss, params, nbytes, madd, time.perf_counter() - t0, 0)
