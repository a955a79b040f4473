"""``nesc plot``: a training run's curves, or a saved artifact's per-layer compression and MAdd, as PNG.

    nesc plot runs/resnet_fmnist-fashion_mnist -o curves.png   # compress --dataset: dense and nesc curves
    nesc plot runs/dense                                      # train: RUN_DIR/curves.png
    nesc plot r18.nesc -o r18-layers.png                      # per layer: dense vs stored parameters, MAdd

A run folder is read through its ``metrics.json`` files (``nesc.checkpoint.write_metrics``): the
folder's own and those of its sub-folders (``compress --dataset`` writes ``dense/`` and ``nesc/``), one
line per run: test accuracy and train loss per epoch. The files are untrusted: each must be a list of
rows with numeric ``epoch``, ``test_acc`` and ``train_loss``, and no larger than a training log gets.
matplotlib comes with the ``data`` extra; it is imported when the verb runs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console

from nesc.api import load
from nesc.checkpoint import MAX_DOCUMENT_BYTES, METRICS
from nesc.cli.common import Stages, check_out, is_artifact
from nesc.cli.flags import add_output_flags
from nesc.core.errors import InputError
from nesc.report import build_report

CURVES = "curves.png"  # the default output in a run folder
COLUMNS = ("epoch", "test_acc", "train_loss")  # what the curves need from each row


def add_parser(commands) -> None:
    plot = commands.add_parser(
        "plot", help="training curves of a run folder, or an artifact's per-layer compression, as PNG",
        description="Plot a run folder's training curves (test accuracy and train loss per epoch, one line "
                    "per run found in it) or a saved .nesc artifact's per-layer parameters (dense vs stored) "
                    "and MAdd, and save the figure as PNG.")
    group = plot.add_argument_group("input")
    group.add_argument("path", metavar="RUN_DIR_OR_ARTIFACT", nargs="?", default=None,
                       help="a run folder (holding metrics.json) or a .nesc artifact; required")
    add_output_flags(plot, "the PNG to write", f"RUN_DIR/{CURVES}, or the artifact's name with .png", json=False)
    plot.set_defaults(run=run)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.path is None:
        raise InputError("nesc plot needs RUN_DIR_OR_ARTIFACT: a run folder (metrics.json) or a .nesc artifact")
    source = Path(args.path)
    artifact = is_artifact(args.path) and source.is_file()
    if not artifact and not source.is_dir():
        raise InputError(f"nesc plot {args.path!r}: no such run folder or .nesc artifact")
    default = source.with_suffix(".png") if artifact else source / CURVES
    path = check_out(args, args.out if args.out is not None else default, "-o/--out")
    if path.suffix.lower() != ".png":
        raise InputError(f"-o/--out {str(path)!r} must end in .png")
    pyplot = _pyplot()
    stages = Stages(err)
    with stages.progress(), stages.stage("plot", str(source)):
        figure = _layers(pyplot, source) if artifact else _curves(pyplot, source)
        figure.savefig(path, dpi=120)
        pyplot.close(figure)
    out.print(f"plot: {path} ({path.stat().st_size:,} bytes)")
    return 0


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        from matplotlib import pyplot
    except ImportError:
        raise InputError("nesc plot needs matplotlib: pip install 'nesc[data]'") from None
    return pyplot


def read_runs(folder: Path) -> dict[str, list[dict]]:
    """label -> rows of every ``metrics.json`` in ``folder`` and its direct sub-folders, checked."""
    files = [folder / f"{METRICS}.json"] + sorted(folder.glob(f"*/{METRICS}.json"))
    runs = {str(f.parent.relative_to(folder)) if f.parent != folder else folder.name: _rows(f)
            for f in files if f.is_file()}
    if not runs:
        raise InputError(f"nesc plot {str(folder)!r}: no {METRICS}.json in the folder or its sub-folders; pass "
                         f"the --run-dir of nesc train or nesc compress --dataset")
    return runs


def _rows(path: Path) -> list[dict]:
    if path.stat().st_size > MAX_DOCUMENT_BYTES:
        raise InputError(f"{path}: {path.stat().st_size:,} bytes is larger than a training log gets "
                         f"({MAX_DOCUMENT_BYTES:,}); pass a run folder that nesc wrote")
    try:
        rows = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a training log ({e}); pass a run folder that nesc wrote") from None
    ok = isinstance(rows, list) and rows and all(
        isinstance(r, dict) and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                    and math.isfinite(r[k]) for k in COLUMNS) for r in rows)
    if not ok:
        raise InputError(f"{path}: expected a non-empty list of rows with numeric {', '.join(COLUMNS)}; "
                         f"pass a run folder that nesc wrote")
    return rows


def _curves(pyplot, folder: Path):
    runs = read_runs(folder)
    figure, (acc, loss) = pyplot.subplots(1, 2, figsize=(10, 4))
    for label, rows in runs.items():
        epochs = [r["epoch"] for r in rows]
        acc.plot(epochs, [100 * r["test_acc"] for r in rows], marker="o", label=label)
        loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label=label)
    acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    loss.set(xlabel="epoch", ylabel="train loss", title="train loss", yscale="log")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(str(folder))
    figure.tight_layout()
    return figure


def _layers(pyplot, artifact: Path):
    report = build_report(load(artifact))
    names = [r.name.removesuffix(".weight") for r in report.rows]
    figure, (params, madd) = pyplot.subplots(2, 1, figsize=(max(6, 0.35 * len(names) + 2), 8), sharex=True)
    xs = range(len(names))
    params.bar([x - 0.2 for x in xs], [r.params for r in report.rows], width=0.4, label="dense")
    params.bar([x + 0.2 for x in xs], [r.stored for r in report.rows], width=0.4, label="stored")
    params.set(ylabel="parameters", yscale="log",
               title=f"{artifact.name}: {report.dense_params:,} -> {report.stored_params:,} ({report.ratio:.2f}x)")
    params.legend()
    madd.bar(xs, [r.madd for r in report.rows], color="tab:green")
    madd.set(ylabel="MAdd per example", yscale="log")
    madd.set_xticks(list(xs), names, rotation=90, fontsize=7)
    for ax in (params, madd):
        ax.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure
