"""Train a dense model or a nesc GraphModule on a registered dataset, with exact resume.

    result = nesc.train.fit(model, dataset, TrainConfig(epochs=5), out_dir="runs/r1", teacher=dense)
    result.test_acc, result.stored_params, result.stored_bytes, result.madd, result.seconds

Every epoch appends its metrics to ``metrics.json`` and ``metrics.csv`` and writes a checkpoint
(``nesc.checkpoint``: tensors in safetensors, the rest in JSON, both hashed; no pickle anywhere).
Calling ``fit`` again with the same ``out_dir`` resumes after the last verified epoch and ends with
weights bit-identical to an uninterrupted run: the data order of an epoch is a function of
``(seed, epoch)`` only, and the global RNG (dropout) is restored from the checkpoint. A damaged
newest checkpoint is reported and the one before it used (``strict_resume=True``: an error instead).

The model may be a plain ``nn.Module`` or a GraphModule from ``nesc.transform`` (pools and start
indices train; ``train()``/``eval()`` switch batch norm and dropout as on the original model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from nesc.capture import capture
from nesc.checkpoint import prepare_run_dir, save_checkpoint, write_metrics
from nesc.core.config import checked_fields, replace_fields
from nesc.core.errors import ConfigError, InputError
from nesc.core.modules import samplers_by_pool, set_sampling_width, start_stats
from nesc.data import Dataset, balanced_indices
from nesc.epochs import evaluate, optimizer_step, resume_run, run_epochs
from nesc.fitting import distillation_loss
from nesc.report import build_report, stored_bytes, stored_params

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")


@checked_fields
@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    epochs, batch_size, lr: the usual. optimizer: ``sgd`` (momentum 0.9, Nesterov) or ``adamw``.
    weight_decay: L2 / decoupled decay on every trainable parameter.
    schedule: ``cosine`` (to 0 over all steps, per step), ``step`` (times ``gamma`` every ``step_epochs``
        epochs) or ``constant``.
    seed: model-independent randomness of the run: data order, dropout.
    distill_alpha, distill_temperature: with a teacher, the loss is ``nesc.distillation_loss`` with these.
    device: ``auto`` (cuda when available), ``cpu`` or ``cuda``.
    limit: train on a class-balanced seeded subset of this many samples (quick runs).
    bn_recalibration: before each evaluation, recompute batch-norm running statistics as exact
        averages over this many train batches (``torch.optim.swa_utils.update_bn``); 0 keeps the
        running averages of training. Short runs (tens of steps) need it: momentum-0.1 averages of
        statistics that moved with every step describe no single set of weights.
    sampling_width: half-width in cells of the samplers' kernel at the first step (1 = linear
        interpolation throughout); it falls linearly to 1 over the first ``width_anneal`` of the steps
        (``nesc.core.modules.set_sampling_width``), so start indices learn on a smooth landscape and
        the model trains its last steps with the routing freeze keeps.
    starts_lr: learning rate of the start indices (their own group, no weight decay); None = ``lr``.
        With adamw it is about the cells a start moves per step.
    progress: rich progress bars; None = only on a terminal and outside CI.
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_epochs: int = 30
    gamma: float = 0.1
    seed: int = 0
    distill_alpha: float = 0.9
    distill_temperature: float = 4.0
    device: str = "auto"
    limit: int | None = None
    bn_recalibration: int = 0
    sampling_width: float = 1.0
    width_anneal: float = 0.5
    starts_lr: float | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name} must be an int >= 1; got {value!r}")
        for name, low in (("lr", 0.0), ("distill_temperature", 0.0)):
            if not getattr(self, name) > low:
                raise ConfigError(f"TrainConfig.{name} must be > {low}; got {getattr(self, name)!r}")
        for name in ("weight_decay", "momentum"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0; got {getattr(self, name)!r}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"TrainConfig.gamma must be in (0, 1]; got {self.gamma!r}")
        if not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"TrainConfig.distill_alpha must be in [0, 1]; got {self.distill_alpha!r}")
        for name, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("device", DEVICES)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is not one of {', '.join(valid)}")
        if isinstance(self.bn_recalibration, bool) or not isinstance(self.bn_recalibration, int) \
                or self.bn_recalibration < 0:
            raise ConfigError(f"TrainConfig.bn_recalibration must be an int >= 0; got {self.bn_recalibration!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"TrainConfig.limit must be a positive number of samples or None; got {self.limit!r}")
        if not (isinstance(self.sampling_width, (int, float)) and self.sampling_width >= 1):
            raise ConfigError(f"TrainConfig.sampling_width must be >= 1 (cells); got {self.sampling_width!r}")
        if not 0 < self.width_anneal <= 1:
            raise ConfigError(f"TrainConfig.width_anneal must be in (0, 1] (a share of the steps); got {self.width_anneal!r}")
        if self.starts_lr is not None and not self.starts_lr > 0:
            raise ConfigError(f"TrainConfig.starts_lr must be > 0 or None (= lr); got {self.starts_lr!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("TrainConfig.device='cuda' but no CUDA device is available; use device='auto' or 'cpu'")

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes``; a misspelled field is a ``ConfigError`` suggesting the close one."""
        return replace_fields(self, changes)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class TrainResult:
    """The final report of a run."""

    test_acc: float
    test_loss: float
    stored_params: int
    stored_bytes: int
    madd: int | None
    seconds: float
    epochs: int
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- fit


def fit(model: nn.Module, dataset: Dataset, config: TrainConfig | None = None, *, out_dir: str | Path | None = None,
        teacher: nn.Module | None = None, resume: bool = True, strict_resume: bool = False,
        stop_after: int | None = None) -> TrainResult:
    """Train ``model`` in place on ``dataset`` and return the final report.

    ``out_dir``: the folder for logs and per-epoch checkpoints (None: no files, no resume); created when
        missing, and checked before any training (``OutputError`` for a file, a link, an unwritable place).
    ``teacher``: a dense model for distillation (kept in eval mode, never updated).
    ``resume``: continue from ``out_dir``'s newest intact checkpoint when there is one; a damaged newest
        one is reported (``NescWarning``) and the one before it used. ``CheckpointError`` when none is usable.
    ``strict_resume``: a damaged newest checkpoint is a ``CheckpointError`` instead of a fallback.
    ``stop_after``: stop after this many epochs in total (the schedule still spans ``config.epochs``);
        what an interrupted run looks like, for tests and for sharing work across sessions.
    """
    config = config or TrainConfig()
    out = prepare_run_dir(out_dir) if out_dir is not None else None
    device = config.resolved_device()
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    x_train, y_train = train_split(dataset, config)
    steps_per_epoch = math.ceil(len(y_train) / config.batch_size)
    groups = param_groups(model, config)
    if not any(g["params"] for g in groups):
        raise InputError(f"{type(model).__name__} has no trainable parameters; nothing to train")
    optimizer = make_optimizer(groups, config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    settings = dataclasses.asdict(config)
    # kept: the last verified checkpoint, kept while the next is written
    start_epoch, history, elapsed, kept = resume_run(out, model, optimizer, scheduler, settings, resume, strict_resume)
    if start_epoch == 0:
        torch.manual_seed(config.seed)  # dropout masks; a resumed run restored the generator instead
    last = config.epochs if stop_after is None else min(config.epochs, stop_after)

    def end_epoch(done: int, elapsed: float) -> None:
        nonlocal kept
        if out is not None:
            write_metrics(out, history)
            save_checkpoint(out, model, optimizer, scheduler, settings, done, history, elapsed, keep=kept)
            kept = done

    with _progress(config) as bar:
        elapsed = run_epochs(
            model, dataset, x_train, config, device, range(start_epoch, last), history, elapsed,
            train_epoch=lambda epoch: _train_epoch(model, teacher, optimizer, scheduler, x_train, y_train, epoch,
                                                   config, device, bar),
            lr=lambda: optimizer.param_groups[0]["lr"], stats=lambda: start_stats(model), end_epoch=end_epoch)
    if config.sampling_width > 1:
        set_sampling_width(model, 1.0)  # what the schedule reaches by its end; what freeze keeps
    return final_report(model, dataset, history, elapsed, device)


def train_split(dataset: Dataset, config: TrainConfig) -> tuple[Tensor, Tensor]:
    x, y = dataset.x_train, dataset.y_train
    if config.limit is not None and config.limit < len(y):
        keep = balanced_indices(y, config.limit, config.seed)
        x, y = x[keep], y[keep]
    return x, y


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation of the train set in ``epoch``: a function of (seed, epoch) alone, so a resumed
    run sees the same batches as an uninterrupted one."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def _train_epoch(model, teacher, optimizer, scheduler, x, y, epoch, config, device, bar) -> tuple[float, float]:
    model.train()
    order = epoch_order(len(y), config.seed, epoch)
    total_loss, correct = 0.0, 0
    task = bar.add_task(f"epoch {epoch + 1}/{config.epochs}", total=len(order)) if bar is not None else None
    steps = math.ceil(len(order) / config.batch_size)
    for step, lo in enumerate(range(0, len(order), config.batch_size)):
        if config.sampling_width > 1:
            set_sampling_width(model, sampling_width_at(epoch * steps + step, config.epochs * steps, config))
        idx = order[lo : lo + config.batch_size]
        xb, yb = x[idx].to(device), y[idx].to(device)
        logits = model(xb)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(xb)
            loss = distillation_loss(logits, t_logits, yb, config.distill_temperature, config.distill_alpha)
        else:
            loss = F.cross_entropy(logits, yb)
        optimizer_step(loss, optimizer, scheduler, epoch, config)
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == yb).sum())
        if bar is not None:
            bar.update(task, advance=len(idx), description=f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}")
    return total_loss / len(order), correct / len(order)


def sampling_width_at(step: int, total: int, config: TrainConfig) -> float:
    """The sampling kernel's half-width at ``step`` of ``total``: ``config.sampling_width`` falling
    linearly to 1 at ``config.width_anneal * total``, then 1. A function of the step alone, so a
    resumed run trains with the widths an uninterrupted one had."""
    end = config.width_anneal * total
    return 1.0 + (config.sampling_width - 1.0) * max(0.0, 1.0 - step / end)


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """One group for the model's own parameters, one per epitome pool with its learning rate
    rescaled, and one for the samplers' start indices.

    Start indices are positions, not weights: their group has no weight decay (which would pull
    every start towards pool cell 0) and the learning rate ``config.starts_lr`` (None: ``lr``).

    A sampled weight is ``W = scale * R(P)`` with a unit-variance pool P and ``scale`` the dense weight's
    std (``passes/epitomize.py``). A step of size ``lr`` on P moves W by ``scale * lr`` (Adam) or
    ``scale**2 * lr`` (SGD), 10-100x less than the same step on a dense weight; dividing the pool's
    rate by ``scale`` (Adam) or ``scale**2`` (SGD), with ``scale`` averaged over the pool's layers, makes
    the weights move as a dense model's would at the same ``lr``.
    """
    pools: dict[int, float] = {}
    starts: list[Tensor] = []
    if isinstance(model, torch.fx.GraphModule):
        for pool_name, samplers in samplers_by_pool(model).items():
            scale = sum(float(s.scale) for s in samplers) / len(samplers)
            power = 2 if config.optimizer == "sgd" else 1
            pools[id(model.get_parameter(pool_name))] = config.lr / scale**power
            starts += [s.starts for s in samplers if s.starts.requires_grad]
    own = pools.keys() | {id(p) for p in starts}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    groups = [{"params": rest, "lr": config.lr}]
    for p in model.parameters():
        if id(p) in pools and p.requires_grad:
            groups.append({"params": [p], "lr": pools[id(p)]})
    if starts:
        groups.append({"params": starts, "lr": config.starts_lr or config.lr, "weight_decay": 0.0})
    return groups


def make_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    """Stepped once per batch: cosine over every step of the run; step decay every ``step_epochs``."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_epochs * steps_per_epoch,
                                               gamma=config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def final_report(model: nn.Module, dataset: Dataset, history: list[dict], elapsed: float, device) -> TrainResult:
    test_loss, test_acc = evaluate(model, dataset, device)
    params, nbytes, madd = model_size(model, dataset)
    return TrainResult(test_acc, test_loss, params, nbytes, madd, elapsed, len(history), history)


def model_size(model: nn.Module, dataset: Dataset | None = None) -> tuple[int, int, int | None]:
    """(stored parameters, stored bytes, MAdd per example) via ``nesc.report``. A plain module is
    captured first to count its MAdd (which needs an example input: ``dataset``'s shape)."""
    if isinstance(model, fx.GraphModule):
        gm = model
    elif dataset is not None:
        example = dataset.x_test[:2].to(next(model.parameters()).device)
        try:
            gm = capture(model, (example,))
        except Exception:  # noqa: BLE001 - a model nesc cannot capture still trains; only MAdd is unknown
            n = sum(p.numel() for p in model.parameters())
            return n, sum(p.numel() * p.element_size() for p in model.parameters()), None
    else:
        n = sum(p.numel() for p in model.parameters())
        return n, sum(p.numel() * p.element_size() for p in model.parameters()), None
    return stored_params(gm), stored_bytes(gm), build_report(gm).madd


# ------------------------------------------------------------------------------------------ progress


def _progress(config: TrainConfig):
    show = config.progress
    if show is None:
        show = sys.stderr.isatty() and not os.environ.get("CI")
    if not show:
        return contextlib.nullcontext()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    # stderr, as the command line's other progress output: stdout keeps only the tables.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)

