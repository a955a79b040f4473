"""torch.distributed plumbing for nesc models: the process group, DDP / FSDP2 wrapping, full states.

* ``init_process_group``: join the group ``torchrun`` describes (gloo on CPU, nccl on CUDA).
* ``wrap(model, "ddp" | "fsdp")``: DDP as is; FSDP2 ``fully_shard`` on every block that holds
  parameters, then on the root. A flat nesc GraphModule is first ``split_blocks``-ed, so each block
  is a module that runs (its hooks fire) and owns its pools; pools shared across blocks stay with the
  root's shard group. A plain ``nn.Module`` is sharded per top-level child. The FSDP model runs
  without nesc's regenerated-weight cache (``nesc.weight_cache``), which cannot see FSDP2's gathers.
* ``full_state`` / ``load_full_state``: the whole model's state (every rank gets it) under the flat
  model's names, and back: what checkpoints store, so a checkpoint does not depend on the world size,
  the wrapping or the split (``torch.distributed.checkpoint.state_dict`` gathers; every rank cuts
  its own shards back out). The same for the optimizer, in ``Optimizer.state_dict`` form.
* ``broadcast_buffers``: rank 0's buffers (batch-norm statistics) to every rank, what DDP does before
  each forward; FSDP2 leaves buffers per rank, so the loop calls it after each step.
* ``ranks_identical``: whether every rank holds bit-identical full state (the tests' check).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from nesc.core.cache import weight_cache
from nesc.core.errors import ConfigError, InputError

from . import MODES
from .blocks import block_paths, flat_names, is_split, split_blocks

FULL = StateDictOptions(full_state_dict=True)
LAUNCH = "launch it with torchrun, e.g. python -m torch.distributed.run --nproc-per-node 2 -m nesc.cli train ..."


def init_process_group() -> tuple[int, int]:
    """(rank, world size) of this process, joining the group torchrun set up when not joined yet."""
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed; install a build with distributed support")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise InputError(f"distributed training needs the RANK and WORLD_SIZE that torchrun sets; {LAUNCH}")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap(model: nn.Module, mode: str, depth: int = 1) -> nn.Module:
    """``model`` ready for data-parallel training in ``mode`` (see the module docstring). ``fsdp``
    shards a split copy of a GraphModule's structure (sharing its tensors until sharding replaces them)
    and, for a plain module, the module itself: use ``full_state`` to read the result back."""
    if mode not in MODES:
        raise ConfigError(f"distributed mode {mode!r} is not one of {', '.join(MODES)}")
    init_process_group()
    if mode == "ddp":
        return DistributedDataParallel(model)
    if isinstance(model, torch.fx.GraphModule) and not is_split(model):
        model = split_blocks(model, depth)
    device = next(model.parameters()).device.type
    mesh = torch.distributed.device_mesh.init_device_mesh(device, (dist.get_world_size(),))
    paths = block_paths(model) if is_split(model) else [n for n, _ in model.named_children()]
    for path in paths:
        block = model.get_submodule(path)
        if any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _no_weight_cache(model)
    return model


def _no_weight_cache(model: nn.Module) -> None:
    """Switch nesc's regenerated-weight cache off during ``model``'s forward: it keys on tensor objects
    and versions, and FSDP2 all-gathers every forward into the same unsharded tensors without bumping
    their versions, so a cached eval-mode weight would outlive an optimizer step."""
    switches = []
    model.register_forward_pre_hook(lambda *_: switches.append(weight_cache(False)))
    model.register_forward_hook(lambda *_: switches.pop().__exit__() if switches else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model state on every rank (a collective: every rank calls it), flat names."""
    state = get_model_state_dict(model, options=FULL)
    inner = unwrap(model)
    state = flat_names(inner, state) if is_split(inner) else state
    return {k: v.detach().clone() for k, v in state.items()}


def load_full_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a ``full_state`` into a wrapped (or plain) model on every rank. Every rank holds the whole
    state, so each cuts its own shards locally (``set_model_state_dict`` would scatter from rank 0, and
    its gloo scatter of unevenly sharded tensors aborts in torch 2.13)."""
    inner = unwrap(model)
    state = split_names(inner, state)
    inner.load_state_dict({k: _like(state[k], v) if k in state else state[k] for k, v in inner.state_dict().items()})


def _like(full: Tensor, live: Tensor) -> Tensor:
    """``full`` as ``live`` holds it: this rank's shard of a DTensor, or the tensor itself."""
    if isinstance(live, DTensor):
        return distribute_tensor(full.to(live.device, live.dtype), live.device_mesh, live.placements, src_data_rank=None)
    return full


def split_names(model: nn.Module, state: dict) -> dict:
    """``flat_names`` inverted: flat-model names to the names of the (split) ``model``."""
    if not is_split(model):
        return state
    ours = {flat: key for key, flat in zip(model.state_dict(), flat_names(model, model.state_dict()))}
    return {ours.get(k, k): v for k, v in state.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state on every rank in ``Optimizer.state_dict`` form (parameters by index
    in group order), so it reads like a single process's: what ``nesc.checkpoint`` stores."""
    state = get_optimizer_state_dict(model, optimizer, options=FULL)
    index = {fqn: i for i, fqn in enumerate(p for g in state["param_groups"] for p in g["params"])}
    groups = [{**g, "params": [index[p] for p in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``full_optimizer_state`` back into ``optimizer`` on every rank, each cutting its own shards of
    the per-parameter tensors (a momentum buffer is sharded as its parameter)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    local = {int(i): {k: _like(v, params[int(i)]) if isinstance(v, Tensor) and v.dim() else v
                      for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (batch-norm running statistics)."""
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer, src=0)


def ranks_identical(state: dict[str, Tensor]) -> list[str]:
    """The names whose tensors differ from rank 0's on some rank (empty: bit-identical everywhere)."""
    differ = []
    for name, tensor in sorted(state.items()):
        mine = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # bits, so NaNs compare too
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        same = torch.tensor([int(torch.equal(mine, theirs))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if not same.item():
            differ.append(name)
    return differ
