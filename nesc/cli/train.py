"""``nesc train``: train a dense registry model on a dataset.

    nesc train resnet_fmnist --dataset fashion_mnist --epochs 3 --run-dir runs/dense
    python -m torch.distributed.run --nproc-per-node 2 -m nesc.cli train resnet_fmnist \
        --dataset fashion_mnist --distributed fsdp --run-dir runs/fsdp

Progress bars, per-epoch metrics (JSON + CSV) and a checkpoint every epoch under ``--run-dir`` (a
rerun resumes), then the weights as safetensors (``nesc compress --init`` takes them) and a report.
The weights file lives in the run folder, which the rerun owns: it is replaced there (never through a
link), and the folder is checked before any work. ``--distributed ddp|fsdp`` trains on every process
``torchrun`` starts (``nesc.distributed.fit_distributed``; FSDP2 shards each top-level block); rank 0
writes the files and prints, and a rerun resumes, with any world size.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from safetensors.torch import save_file

from nesc.cli.common import build_model, fit_options, load_data, model_spec, print_results, run_dir, train_config
from nesc.cli.flags import OUTPUT_GROUP, add_report_flags, add_training_flags, model_group
from nesc.core.errors import InputError
from nesc.core.files import atomic_write, check_output
from nesc.data import list_datasets
from nesc.distributed import MODES
from nesc.train import fit

WEIGHTS = "model.safetensors"  # in the run folder


def add_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="train a dense registry model on a dataset",
        description="Train a registry model on a dataset: progress bars, per-epoch metrics (JSON + CSV), a "
                    "checkpoint every epoch (a rerun resumes), then the weights as safetensors and a report.")
    model_group(train, artifact=False)
    add_training_flags(train)
    add_report_flags(train.add_argument_group(OUTPUT_GROUP), json=False)
    group = train.add_argument_group("distributed training (run under torchrun)")
    group.add_argument("--distributed", choices=MODES, help="data-parallel over the processes torchrun starts: "
                       "ddp, or fsdp (FSDP2 per top-level block) (default: one process)")
    train.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.dataset is None:
        raise InputError(f"nesc train needs --dataset NAME; valid: {', '.join(list_datasets())}")
    spec = model_spec(args.model)
    config = train_config(args)
    folder = run_dir(args, spec)
    weights = folder / WEIGHTS
    if folder.is_dir():  # a rerun replaces its own weights file, but never a link, folder or device there
        check_output(weights, overwrite=True, what="the weights file")
    rank = 0
    if args.distributed:
        from nesc.distributed import fit_distributed, init_process_group  # torch.distributed: seconds to import

        rank, world = init_process_group()
        if rank:  # one voice: rank 0 prints and writes
            out, err = Console(quiet=True), Console(quiet=True)
    ds = load_data(args, spec)
    model = build_model(args, spec, ds, config.seed)
    err.print(f"training {spec.name} on {ds.spec.name} ({len(ds):,} train / {len(ds.y_test):,} test) -> {folder}"
              + (f" ({args.distributed}, {world} processes)" if args.distributed else ""))
    if args.distributed:
        result = fit_distributed(model, ds, config, mode=args.distributed, out_dir=folder, **fit_options(args))
    else:
        result = fit(model, ds, config, out_dir=folder, **fit_options(args))
    if rank:
        return 0
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)), overwrite=True, what="the weights file")
    print_results(out, f"{spec.name} on {ds.spec.name}", {"dense": result})
    out.print(f"weights: {weights} (load with nesc.load_checkpoint, or pass to nesc compress --init)")
    out.print(f"logs: {folder / 'metrics.json'}, {folder / 'metrics.csv'}")
    return 0
