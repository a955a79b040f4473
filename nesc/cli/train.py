"""``nesc train``: train a dense registry model on a dataset.

    nesc train resnet_fmnist --dataset fashion_mnist --epochs 3 --run-dir runs/dense

Progress bars, per-epoch metrics (JSON + CSV) and a checkpoint every epoch under ``--run-dir`` (a
rerun resumes), then the weights as safetensors (``nesc compress --init`` takes them) and a report.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from safetensors.torch import save_file

from nesc.cli.common import build_model, load_data, model_spec, print_results, run_dir, train_config
from nesc.core.errors import InputError
from nesc.data import list_datasets
from nesc.train import fit


def add_parser(commands, training: argparse.ArgumentParser) -> None:
    train = commands.add_parser(
        "train", parents=[training], help="train a dense registry model on a dataset",
        description="Train a registry model on a dataset: progress bars, per-epoch metrics (JSON + CSV), a "
                    "checkpoint every epoch (a rerun resumes), then the weights as safetensors and a report.")
    train.add_argument("model", metavar="MODEL", help="a registry model name (`nesc models`)")
    train.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.dataset is None:
        raise InputError(f"nesc train needs --dataset NAME; valid: {', '.join(list_datasets())}")
    spec = model_spec(args.model)
    config = train_config(args)
    ds = load_data(args, spec)
    model = build_model(args, spec, ds, config.seed)
    folder = run_dir(args, spec)
    err.print(f"training {spec.name} on {ds.spec.name} ({len(ds):,} train / {len(ds.y_test):,} test) -> {folder}")
    result = fit(model, ds, config, out_dir=folder, resume=not args.no_resume)
    weights = folder / "model.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    print_results(out, f"{spec.name} on {ds.spec.name}", {"dense": result})
    out.print(f"weights: {weights} (load with nesc.load_checkpoint, or pass to nesc compress --init)")
    out.print(f"logs: {folder / 'metrics.json'}, {folder / 'metrics.csv'}")
    return 0
