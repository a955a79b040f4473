"""The command line's training verbs: ``nesc train`` and ``nesc compress --dataset``.

    nesc train resnet_fmnist --dataset fashion_mnist --epochs 3 --out runs/dense      # dense model
    nesc compress resnet_fmnist --dataset fashion_mnist --ratio 4 --epochs 3         # train dense, compress,
                                                                                     # fine-tune, freeze, save

``compress --dataset`` trains the dense model first (or evaluates ``--init CHECKPOINT``), fits the
pools to it, trains the compressed model (distilled from the dense one with ``--distill``, or from
``--teacher CHECKPOINT``), freezes, saves, and prints the summary with both accuracies. Logs and
per-epoch checkpoints go under ``--run-dir``; running the same command again resumes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from torch import nn

import nesc
from nesc import api
from nesc.data import Dataset, list_datasets, load_dataset
from nesc.core.errors import InputError
from nesc.models import ModelSpec, get_spec, list_models
from nesc.train import OPTIMIZERS, SCHEDULES, TrainConfig, TrainResult, evaluate, fit, model_size

DEFAULT_RUN_DIR = Path("runs")


def training_flags() -> argparse.ArgumentParser:
    """Flags shared by ``train`` and ``compress``: the dataset and TrainConfig. Defaults are None so that
    ``compress`` without ``--dataset`` can refuse training flags instead of ignoring them."""
    group = argparse.ArgumentParser(add_help=False)
    group.add_argument("--dataset", choices=list_datasets(), help="train on this dataset")
    group.add_argument("--data-dir", type=Path, metavar="DIR", help="folder with the dataset's files (Fashion-MNIST)")
    group.add_argument("--epochs", type=int, metavar="N", help=f"epochs (default {TrainConfig.epochs})")
    group.add_argument("--batch-size", type=int, metavar="N", help=f"default {TrainConfig.batch_size}")
    group.add_argument("--lr", type=float, help=f"learning rate (default {TrainConfig.lr})")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {TrainConfig.optimizer}")
    group.add_argument("--weight-decay", type=float, metavar="WD", help=f"default {TrainConfig.weight_decay}")
    group.add_argument("--schedule", choices=SCHEDULES, help=f"default {TrainConfig.schedule}")
    group.add_argument("--seed", type=int, help="data order and dropout (default 0)")
    group.add_argument("--limit", type=int, metavar="N", help="train on a class-balanced subset of N samples")
    group.add_argument("--bn-recalibration", type=int, metavar="N",
                       help="recompute batch-norm statistics over N train batches before each evaluation")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto (cuda when available)")
    group.add_argument("--width", type=float, metavar="W", help="width multiplier, for models that have one")
    group.add_argument("--run-dir", type=Path, metavar="DIR",
                       help=f"logs and checkpoints (default {DEFAULT_RUN_DIR}/MODEL-DATASET); a rerun resumes")
    group.add_argument("--no-resume", action="store_true", help="start over even if --run-dir holds a checkpoint")
    return group


# Flags of TrainConfig, by field.
TRAIN_FIELDS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "optimizer": "--optimizer",
                "weight_decay": "--weight-decay", "schedule": "--schedule", "seed": "--seed", "limit": "--limit",
                "bn_recalibration": "--bn-recalibration", "device": "--device"}
OTHER_TRAIN_FLAGS = {"data_dir": "--data-dir", "width": "--width", "run_dir": "--run-dir", "distill": "--distill",
                     "teacher": "--teacher"}


def add_train_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    train = commands.add_parser(
        "train", parents=[*parents], help="train a dense registry model on a dataset",
        description="Train a registry model on a dataset: progress bars, per-epoch metrics (JSON + CSV), a "
                    "checkpoint every epoch (a rerun resumes), then the weights as safetensors and a report.")
    train.add_argument("model", metavar="MODEL", help="a registry model name (`nesc models`)")
    train.set_defaults(run=run_train)


def add_compress_flags(compress: argparse.ArgumentParser) -> None:
    compress.add_argument("--distill", action="store_true", default=None,
                          help="with --dataset: distil the compressed model from the dense one")
    compress.add_argument("--teacher", type=Path, metavar="CHECKPOINT",
                          help="with --dataset: distil from this dense checkpoint of the same model")


def check_training_flags_unused(args: argparse.Namespace) -> None:
    """``compress`` without ``--dataset`` trains nothing: training flags would be ignored, so refuse them."""
    given = [flag for dest, flag in {**TRAIN_FIELDS, **OTHER_TRAIN_FLAGS}.items()
             if getattr(args, dest, None) not in (None, False)]
    if given:
        raise InputError(f"{', '.join(given)} only apply when training: add --dataset NAME "
                         f"({', '.join(list_datasets())}) or drop them")


def train_config(args: argparse.Namespace) -> TrainConfig:
    changes = {field: getattr(args, field) for field in TRAIN_FIELDS if getattr(args, field) is not None}
    return TrainConfig(**changes)


def load_data(args: argparse.Namespace, spec: ModelSpec) -> Dataset:
    ds = load_dataset(args.dataset, seed=args.seed or 0, data_dir=args.data_dir)
    want, got = spec.input_shape, ds.spec.input_shape
    if len(want) != len(got) or want[0] != got[0]:
        fits = [n for n in list_models() if len(get_spec(n).input_shape) == len(got)
                and get_spec(n).input_shape[0] == got[0]]
        raise InputError(f"model {spec.name} takes inputs of shape {want} (channels first); dataset {args.dataset} "
                         f"has {got}. Models that fit {args.dataset}: {', '.join(fits) or 'none'}")
    return ds


def build_model(args: argparse.Namespace, spec: ModelSpec, ds: Dataset, seed: int) -> nn.Module:
    kwargs: dict[str, object] = {"num_classes": ds.spec.num_classes}
    if args.width is not None:
        import inspect

        if "width_mult" not in inspect.signature(spec.factory).parameters:
            raise InputError(f"--width: model {spec.name} has no width multiplier; drop --width")
        kwargs["width_mult"] = args.width
    torch.manual_seed(seed)
    return spec.create(**kwargs)


def run_dir(args: argparse.Namespace, spec: ModelSpec, suffix: str = "") -> Path:
    base = args.run_dir if args.run_dir is not None else DEFAULT_RUN_DIR / f"{spec.name}-{args.dataset}"
    return base / suffix if suffix else base


# ------------------------------------------------------------------------------------------- train


def run_train(args: argparse.Namespace, out: Console, err: Console) -> int:
    from nesc.cli import _spec

    if args.dataset is None:
        raise InputError(f"nesc train needs --dataset NAME; valid: {', '.join(list_datasets())}")
    spec = _spec(args.model)
    config = train_config(args)
    ds = load_data(args, spec)
    model = build_model(args, spec, ds, config.seed)
    folder = run_dir(args, spec)
    err.print(f"training {spec.name} on {ds.spec.name} ({len(ds):,} train / {len(ds.y_test):,} test) -> {folder}")
    result = fit(model, ds, config, out_dir=folder, resume=not args.no_resume)
    weights = folder / "model.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    _print_results(out, f"{spec.name} on {ds.spec.name}", {"dense": result})
    out.print(f"weights: {weights} (load with nesc.load_checkpoint, or pass to nesc compress --init)")
    out.print(f"logs: {folder / 'metrics.json'}, {folder / 'metrics.csv'}")
    return 0


# ---------------------------------------------------------------------------------------- compress


def run_compress_trained(args: argparse.Namespace, out: Console, err: Console) -> int:
    from nesc.cli import ARTIFACT_SUFFIX, _check_writable, _config, _describe, _print_fit_errors, _print_heading, _spec

    spec, nes_config = _spec(args.model), _config(args)
    if args.input_size is not None:
        raise InputError("--input-size does not apply with --dataset: the dataset fixes the input shape")
    config = train_config(args)
    path = args.out if args.out is not None else Path(f"{spec.name}{ARTIFACT_SUFFIX}")
    _check_writable(path)
    ds = load_data(args, spec)
    dense = build_model(args, spec, ds, config.seed)
    folder = run_dir(args, spec)
    if args.init is not None:
        nesc.load_checkpoint(dense, args.init)
        dense_result = _evaluate_only(dense, ds, config)
    else:
        err.print(f"training the dense {spec.name} on {ds.spec.name} -> {folder / 'dense'}")
        dense_result = fit(dense, ds, config, out_dir=folder / "dense", resume=not args.no_resume)
    teacher = None
    if args.teacher is not None:
        teacher = nesc.load_checkpoint(build_model(args, spec, ds, config.seed), args.teacher)
    elif args.distill:
        teacher = dense
    gm = nesc.transform(dense, (ds.x_train[:2],), nes_config)  # pools fitted to the dense weights
    err.print(f"training the compressed model -> {folder / 'nesc'}")
    result = fit(gm, ds, config, out_dir=folder / "nesc", teacher=teacher, resume=not args.no_resume)
    frozen = nesc.freeze(gm)
    frozen_loss, frozen_acc = evaluate(frozen, ds, config.resolved_device())
    nesc.save(frozen.cpu(), path)
    _print_heading(out, spec.name, f"on {ds.spec.name}, {_describe(nes_config)}")
    report = nesc.summary(frozen, print_table=False)
    out.print(report)
    _print_fit_errors(out, gm.meta.get(api.FIT_ERRORS, {}))
    params, nbytes, madd = model_size(frozen, ds)
    frozen_result = TrainResult(frozen_acc, frozen_loss, params, nbytes, madd, result.seconds, result.epochs)
    _print_results(out, f"{spec.name} on {ds.spec.name}", {"dense": dense_result, "nesc (frozen)": frozen_result})
    out.print(f"ratio: {report.ratio:.2f}x; artifact: {path} ({path.stat().st_size:,} bytes); "
              f"accuracy {frozen_acc:.2%} vs dense {dense_result.test_acc:.2%} ({frozen_acc - dense_result.test_acc:+.2%})")
    return 0


def _evaluate_only(model: nn.Module, ds: Dataset, config: TrainConfig) -> TrainResult:
    t0 = time.perf_counter()
    loss, acc = evaluate(model, ds, config.resolved_device())
    params, nbytes, madd = model_size(model, ds)
    return TrainResult(acc, loss, params, nbytes, madd, time.perf_counter() - t0, 0)


def _print_results(out: Console, title: str, results: dict[str, TrainResult]) -> None:
    table = Table(title=title)
    for col, justify in [("model", "left"), ("test acc", "right"), ("test loss", "right"), ("params", "right"),
                         ("bytes", "right"), ("MAdd", "right"), ("epochs", "right"), ("train s", "right")]:
        table.add_column(col, justify=justify)
    for name, r in results.items():
        table.add_row(name, f"{r.test_acc:.2%}", f"{r.test_loss:.4f}", f"{r.stored_params:,}", f"{r.stored_bytes:,}",
                      f"{r.madd:,}" if r.madd is not None else "-", str(r.epochs), f"{r.seconds:.1f}")
    out.print(table)
