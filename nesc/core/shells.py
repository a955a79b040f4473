"""What a frozen model's layer modules hold where their weight was: a ``RegeneratedWeight`` marker.

A nesc graph calls its layers functionally (``F.linear(x, regenerate(pool, ...))``); the user's
``nn.Linear`` / ``nn.Conv2d`` modules stay only as shells that keep their names and remaining
tensors (the bias). Type-based tools (``torch.ao.quantization.quantize_dynamic``, pruning and
palettization libraries) find them by type and read ``.weight``; a shell without one made them fail
deep inside with ``'Linear' object has no attribute 'weight'``. The marker makes every such use raise
one ``RegeneratedWeightError`` saying what the layer is and what to do instead (int8 pools:
``nesc.freeze(gm, pool_dtype=torch.int8)``). The marker is no tensor: it is not in ``state_dict``,
not saved, and nothing of nesc reads it (the graph reads the pools).
"""

from __future__ import annotations

from torch import fx, nn

from .errors import RegeneratedWeightError


class RegeneratedWeight:
    """Stands for the weight ``name`` that the graph regenerates from pool ``pool``; any use raises."""

    __slots__ = ("name", "pool")

    def __init__(self, name: str, pool: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "pool", pool)

    def error(self) -> RegeneratedWeightError:
        return RegeneratedWeightError(
            f"{self.name} is not stored: this frozen nesc model regenerates it from pool {self.pool!r} inside its "
            f"graph, which calls the layer functionally, so a tool that finds layers by type (e.g. "
            f"torch.ao.quantization.quantize_dynamic) cannot read or replace it. To quantize, store the pools as int8: "
            f"nesc.freeze(gm, pool_dtype=torch.int8) (or fine-tune for it with nesc.prepare_qat); to apply the tool "
            f"to the dense model, do it before nesc.transform")

    def __getattr__(self, attr):  # any tensor method or attribute (``.numel()``, ``.shape``, ``.detach()``)
        raise self.error()

    def __setattr__(self, attr, value):
        raise self.error()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        marker = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, RegeneratedWeight))
        raise marker.error()

    def __deepcopy__(self, memo):  # immutable: copies of the model share it
        return self

    def __copy__(self):
        return self

    def __repr__(self) -> str:
        return f"RegeneratedWeight({self.name!r}, pool={self.pool!r})"


def mark_shells(gm: fx.GraphModule, weights: dict[str, str]) -> None:
    """Put a ``RegeneratedWeight`` where each regenerated weight ``{name: pool}`` of ``gm`` was, on the
    module that held it, wherever that module still exists and has no tensor of that name."""
    for name, pool in weights.items():
        owner_path, _, leaf = name.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path)
        except AttributeError:
            continue  # the weight's module is gone (a loaded model holds only containers)
        if not hasattr(owner, leaf) and type(owner) is not nn.Module:
            object.__setattr__(owner, leaf, RegeneratedWeight(name, pool))
