"""Ops of a captured graph rewritten into equivalent ones that every consumer of nesc's graphs takes.

Capture applies these after ``torch.export`` (and the allocation rules after ``symbolic_trace``), so
that passes, ``nesc.save`` (whose allow-list has only pure ops, ``nesc.serialize.ops``) and the
backends see one vocabulary. Each rule changes no value a correct program computes:

* **views as reshapes** (``aten.view`` -> ``aten.reshape``): a view is valid only for the strides its
  input had at export; a backend's decompositions may give that input others (the CPU
  ``scaled_dot_product_attention`` decomposition, then Hugging Face's ``.transpose(1, 2).view(B, S,
  -1)``: "Cannot view a tensor with shape ... and strides ..."). ``reshape`` views where it can.
* **fresh allocations as zeros** (``empty``, ``empty_like``, ``new_empty`` -> their ``zeros`` forms):
  the values of an uninitialised tensor are unspecified, so zeros are one of them; an artifact then
  never reads memory it did not write (WavLM's attention passes ``torch.empty([0])`` biases).
* **lifted constants** (``lift_fresh_copy`` -> ``clone``, ``detach_`` -> ``detach``): what export
  writes for ``torch.tensor(...)`` inside forward (DeBERTa-v2's ``scaled_size_sqrt``): a copy of a
  constant, detached in place. The out-of-place forms compute the same tensors.
* **attribute transposes** (``numpy_T``, ``mT``, ``mH``, ``adjoint``, ``matrix_H`` -> ``permute``):
  what export keeps of ``w.T``, ``w.mT``, ``w.H``, ... (Falcon's ``input @ self.weight.T``). The
  allow-list and ``passes.weight_ops.is_transpose`` know ``permute``; the conjugating ones equal it on
  real tensors only, so a complex input keeps its op.

    %e = aten.empty.memory_format([0], device=cpu)   ->   %e = aten.zeros.default([0], device=cpu)
"""

from __future__ import annotations

import torch
from torch import fx

from nesc.core import compat

aten = torch.ops.aten

# (op -> equivalent op) for exported aten graphs; keyword arguments the new op's schema lacks
# (``memory_format`` of ``empty``) are dropped: they choose a layout, never a value.
VIEWS = {aten.view.default: aten.reshape.default}
ALLOCATIONS = {
    aten.empty.memory_format: aten.zeros.default, aten.empty_like.default: aten.zeros_like.default,
    aten.new_empty.default: aten.new_zeros.default,
}
LIFTED = {aten.lift_fresh_copy.default: aten.clone.default, aten.detach_.default: aten.detach.default}
EXPORTED = VIEWS | ALLOCATIONS | LIFTED


def _swap_last_two(rank: int) -> list[int] | None:
    return [*range(rank - 2), rank - 1, rank - 2] if rank >= 2 else None


# op -> (whether it conjugates, rank -> the dims of the permute it is, or None for a rank the op
# rejects). A 2-D transpose is permute [1, 0].
TRANSPOSES = {
    aten.numpy_T.default: (False, lambda rank: list(range(rank))[::-1]),
    aten.mT.default: (False, _swap_last_two),
    aten.mH.default: (True, _swap_last_two),
    aten.adjoint.default: (True, _swap_last_two),
    aten.matrix_H.default: (True, lambda rank: [1, 0] if rank == 2 else None),
}
# The same allocations as symbolic_trace records them (torch functions and Tensor methods).
TRACED_FUNCTIONS = {torch.empty: torch.zeros, torch.empty_like: torch.zeros_like}
TRACED_METHODS = {"new_empty": "new_zeros"}


def rewrite_ops(gm: fx.GraphModule, rules: dict) -> bool:
    """Retarget every ``call_function`` node whose target is a key of ``rules`` (aten overloads or torch
    functions) and every ``call_method`` node of ``TRACED_METHODS``; returns whether any changed."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in rules:
            new = rules[node.target]
            if compat.is_op_overload(new):
                known = set(compat.argument_names(new))
                node.kwargs = {k: v for k, v in node.kwargs.items() if k in known}
            node.target = new
            changed = True
        elif node.op == "call_method" and node.target in TRACED_METHODS and rules is TRACED_FUNCTIONS:
            node.target = TRACED_METHODS[node.target]
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def transposes_as_permutes(gm: fx.GraphModule) -> bool:
    """The ``TRANSPOSES`` rule (see the module docstring) on the nodes whose input's rank and dtype the
    export recorded (``meta["val"]``); returns whether any node changed."""
    changed = False
    for node in gm.graph.nodes:
        rule = TRANSPOSES.get(node.target) if node.op == "call_function" else None
        val = getattr(node.args[0], "meta", {}).get("val") if rule and node.args else None
        if not isinstance(val, torch.Tensor) or (rule[0] and val.is_complex()):
            continue
        dims = rule[1](val.dim())
        if dims is None:
            continue  # a rank the op rejects: keep it, and its error
        node.target, node.args, node.kwargs = aten.permute.default, (node.args[0], dims), {}
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def views_as_reshapes(gm: fx.GraphModule) -> bool:
    """Only the ``VIEWS`` rule (see the module docstring); returns whether any node changed."""
    return rewrite_ops(gm, VIEWS)


def exported_as_pure(gm: fx.GraphModule) -> bool:
    """Every rule for an exported aten graph (``EXPORTED``, ``TRANSPOSES``); returns whether any node changed."""
    return rewrite_ops(gm, EXPORTED) | transposes_as_permutes(gm)


def traced_as_pure(gm: fx.GraphModule) -> bool:
    """The allocation rules for a symbolic_trace graph; returns whether any node changed."""
    return rewrite_ops(gm, TRACED_FUNCTIONS)


__all__ = ["exported_as_pure", "rewrite_ops", "traced_as_pure", "transposes_as_permutes", "views_as_reshapes"]
