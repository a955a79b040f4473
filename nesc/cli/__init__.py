"""The ``nesc`` command line: the public verbs for registry models and saved artifacts, one module each.

    nesc models                                   # the reference models: params, input shapes
    nesc summary resnet18 --ratio 4               # plan + fit a model, print the per-layer table
    nesc summary resnet18_cifar.nesc              # summarise a saved artifact
    nesc compress resnet18_cifar --init dense.pt  # transform, fit, freeze, save resnet18_cifar.nesc
    nesc compress resnet_fmnist --dataset fashion_mnist --ratio 4      # train, compress, fine-tune, freeze, save
    nesc train resnet_fmnist --dataset fashion_mnist                   # train a dense model
    nesc compile resnet18_cifar -o r18.so         # build with TVM: a deployable library + parameters file
    nesc export r18.nesc -o r18.onnx              # compressed ONNX: pools + routing maps, weights as ops
    nesc search resnet_fmnist --dataset fashion_mnist --run-dir runs/s   # search a plan; runs/s/best.json
    nesc plot runs/resnet_fmnist-fashion_mnist    # training curves of a run folder (or an artifact's layers) as PNG

Tables go to stdout, progress and errors to stderr; ``--json`` puts one JSON document on stdout instead
of the tables, ``--quiet`` drops the progress. Every verb that writes a file takes ``-o/--out PATH``.
Every ``nesc.NescError`` (and an unknown model name, or none where MODEL is required) is printed as
one red message without a traceback and exits with 2, like an argparse usage error. ``main(argv)`` returns the exit code, so tests and scripts can call it in-process.

This module only builds the parser and dispatches: each verb is ``nesc/cli/<verb>.py`` with
``add_parser`` and ``run(args, out, err)``; what several verbs share is in ``common.py``, and what
turns the NESConfig flags (``--params-of`` included) into a ``NESConfig`` in ``config.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from nesc import __version__
from nesc.cli import common, compress, export, flags, models, plot, summary, train
from nesc.cli import search as search_
from nesc.cli import compile as compile_
from nesc.cli.common import INTERRUPTED, PIPE_WIDTH, USAGE_ERROR
from nesc.core.errors import NescError

__all__ = ["INTERRUPTED", "PIPE_WIDTH", "USAGE_ERROR", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed its message
        return e.code if isinstance(e.code, int) else (0 if e.code is None else USAGE_ERROR)
    err = common.console(stderr=True)
    if (missing := flags.missing_model(args)) is not None:
        common.print_error(err, missing)
        return USAGE_ERROR
    # --json: stdout holds only the JSON document (the verb writes it); --quiet: no progress on stderr
    out = common.console(stderr=False, quiet=getattr(args, "json", False))
    progress = common.console(stderr=True, quiet=True) if getattr(args, "quiet", False) else err
    try:
        return args.run(args, out, progress)
    except NescError as e:
        common.print_error(err, str(e), notes=getattr(e, "__notes__", ()))  # notes: e.g. which pass failed
        return USAGE_ERROR
    except KeyboardInterrupt:
        common.print_error(err, "interrupted")
        return INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nesc", description="Neural Epitome Search as a compiler: compress PyTorch models into shared "
                                 "epitome pools.")
    parser.add_argument("--version", action="version", version=f"nesc {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models.add_parser(commands)
    summary.add_parser(commands)
    compress.add_parser(commands)
    compile_.add_parser(commands)
    train.add_parser(commands)
    export.add_parser(commands)
    search_.add_parser(commands)
    plot.add_parser(commands)
    return parser
