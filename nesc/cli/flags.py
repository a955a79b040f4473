"""Every flag the ``nesc`` verbs share, declared in the argument groups that ``--help`` shows:

    model and input    MODEL, --init, --input-size
    compression plan   --ratio | --params | --params-of, --policy, --min-params, --learner, --reuse, ...
    training           --dataset, --epochs, --lr, ..., --run-dir, --no-resume | --strict-resume
    output             -o/--out PATH, --force, --json, --quiet
    backend            (per verb: compile's --target, --tune, ...; export's --opset, ...)

Each verb builds its parser from these functions and adds its own flags to the groups they return.
Every help text says the default. The NESConfig and training flags default to None so that a verb can
tell what the user set (``config.py``, ``common.train_config``); the help says the value used then.

One output flag everywhere: ``-o/--out PATH``. An older spelling (``export --onnx``) is kept as a
hidden alias that still works and prints a one-line deprecation note on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Protocol

from nesc.cli.common import DEFAULT_RUN_DIR, FORCE_HELP
from nesc.core.config import DEFAULT_RATIO, POLICIES, REUSE_LEVELS, NESConfig
from nesc.data import list_datasets
from nesc.models import list_models
from nesc.train import DEVICES, OPTIMIZERS, SCHEDULES, TrainConfig


class ArgumentGroup(Protocol):
    """What ``ArgumentParser.add_argument_group`` returns (argparse does not name its class publicly)."""

    def add_argument(self, *args, **kwargs) -> argparse.Action: ...

    def add_mutually_exclusive_group(self, **kwargs) -> ArgumentGroup: ...


MODEL_GROUP, PLAN_GROUP, TRAINING_GROUP, OUTPUT_GROUP, BACKEND_GROUP = (
    "model and input", "compression plan", "training", "output", "backend")


def model_group(parser: argparse.ArgumentParser, artifact: bool) -> ArgumentGroup:
    """The group with MODEL (a registry name, or also a ``.nesc`` artifact path with ``artifact``).

    MODEL is optional to argparse so that leaving it out is nesc's own usage error, which lists the
    registry models (``missing_model``)."""
    group = parser.add_argument_group(MODEL_GROUP)
    what = "a registry model name (`nesc models`)" + (" or a .nesc artifact path" if artifact else "")
    group.add_argument("model", metavar="MODEL", nargs="?", default=None, help=f"{what}; required")
    return group


def missing_model(args: argparse.Namespace) -> str | None:
    """The usage error for a verb run without MODEL, or None."""
    if getattr(args, "model", "") is not None:
        return None
    return (f"nesc {args.command} needs MODEL, a registry model name: {', '.join(list_models())} "
            f"(`nesc models` lists them with their input shapes)")


def add_init(group: ArgumentGroup) -> None:
    group.add_argument("--init", metavar="CHECKPOINT", type=Path,
                       help="local dense checkpoint (.safetensors or .pt state_dict) to start from "
                            "(default: the factory's initial weights under the seed)")


def add_input_size(group: ArgumentGroup) -> None:
    group.add_argument("--input-size", type=int, nargs="+", metavar="D",
                       help="example input shape without the batch dimension, e.g. 3 64 64 "
                            "(default: the model's registered shape)")


def add_config_flags(parser: argparse.ArgumentParser) -> ArgumentGroup:
    """The NESConfig flags (summary, compress, compile, export); ``config.nes_config`` turns them into
    a NESConfig, which validates every value."""
    group = parser.add_argument_group(PLAN_GROUP)
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, metavar="R",
                        help=f"store 1/R of the dense parameters (R >= 1; default {DEFAULT_RATIO:g})")
    budget.add_argument("--params", type=int, metavar="N", help="parameter budget for the whole model "
                                                                "(default: set by --ratio)")
    budget.add_argument("--params-of", metavar="MODEL[@WIDTH]",
                        help="parameter budget: the dense size of registry model MODEL (at width multiplier "
                             "WIDTH if given); e.g. --width 2 --params-of cnn1d: a 2x-wide cnn1d at cnn1d's size "
                             "(default: none)")
    group.add_argument("--policy", choices=POLICIES, help=f"which layers share a pool (default {NESConfig.policy})")
    group.add_argument("--min-params", type=int, metavar="N",
                       help=f"weights with fewer elements stay dense (default {NESConfig.min_params})")
    group.add_argument("--learner", action="store_true", default=None,
                       help="start-index offsets predicted from the batch-mean input features (the paper's "
                            "learner; default off)")
    group.add_argument("--reuse", nargs="?", const="inputs", choices=REUSE_LEVELS, default=None,
                       help="train routing that freeze turns into fewer multiply-adds: 'inputs' (the default "
                            "when the flag is given) folds input channels; 'outputs' also computes each layer "
                            "with its pool's rows and copies the products to the outputs (default off)")
    group.add_argument("--pool-extent", type=int, metavar="N",
                       help="pools N cells longer than the kernel along space/time, so blocks sample along it "
                            "too (default 0)")
    return group


def add_training_flags(parser: argparse.ArgumentParser) -> ArgumentGroup:
    """Flags shared by ``train`` and ``compress``: the dataset and TrainConfig. Defaults are None so that
    ``compress`` without ``--dataset`` can refuse training flags instead of ignoring them."""
    d = TrainConfig()
    group = parser.add_argument_group(TRAINING_GROUP)
    group.add_argument("--dataset", choices=list_datasets(), help="train on this dataset (default: none)")
    group.add_argument("--data-dir", type=Path, metavar="DIR",
                       help="folder with the dataset's files (Fashion-MNIST; default: the system's copy)")
    group.add_argument("--epochs", type=int, metavar="N", help=f"default {d.epochs}")
    group.add_argument("--batch-size", type=int, metavar="N", help=f"default {d.batch_size}")
    group.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d.optimizer}")
    group.add_argument("--weight-decay", type=float, metavar="WD", help=f"default {d.weight_decay}")
    group.add_argument("--schedule", choices=SCHEDULES, help=f"default {d.schedule}")
    group.add_argument("--seed", type=int, help=f"data order and dropout (default {d.seed})")
    group.add_argument("--limit", type=int, metavar="N",
                       help="train on a class-balanced subset of N samples (default: all)")
    group.add_argument("--bn-recalibration", type=int, metavar="N",
                       help="recompute batch-norm statistics over N train batches before each evaluation "
                            f"(default {d.bn_recalibration})")
    group.add_argument("--device", choices=DEVICES, help=f"default {d.device} (cuda when available)")
    group.add_argument("--sampling-width", type=float, metavar="W",
                       help="sampling kernel W cells wide at the start, annealed to 1 over the first half "
                            f"(default {d.sampling_width:g})")
    group.add_argument("--starts-lr", type=float, metavar="LR",
                       help="learning rate of the start indices (default --lr)")
    group.add_argument("--width", type=float, metavar="W",
                       help="width multiplier, for models that have one (default: the factory's)")
    group.add_argument("--run-dir", type=Path, metavar="DIR",
                       help=f"logs and checkpoints (default {DEFAULT_RUN_DIR}/MODEL-DATASET); a rerun resumes")
    resume = group.add_mutually_exclusive_group()
    resume.add_argument("--no-resume", action="store_true",
                        help="start over even if --run-dir holds a checkpoint (default: resume)")
    resume.add_argument("--strict-resume", action="store_true",
                        help="fail, rather than start over, when --run-dir's checkpoint is damaged or from "
                             "other settings (default: fall back to the checkpoint before)")
    return group


def add_output_flags(parser: argparse.ArgumentParser, what: str, default: str | None,
                     json: bool = True) -> ArgumentGroup:
    """``-o/--out PATH`` (``what`` it writes; ``default`` its default path, None: required), ``--force``,
    ``--json`` (with ``json``) and ``--quiet``. A required ``--out`` is checked by the verb, so that a
    deprecated alias may set it too."""
    group = parser.add_argument_group(OUTPUT_GROUP)
    group.add_argument("-o", "--out", metavar="PATH", type=Path,
                       help=f"{what} (" + (f"default {default}" if default else "required") + ")")
    group.add_argument("--force", action="store_true", help=FORCE_HELP)
    add_report_flags(group, json)
    return group


def add_report_flags(group: ArgumentGroup, json: bool = True) -> None:
    if json:
        group.add_argument("--json", action="store_true",
                           help="print one JSON document on stdout (report, sizes, paths, timings) and nothing "
                                "else there (default: tables for people)")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress or stage messages on stderr, only errors (default: progress on a "
                            "terminal)")


class _DeprecatedAlias(argparse.Action):
    """Stores like the new flag, and says once on stderr which flag to use instead."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"nesc: {option_string} is deprecated; use {self.new} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(group: ArgumentGroup, old: str, new: str, dest: str, type=Path) -> None:
    """``old`` as a hidden alias of ``new`` (same ``dest``): kept so that scripts do not break."""
    group.add_argument(old, dest=dest, type=type, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS)
