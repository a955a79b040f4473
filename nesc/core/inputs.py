"""Example inputs: checking them, exporting them with a symbolic batch, and rebuilding them from specs.

Every stage that runs a model on example inputs (capture, the passes' shape propagation, save's
re-export, TVM lowering and build, ONNX export, the CLI) goes through these helpers, so the rules are
written once:

* ``as_tensors``: a tensor or a non-empty tuple/list of tensors, else an ``InputError`` saying what was
  given and what to pass.
* ``export_batch`` / ``batch_dims``: ``torch.export`` specialises a dimension of size 1 to the constant
  1, so a batch-1 example is exported at batch 2 (the examples only carry shapes), with dimension 0
  marked ``Dim.AUTO`` so one capture serves any batch.
* ``as_kwargs`` / ``in_signature_order`` / ``export_dims``: keyword example inputs (``attention_mask=``,
  ``labels=``), ordered as the model's forward takes them, exported with a symbolic batch and, for
  integer inputs (token ids, masks), a symbolic sequence length.
* ``from_specs``: the ``(shape, dtype name)`` list that capture records in
  ``gm.meta[names.INPUT_SPECS]`` back to tensors: seeded normal values for floating dtypes, zeros for
  integer ones (0 is a valid index for any embedding), from a private generator so the global RNG
  never moves.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import InputError

# (shape, dtype name), as capture records them.
InputSpec = tuple[tuple[int, ...], str]
EXPORT_MIN_BATCH = 2


def as_tensors(example_inputs, where: str, error: type[Exception] = InputError) -> tuple[Tensor, ...]:
    """``example_inputs`` as a non-empty tuple of tensors; ``where`` names the caller in the message."""
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise error(
            f"{where}: example_inputs must be a tensor or a non-empty tuple of tensors (one per positional "
            f"argument of forward), got {type(example_inputs).__name__}; wrap a single tensor as (x,), e.g. "
            f"(torch.randn(1, 3, 32, 32),)"
        )
    bad = [i for i, t in enumerate(example_inputs) if not isinstance(t, Tensor)]
    if bad:
        raise error(
            f"{where}: example_inputs[{bad[0]}] is a {type(example_inputs[bad[0]]).__name__}, expected a "
            f"torch.Tensor; pass tensor inputs, e.g. (torch.randn(1, 3, 32, 32),)"
        )
    return tuple(example_inputs)


def describe(inputs: Sequence[Tensor]) -> str:
    """``(1, 3, 32, 32):float32, ...`` for messages."""
    return ", ".join(f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for t in inputs)


def has_batch_one(inputs: Sequence[Tensor]) -> bool:
    return any(t.dim() > 0 and t.shape[0] == 1 for t in inputs)


def export_batch(inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The inputs with a batch of 1 widened to ``EXPORT_MIN_BATCH`` (repeating the example), so that
    ``torch.export`` keeps the batch dimension symbolic."""
    return tuple(t.expand(EXPORT_MIN_BATCH, *t.shape[1:]).clone() if t.dim() > 0 and t.shape[0] == 1 else t
                 for t in inputs)


def batch_dims(inputs: Sequence[Tensor], dim=None) -> tuple:
    """``dynamic_shapes`` for ``torch.export.export``: dimension 0 of every input with a batch is
    ``dim`` (default ``Dim.AUTO``: symbolic where the model allows)."""
    dim = torch.export.Dim.AUTO if dim is None else dim
    return tuple({0: dim} if t.dim() > 0 else None for t in inputs)


def as_kwargs(example_kwargs, where: str, error: type[Exception] = InputError) -> dict[str, Tensor]:
    """``example_kwargs`` (None or a dict of name -> tensor) as a dict; anything else is an error."""
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, dict) or not all(isinstance(k, str) for k in example_kwargs):
        raise error(f"{where}: example_kwargs must be a dict of keyword name -> tensor, got "
                    f"{type(example_kwargs).__name__}; e.g. {{'attention_mask': torch.ones(2, 16, dtype=torch.long)}}")
    bad = [k for k, t in example_kwargs.items() if not isinstance(t, Tensor)]
    if bad:
        raise error(f"{where}: example_kwargs[{bad[0]!r}] is a {type(example_kwargs[bad[0]]).__name__}, expected a "
                    f"torch.Tensor; fix a non-tensor setting on the model (its config) instead of passing it")
    return dict(example_kwargs)


def in_signature_order(forward, kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
    """``kwargs`` ordered as ``forward``'s parameters are (those it only takes through ``**kwargs`` last):
    the order in which a captured graph takes every input positionally."""
    try:
        order = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return dict(kwargs)
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(kwargs.items(), key=lambda kv: rank.get(kv[0], len(order))))


def dynamic_dims(t: Tensor, dim=None) -> dict | None:
    """``dynamic_shapes`` of one input: dimension 0 (the batch) symbolic; for integer inputs (token ids,
    attention masks, labels, positions) every dimension, so that one capture serves any sequence length
    the model allows."""
    dim = torch.export.Dim.AUTO if dim is None else dim
    if t.dim() == 0:
        return None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        return {0: dim}
    return {d: dim for d in range(t.dim())}


# torch 2.13's export lists an input that forward takes through ``**kwargs`` twice (under ``kwargs`` and
# under its own name, in ``_get_range_constraints``) and fails on any ``dynamic_shapes`` ("Must provide a
# tree_name when there might be a mismatch": FNet's ``attention_mask``); torch 2.14 takes them.
DIMS_THROUGH_VAR_KEYWORD = torch.__version__ >= "2.14"


def export_dims(forward, args: Sequence[Tensor], kwargs: dict[str, Tensor]):
    """``dynamic_shapes`` for ``torch.export.export(model, args, kwargs)`` (``dynamic_dims`` of each
    input): a tuple without keywords, else a dict keyed by ``forward``'s parameter names, as export asks;
    None (every shape as given) where this torch cannot take them (``DIMS_THROUGH_VAR_KEYWORD``)."""
    if not kwargs:
        return tuple(dynamic_dims(t) for t in args)
    params = inspect.signature(forward).parameters
    bound = inspect.signature(forward).bind(*args, **kwargs).arguments
    out = {}
    for name, value in bound.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(dynamic_dims(t) for t in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            if not DIMS_THROUGH_VAR_KEYWORD:
                return None
            out[name] = {k: dynamic_dims(t) for k, t in value.items()}
        else:
            out[name] = dynamic_dims(value)
    return out


def check_specs(specs, where: str, error: type[Exception] = InputError) -> list[InputSpec]:
    """Validate recorded input specs: a list of (shape of non-negative ints, torch dtype name)."""
    if not isinstance(specs, (list, tuple)) or not specs:
        raise error(f"{where}: input specs must be a non-empty list of (shape, dtype), got {specs!r}")
    out = []
    for entry in specs:
        try:
            shape, dtype = entry
            shape = tuple(shape)
        except (TypeError, ValueError):
            raise error(f"{where}: input spec {entry!r} is not a (shape, dtype) pair") from None
        if not all(type(d) is int and d >= 0 for d in shape):
            raise error(f"{where}: input spec shape {shape!r} must hold non-negative ints")
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise error(f"{where}: input spec dtype {dtype!r} is not a torch dtype name (e.g. 'float32')")
        out.append((shape, dtype))
    return out


def specs_of(inputs: Sequence[Tensor]) -> list[InputSpec]:
    return [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in inputs]


def from_specs(specs: Sequence[InputSpec], *, batch: int | None = None, seed: int = 0,
               fill: str = "randn") -> tuple[Tensor, ...]:
    """Tensors of the recorded shapes and dtypes; ``batch`` replaces dimension 0; ``fill="zeros"`` for
    shape-only uses (shape propagation)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in specs:
        shape = list(shape)
        if batch is not None and shape:
            shape[0] = batch
        dt = getattr(torch, dtype)
        if fill == "randn" and (dt.is_floating_point or dt.is_complex):
            out.append(torch.randn(shape, generator=gen, dtype=dt))
        else:
            out.append(torch.zeros(shape, dtype=dt))
    return tuple(out)
