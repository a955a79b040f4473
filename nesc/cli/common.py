"""What the verbs of the ``nesc`` command line share, and nothing else.

Consoles and error printing; ``Stages`` (a spinner on a terminal, and how long each stage took); what
turns the training flags (``flags.py`` declares every flag) into a ``TrainConfig`` (``config.py``
turns the NESConfig ones into a ``NESConfig``); registry-model lookup with a
did-you-mean, and the width-multiplier check; example inputs from ``--input-size``; output-path and
run-folder checks (before any work: nothing is replaced silently, see ``nesc.core.files``); and the
printing helpers several verbs use. Every verb module imports this one (and ``config.py``, which
builds on it) and the nesc layers below; no verb imports another.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from torch import fx, nn

from nesc.core import names
from nesc.core.errors import InputError, OutputError
from nesc.core.files import check_output
from nesc.data import Dataset, load_dataset
from nesc.fitting import load_checkpoint
from nesc.models import ModelSpec, get_spec, list_models
from nesc.train import TrainConfig, TrainResult

ARTIFACT_SUFFIX = ".nesc"
USAGE_ERROR = 2  # the code argparse uses for usage errors; nesc's own errors share it
INTERRUPTED = 130
# Width for output that goes to a pipe or a file: there is no terminal to fit, so no line is ever
# wrapped (a table row is one line, a layer name is never broken; grep and cut see whole rows), and
# the output is identical from run to run. $COLUMNS still wins.
PIPE_WIDTH = 100_000
FLOAT32_BYTES = 4
DEFAULT_RUN_DIR = Path("runs")
# TrainConfig fields the command line sets; each flag's destination is the field's name.
TRAIN_FIELDS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "optimizer": "--optimizer",
                "weight_decay": "--weight-decay", "schedule": "--schedule", "seed": "--seed", "limit": "--limit",
                "bn_recalibration": "--bn-recalibration", "device": "--device", "sampling_width": "--sampling-width",
                "starts_lr": "--starts-lr"}
FORCE_HELP = "replace the output file if it exists (never a link, a folder or a device; default: refuse)"


# ------------------------------------------------------------------------------ consoles and stages


def console(stderr: bool, quiet: bool = False) -> Console:
    """stdout or stderr; ``quiet`` prints nothing (``--json`` silences the human output, ``--quiet`` the
    progress)."""
    # No markup: paths, layer names and config reprs are printed as they are, brackets included.
    con = Console(stderr=stderr, highlight=False, markup=False, quiet=quiet)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con.width = PIPE_WIDTH
    return con


def print_error(err: Console, message: str, notes: Sequence[str] = ()) -> None:
    # soft_wrap: one paragraph, no line breaks of ours; the terminal wraps it.
    err.print(Text.assemble(("error: ", "bold red"), (message, "red")), soft_wrap=True)
    for note in notes:
        err.print(Text(f"  ({note})", style="dim"), soft_wrap=True)


class Stages:
    """Named stages under a spinner (on a terminal only) and how long each took, in seconds.

    ``stage`` fits ``nesc.api.transform``'s ``on_stage`` hook; ``labels`` renames the stages the API
    names (e.g. ``{"fit": "fit pools"}``) for the spinner and the timings.
    """

    def __init__(self, con: Console, labels: Mapping[str, str] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._labels = dict(labels or {})
        self._bar = Progress(SpinnerColumn(finished_text=Text("done", style="green")),
                             TextColumn("{task.description}", markup=False),
                             TimeElapsedColumn(), console=con,
                             disable=con.quiet or not con.is_terminal)

    @contextmanager
    def progress(self) -> Iterator[None]:
        with self._bar:
            yield

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        label = self._labels.get(name, name)
        task = self._bar.add_task(f"{label} {detail}".strip(), total=1)
        start = time.perf_counter()
        yield
        self.seconds[label] = time.perf_counter() - start
        self._bar.update(task, completed=1)

    def times(self, total: bool = False) -> str:
        """``time: build 0.1s, save 0.0s`` (``; total 0.1s`` with ``total``)."""
        line = "time: " + ", ".join(f"{label} {s:.1f}s" for label, s in self.seconds.items())
        return line + (f"; total {sum(self.seconds.values()):.1f}s" if total else "")


def train_config(args: argparse.Namespace) -> TrainConfig:
    changes = {field: getattr(args, field) for field in TRAIN_FIELDS if getattr(args, field) is not None}
    if getattr(args, "quiet", False):
        changes["progress"] = False  # --quiet: no training bars either
    return TrainConfig(**changes)


# ------------------------------------------------------------------------- models, inputs, paths


def is_artifact(model: str) -> bool:
    """A registry name wins; otherwise anything that looks like a file is read as an artifact."""
    if model in list_models():
        return False
    return model.endswith(ARTIFACT_SUFFIX) or os.sep in model or Path(model).is_file()


def model_spec(name: str) -> ModelSpec:
    """The registry entry ``name``; an unknown name is an ``InputError`` that lists the valid ones and
    suggests the nearest."""
    try:
        return get_spec(name)
    except KeyError as e:
        near = difflib.get_close_matches(name, list_models(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise InputError(f"{e.args[0]}{hint} (`nesc models` lists them with their input shapes)") from None


def width_kwargs(spec: ModelSpec, width: float | None, flag: str, drop: str) -> dict[str, float]:
    """The factory keyword for width multiplier ``width`` (none for None): a positive number, for a model
    whose factory has ``width_mult``. Errors name ``flag`` and say to drop ``drop``."""
    if width is None:
        return {}
    if not (math.isfinite(width) and width > 0):
        raise InputError(f"{flag}: the width multiplier must be a positive number; got {width:g}")
    if not has_width(spec):
        wide = ", ".join(n for n in list_models() if has_width(get_spec(n)))
        raise InputError(f"{flag}: model {spec.name} has no width multiplier; drop {drop} (models with one: {wide})")
    return {"width_mult": width}


def has_width(spec: ModelSpec) -> bool:
    return "width_mult" in inspect.signature(spec.factory).parameters


def create_model(spec: ModelSpec, seed: int, checkpoint: Path | None = None) -> nn.Module:
    """The registry model with the factory's initial weights under ``seed`` (same command, same model),
    then ``checkpoint``'s weights if one is given."""
    torch.manual_seed(seed)
    model = spec.create()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def example_inputs(spec: ModelSpec, size: list[int] | None) -> tuple[torch.Tensor, ...]:
    """Batch-1 inputs of ``spec``'s registered shape, or of ``--input-size`` (checked against its rank)."""
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


def check_out(args: argparse.Namespace, path: Path, flag: str) -> Path:
    """Fail before the work, not after it: an existing file without ``--force``, a link, a folder, a
    device, a missing or unwritable folder (``nesc.core.files.check_output``)."""
    return check_output(path, overwrite=args.force, what=flag)


# ------------------------------------------------------------------------------ training helpers


def load_data(args: argparse.Namespace, spec: ModelSpec) -> Dataset:
    """``--dataset``, checked against the model's input rank and channels (``build_model`` then tries
    the model on one sample)."""
    ds = load_dataset(args.dataset, seed=args.seed or 0, data_dir=args.data_dir)
    want, got = spec.input_shape, ds.spec.input_shape
    if len(want) != len(got) or want[0] != got[0]:
        fits = [n for n in list_models() if _fits(get_spec(n), ds)]
        raise InputError(f"model {spec.name} takes inputs of shape {want} (channels first); dataset {args.dataset} "
                         f"has {got}. Models that fit {args.dataset}: {', '.join(fits) or 'none'}")
    return ds


def build_model(args: argparse.Namespace, spec: ModelSpec, ds: Dataset, seed: int) -> nn.Module:
    """The registry model sized for ``ds``'s classes and ``--width``, checked to run on one sample."""
    kwargs = width_kwargs(spec, args.width, "--width", "--width")
    torch.manual_seed(seed)
    model = spec.create(num_classes=ds.spec.num_classes, **kwargs)
    problem = _trial_forward(model, ds)
    if problem is not None:
        fits = [n for n in list_models() if n != spec.name and _fits(get_spec(n), ds)]
        raise InputError(f"model {spec.name} (inputs of shape {spec.input_shape}) does not run on dataset "
                         f"{ds.spec.name} (samples of shape {ds.spec.input_shape}): {problem}. Models that fit "
                         f"{ds.spec.name}: {', '.join(fits) or 'none'}")
    return model


def _trial_forward(model: nn.Module, ds: Dataset) -> str | None:
    """None if ``model`` maps one sample of ``ds`` to one logit per class (eval mode, no grad: no
    statistics move); otherwise what went wrong."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(ds.x_train[:1])
    except (RuntimeError, ValueError, IndexError) as e:
        return f"the forward fails ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    finally:
        model.train(was)
    want = (1, ds.spec.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return f"it returns {got} for one sample, expected logits of shape {want}"
    return None


def _fits(spec: ModelSpec, ds: Dataset) -> bool:
    """``spec``'s model runs on ``ds`` (the models of other input ranks or channels are not built)."""
    want, got = spec.input_shape, ds.spec.input_shape
    if len(want) != len(got) or want[0] != got[0]:
        return False
    torch.manual_seed(0)
    return _trial_forward(spec.create(num_classes=ds.spec.num_classes), ds) is None


def run_dir(args: argparse.Namespace, spec: ModelSpec) -> Path:
    """``--run-dir`` (or the default), checked before any work: a folder, or a path where one can be made."""
    folder = args.run_dir if args.run_dir is not None else DEFAULT_RUN_DIR / f"{spec.name}-{args.dataset}"
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if existing.is_symlink() and not existing.exists():
        raise OutputError(f"--run-dir {str(folder)!r}: {str(existing)!r} is a broken symbolic link; pass a folder")
    if not existing.is_dir():
        where = "is" if existing == folder else f"is inside {str(existing)!r}, which is"
        raise OutputError(f"--run-dir {str(folder)!r} {where} a file, not a folder; pass a folder for logs and "
                          f"checkpoints (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"--run-dir {str(folder)!r}: folder {str(existing)!r} is not writable; pass a folder "
                          f"you can write to")
    return folder


def fit_options(args: argparse.Namespace) -> dict[str, bool]:
    """``nesc.train.fit``'s resume keywords from ``--no-resume`` / ``--strict-resume`` (the latter passed
    only when set)."""
    return {"resume": not args.no_resume, **({"strict_resume": True} if args.strict_resume else {})}


# -------------------------------------------------------------------------------------- printing


def print_heading(out: Console, name: str, rest: str) -> None:
    out.print(Text.assemble((name, "bold"), " ", rest))


def print_plan_notes(out: Console, gm: fx.GraphModule) -> None:
    notes = gm.meta[names.PLAN].notes
    out.print("plan notes:" if notes else "plan notes: none (the budget overrode no preference)")
    for note in notes:
        out.print(f"  - {note}")


def print_fit_errors(out: Console, errors: dict[str, float]) -> None:
    if not errors:
        out.print("reconstruction error: no layer was compressed")
        return
    worst = max(errors, key=errors.__getitem__)
    mean = sum(errors.values()) / len(errors)
    out.print(f"reconstruction error ||W_hat - W|| / ||W|| over {len(errors)} layers: mean {mean:.4f}, "
              f"max {errors[worst]:.4f} ({worst})")


def print_results(out: Console, title: str, results: dict[str, TrainResult]) -> None:
    """One row per trained model: accuracy, loss, stored size, MAdd, epochs and training time."""
    table = Table(title=title)
    for col, justify in [("model", "left"), ("test acc", "right"), ("test loss", "right"), ("params", "right"),
                         ("bytes", "right"), ("MAdd", "right"), ("epochs", "right"), ("train s", "right")]:
        table.add_column(col, justify=justify)
    for name, r in results.items():
        table.add_row(name, f"{r.test_acc:.2%}", f"{r.test_loss:.4f}", f"{r.stored_params:,}", f"{r.stored_bytes:,}",
                      f"{r.madd:,}" if r.madd is not None else "-", str(r.epochs), f"{r.seconds:.1f}")
    out.print(table)


def format_shape(dims: Sequence[int]) -> str:
    return "x".join(map(str, dims))


def format_bytes(n: int) -> str:
    """A byte count for people: ``1,234 bytes (0.00 MiB)``."""
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"
