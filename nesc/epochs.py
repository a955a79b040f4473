"""The epoch loop ``nesc.train.fit`` and ``nesc.distributed.fit_distributed`` share.

    first, history, elapsed, kept = resume_run(out, model, optimizer, scheduler, settings, resume, strict)
    elapsed = run_epochs(model, dataset, x_train, config, device, range(first, last), history, elapsed,
                         train_epoch=lambda epoch: ..., lr=..., stats=..., end_epoch=...)

An epoch is: train (the caller's ``train_epoch``, which owns batching, ranks and progress), batch-norm
recalibration on a fixed set of train batches, evaluation on the test split, one metrics row appended
to ``history`` (``EPOCH_COLUMNS``, the learning rate from ``lr`` and the caller's ``stats``), then
``end_epoch`` (the caller's checkpoint). The two training functions differ only in those callbacks, so a metrics file and a
resumed run read the same under both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn

from nesc.checkpoint import resume_checkpoint
from nesc.core.errors import InputError
from nesc.data import Dataset

EVAL_BATCH = 500
EPOCH_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")


def resume_run(out: Path | None, model, optimizer, scheduler, settings: dict, resume: bool,
               strict: bool) -> tuple[int, list[dict], float, int | None]:
    """(first epoch to run, metrics history, seconds spent, the checkpoint to keep while the next is
    written) of a run in ``out``: from its newest intact checkpoint (``nesc.checkpoint``), or a new run."""
    if out is not None and resume:
        restored = resume_checkpoint(out, model, optimizer, scheduler, settings, strict=strict)
        if restored is not None:
            first, history, elapsed = restored
            return first, history, elapsed, first
    return 0, [], 0.0, None


def run_epochs(model: nn.Module, dataset: Dataset, x_train: Tensor, config, device, epochs: range,
               history: list[dict], elapsed: float, *, train_epoch: Callable[[int], tuple[float, float]],
               lr: Callable[[], float], stats: Callable[[], dict], end_epoch: Callable[[int, float], None]) -> float:
    """Run ``epochs`` (see the module docstring); returns the seconds spent, ``elapsed`` included.
    ``config``: a ``nesc.train.TrainConfig`` (``bn_recalibration``, ``batch_size``)."""
    for epoch in epochs:
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(epoch)
        recalibrate_bn(model, x_train, config, device)
        test_loss, test_acc = evaluate(model, dataset, device)
        elapsed += time.perf_counter() - t0
        values = (epoch + 1, train_loss, train_acc, test_loss, test_acc, lr(), elapsed)
        history.append({**dict(zip(EPOCH_COLUMNS, values)), **stats()})
        end_epoch(epoch + 1, elapsed)
    return elapsed


def optimizer_step(loss: Tensor, optimizer, scheduler, epoch: int, config, where: str = "") -> None:
    """One training step on ``loss``: ``InputError`` when it is not finite (the run diverged; ``where``
    adds to the message, e.g. the rank), else backward, optimizer step and scheduler step."""
    if not torch.isfinite(loss):
        raise InputError(f"training diverged in epoch {epoch + 1}{where}: loss is {loss.item()}; lower --lr "
                         f"(now {config.lr}) or check the data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def recalibrate_bn(model: nn.Module, x: Tensor, config, device) -> None:
    """Batch-norm running statistics as exact averages over the first ``config.bn_recalibration``
    train batches (a fixed set: the result depends on the weights only)."""
    if config.bn_recalibration == 0:
        return
    n = config.bn_recalibration * config.batch_size
    batches = [x[lo : lo + config.batch_size].to(device) for lo in range(0, min(n, len(x)), config.batch_size)]
    was = model.training
    update_bn(batches, model)
    model.train(was)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the test split, in eval mode."""
    was = model.training
    model.eval()
    total, correct = 0.0, 0
    for lo in range(0, len(dataset.y_test), EVAL_BATCH):
        xb = dataset.x_test[lo : lo + EVAL_BATCH].to(device)
        yb = dataset.y_test[lo : lo + EVAL_BATCH].to(device)
        logits = model(xb)
        total += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was)
    n = len(dataset.y_test)
    return total / n, correct / n


__all__ = ["EPOCH_COLUMNS", "evaluate", "optimizer_step", "recalibrate_bn", "resume_run", "run_epochs"]
