"""``fit_distributed``: ``nesc.train.fit`` across the processes ``torchrun`` starts (DDP or FSDP2).

    # python -m torch.distributed.run --nproc-per-node 2 my_train.py
    gm = nesc.transform(model, example_inputs, nesc.NESConfig(ratio=4))
    result = nesc.distributed.fit_distributed(gm, dataset, TrainConfig(epochs=5), mode="fsdp",
                                              out_dir="runs/fsdp")   # gm holds the trained weights

Every step takes the global batch of ``nesc.train.fit`` (``batch_size`` samples in the order of
``epoch_order(seed, epoch)``) and gives each rank an equal slice, so the averaged gradient is the
global batch's up to summation order; a trailing partial batch is dropped. After each step every
rank takes rank 0's buffers (batch-norm statistics, as DDP does). Dropout masks come from a generator
seeded by (seed, rank, epoch), so they differ between ranks and a resumed epoch draws the same ones.

Checkpoints are ``nesc.checkpoint``'s verified, pickle-free files holding the *full* model and
optimizer state under the flat model's names, gathered and scattered with
``torch.distributed.checkpoint.state_dict`` (DCP's own storage pickles its metadata, which nesc never
reads). So a run resumes exactly, with DDP or FSDP, and with another world size. Rank 0 writes; every
rank reads. Parameters stay bit-identical across ranks (DDP averages the same gradients everywhere;
FSDP keeps one copy, sharded); ``parallel.ranks_identical`` checks it.
Not supported here (use ``nesc.train.fit``): a teacher (distillation) and progress bars.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn
from torch.nn import functional as F

from nesc.checkpoint import prepare_run_dir, save_checkpoint, write_metrics
from nesc.core.errors import ConfigError, InputError
from nesc.core.modules import set_sampling_width, start_stats
from nesc.data import Dataset
from nesc.epochs import optimizer_step, resume_run, run_epochs
from nesc.train import (
    TrainConfig,
    TrainResult,
    epoch_order,
    final_report,
    make_optimizer,
    make_scheduler,
    param_groups,
    sampling_width_at,
    train_split,
)

from .blocks import flat_names, is_split
from .parallel import (
    broadcast_buffers,
    full_optimizer_state,
    full_state,
    init_process_group,
    load_full_optimizer_state,
    load_full_state,
    unwrap,
    wrap,
)


def fit_distributed(model: nn.Module, dataset: Dataset, config: TrainConfig | None = None, *, mode: str = "ddp",
                    out_dir: str | Path | None = None, resume: bool = True, strict_resume: bool = False,
                    stop_after: int | None = None, depth: int = 1) -> TrainResult:
    """Train ``model`` on every rank of the process group (``mode``: ``ddp`` or ``fsdp``; ``depth``:
    where FSDP cuts blocks, ``split_blocks``); ``model`` ends holding the trained state on every
    rank. The other arguments are ``nesc.train.fit``'s; ``out_dir`` must be one folder all ranks see."""
    config = config or TrainConfig()
    rank, world = init_process_group()
    if config.batch_size % world:
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size} must be a multiple of the world size "
                          f"{world} (every rank takes an equal slice of each global batch)")
    device = _device(config)
    model.to(device)
    out = _run_dir(out_dir, rank)
    x_train, y_train = train_split(dataset, config)
    steps = len(y_train) // config.batch_size
    if steps == 0:
        raise InputError(f"{len(y_train)} training samples make no full batch of {config.batch_size}; "
                         "lower TrainConfig.batch_size")
    groups = _named_groups(model, config)
    aliases = _aliases(model)
    work = model if isinstance(model, fx.GraphModule) or mode == "ddp" else copy.deepcopy(model)
    wrapped = wrap(work, mode, depth)
    live = _flat_parameters(unwrap(wrapped))
    optimizer = make_optimizer([{**g, "params": [live[n] for n in g["params"]]} for g in groups], config)
    scheduler = make_scheduler(optimizer, config, steps)
    state = _FullState(wrapped, optimizer)
    settings = dataclasses.asdict(config)
    start_epoch, history, elapsed, kept = resume_run(out, state, state.optimizer_view, scheduler, settings, resume,
                                                     strict_resume)
    last = config.epochs if stop_after is None else min(config.epochs, stop_after)

    def train_epoch(epoch: int) -> tuple[float, float]:
        torch.manual_seed(rank_seed(config.seed, rank, epoch))
        return _train_epoch(wrapped, optimizer, scheduler, x_train, y_train, epoch, steps, config, device, rank, world)

    def end_epoch(done: int, elapsed: float) -> None:
        nonlocal kept
        if out is None:
            return
        state.snapshot()  # every rank gathers; rank 0 writes
        if rank == 0:
            write_metrics(out, history)
            save_checkpoint(out, state, state.optimizer_view, scheduler, settings, done, history, elapsed, keep=kept)
        state.release()
        dist.barrier()
        kept = done

    elapsed = run_epochs(wrapped, dataset, x_train, config, device, range(start_epoch, last), history, elapsed,
                         train_epoch=train_epoch, lr=lambda: optimizer.param_groups[0]["lr"],
                         stats=lambda: start_stats(unwrap(wrapped)) if mode == "ddp" else {}, end_epoch=end_epoch)
    if config.sampling_width > 1:
        set_sampling_width(wrapped, 1.0)
    _write_back(model, full_state(wrapped), aliases)
    return final_report(model, dataset, history, elapsed, device)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """The global generator's seed on ``rank`` in ``epoch`` (dropout): a function of the three alone."""
    return (seed * 1_000_003 + epoch) * 4_099 + rank


def _train_epoch(model, optimizer, scheduler, x, y, epoch, steps, config, device, rank, world) -> tuple[float, float]:
    model.train()
    order = epoch_order(len(y), config.seed, epoch)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples (this rank)
    for step in range(steps):
        if config.sampling_width > 1:
            set_sampling_width(model, sampling_width_at(epoch * steps + step, config.epochs * steps, config))
        idx = order[step * config.batch_size : (step + 1) * config.batch_size].tensor_split(world)[rank]
        xb, yb = x[idx].to(device), y[idx].to(device)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer_step(loss, optimizer, scheduler, epoch, config, f" on rank {rank}")
        broadcast_buffers(model)
        totals += torch.tensor([loss.item() * len(idx), int((logits.argmax(1) == yb).sum()), len(idx)],
                               dtype=torch.float64)
    dist.all_reduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


class _FullState:
    """The wrapped model and its optimizer as ``nesc.checkpoint`` reads them: ``state_dict`` gives the
    full state under the flat names (a collective; ``snapshot`` gathers once so that rank 0 alone can
    write), ``load_state_dict`` scatters a full state back."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.saved: tuple[dict, dict] | None = None
        self.optimizer_view = _OptimizerView(self)

    def snapshot(self) -> None:
        self.saved = (full_state(self.model), full_optimizer_state(self.model, self.optimizer))

    def release(self) -> None:
        self.saved = None

    def state_dict(self) -> dict[str, Tensor]:
        return self.saved[0] if self.saved else full_state(self.model)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        load_full_state(self.model, state)


class _OptimizerView:
    def __init__(self, full: _FullState) -> None:
        self.full = full

    @property
    def param_groups(self) -> list[dict]:
        return self.full.optimizer.param_groups

    def state_dict(self) -> dict:
        saved = self.full.saved
        return saved[1] if saved else full_optimizer_state(self.full.model, self.full.optimizer)

    def load_state_dict(self, state: dict) -> None:
        load_full_optimizer_state(self.full.model, self.full.optimizer, state)


def _device(config: TrainConfig) -> torch.device:
    device = config.resolved_device()
    if device.type == "cuda":
        local = dist.get_rank() % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def _run_dir(out_dir, rank: int) -> Path | None:
    if out_dir is None:
        return None
    out = prepare_run_dir(out_dir) if rank == 0 else None
    dist.barrier()  # rank 0 created and checked it
    return out or Path(out_dir)


def _named_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """``nesc.train.param_groups`` of the flat model with parameters by name (wrapping replaces them)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, config)
    if not any(g["params"] for g in groups):
        raise InputError(f"{type(model).__name__} has no trainable parameters; nothing to train")
    return [{**g, "params": [name_of[id(p)] for p in g["params"]]} for g in groups]


def _flat_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    return dict(zip(flat_names(model, params), params.values())) if is_split(model) else params


def _aliases(model: nn.Module) -> list[list[str]]:
    """Names of each tensor of ``model``'s state (several for a tied parameter)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return list(by_id.values())


@torch.no_grad()
def _write_back(model: nn.Module, state: dict[str, Tensor], aliases: list[list[str]]) -> None:
    """Put ``state`` into ``model`` as plain tensors (sharding replaced the parameters of modules the
    wrapped model shares with it), one Parameter per tied group."""
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise InputError(f"the trained state lacks {missing[:3]} of {type(model).__name__}; this is a bug in "
                         "nesc.distributed (the split's names do not map back)")
    params = dict(model.named_parameters(remove_duplicate=False))
    for group in aliases:
        old = params[group[0]]
        param = nn.Parameter(state[group[0]].to(old.device), requires_grad=old.requires_grad)
        for alias in group:
            owner, _, leaf = alias.rpartition(".")
            setattr(model.get_submodule(owner), leaf, param)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in state:
            buffer.copy_(state[name])


__all__ = ["fit_distributed", "rank_seed"]
