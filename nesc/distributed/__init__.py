"""Training nesc models with torch.distributed: DDP, and FSDP2 sharded block by block.

    python -m torch.distributed.run --nproc-per-node 2 -m nesc.cli train resnet_fmnist \\
        --dataset fashion_mnist --ratio 4 --distributed fsdp --run-dir runs/fsdp

* ``split_blocks`` / ``merge_blocks`` (``blocks``): the flat GraphModule as one submodule per block,
  each owning its pools and samplers (a pool shared by several blocks: their nearest common parent),
  so ``fully_shard`` can wrap each block; and back to the flat graph for freeze, save and the backends.
* ``parallel``: process-group setup, ``wrap`` (DDP, or FSDP2 per block then the root), full state
  dicts under the flat model's names, buffer sync and the cross-rank bit-identity check.
* ``train``: ``fit_distributed``, ``nesc.train.fit`` across processes, with checkpoints in nesc's
  own verified format (no pickle) that resume exactly under DDP and FSDP alike.
"""

from __future__ import annotations

import importlib

MODES = ("ddp", "fsdp")  # wrap's modes; defined here so the command line needs no torch.distributed import

# Imported on first use: torch.distributed.checkpoint takes seconds to import, and the command line
# imports this package for every verb.
_HOME = {"block_paths": "blocks", "flat_names": "blocks", "is_split": "blocks", "merge_blocks": "blocks",
         "split_blocks": "blocks", "full_state": "parallel", "init_process_group": "parallel",
         "load_full_state": "parallel", "ranks_identical": "parallel", "wrap": "parallel",
         "fit_distributed": "train"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODES", *sorted(_HOME)]
