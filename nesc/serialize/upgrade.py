"""Read older artifacts into today's graph.

* ``scales_as_buffers``: formats 1-3 spell a sampled weight's gain (``scale``) as a number in its
  ``nesc.regenerate`` node; from format 4 it is a float64 scalar buffer of the routing map, read through
  ``get_attr`` like the starts and fractions, so that ``state_dict()`` holds it. Each such number becomes
  a buffer ``scale`` of the module holding the node's starts (a second gain under the same routing map,
  which no nesc wrote, gets its own ``scale_<k>``) read through a new ``get_attr``. The number is checked
  first (a finite float), as the schema checks the buffer afterwards.
* ``legacy_dequantizations``: format 4 files written before ``nesc.dequantize`` read a quantized pool
  through torch's ops (``quantized_decomposed.dequantize_per_channel(q, s, None, 0, -127, 127,
  torch.int8)``, or ``aten._to_copy(q, dtype=...)`` of a float16 / bfloat16 pool); each such pool read of
  a regenerate node becomes the ``nesc.dequantize`` node that computes the same values
  (``nesc.core.quant``), so a loaded old file is cached and compiled like a new one. The old form's
  constant arguments are checked first; the schema checks the tensors afterwards, in the new form.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from nesc.core.modules import is_regenerate
from nesc.core.quant import AXIS, CAST, LEGACY_DEQUANTIZE, QMAX, QMIN, dequantize_node
from nesc.core.sampling import scale_buffer

from .schema import Invalid


def scales_as_buffers(gm: fx.GraphModule) -> bool:
    """Numeric ``scale`` arguments of regenerate nodes -> buffers read via get_attr; whether any was."""
    changed = False
    for node in list(gm.graph.nodes):
        if not (is_regenerate(node) and len(node.args) > 3 and not isinstance(node.args[3], fx.Node)):
            continue
        scale, starts = node.args[3], node.args[1]
        where = f"regenerate node {node.name}"
        if type(scale) not in (float, int) or not math.isfinite(scale):
            raise Invalid(f"{where}: scale {scale!r} must be a finite number (format 1-3) or a stored tensor")
        if not (isinstance(starts, fx.Node) and starts.op == "get_attr"):
            raise Invalid(f"{where}: starts must be read from a stored tensor (get_attr)")
        owner_name = starts.target.rpartition(".")[0]
        owner = gm.get_submodule(owner_name)
        name = _free_name(owner, scale)
        if getattr(owner, name, None) is None:
            owner.register_buffer(name, scale_buffer(scale))
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(f"{owner_name}.{name}" if owner_name else name)
        node.update_arg(3, attr)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _free_name(owner: torch.nn.Module, scale: float) -> str:
    """``scale``, or the first ``scale_<k>`` that is free or already holds this value."""
    for k in range(len(list(owner.buffers(recurse=False))) + 1):
        name = "scale" if k == 0 else f"scale_{k}"
        held = getattr(owner, name, None)
        if held is None or (isinstance(held, torch.Tensor) and held.shape == () and float(held) == float(scale)):
            return name
    raise Invalid(f"no free buffer name for a scale under {type(owner).__name__}")  # unreachable: k grows


# torch's dequantisation as files before nesc.dequantize wrote it, after (values, scale).
LEGACY_ARGS = (None, AXIS, QMIN, QMAX, torch.int8)


def legacy_dequantizations(gm: fx.GraphModule) -> bool:
    """Every regenerate node's pool read through torch's dequantisation or cast of stored tensors ->
    ``nesc.dequantize`` (same values); whether any was rewritten. ``Invalid`` for torch's int8
    dequantisation with other constants than nesc wrote."""
    legacy = {n.args[0] for n in gm.graph.nodes if is_regenerate(n) and n.args and _legacy_read(n.args[0])}
    for node in [n for n in gm.graph.nodes if n in legacy]:  # graph order: a deterministic rewrite
        values = node.args[0]
        if node.target is LEGACY_DEQUANTIZE:
            scale, dtype = node.args[1], _legacy_int8_dtype(node)
        else:
            scale, dtype = None, node.kwargs["dtype"]
        with gm.graph.inserting_before(node):
            new = dequantize_node(gm.graph, values, scale, dtype)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if legacy:
        gm.recompile()
    return bool(legacy)


def _legacy_read(arg) -> bool:
    """Whether ``arg`` is torch's dequantisation of stored values and scales, or a cast of stored values
    with only a dtype (the two pool reads of files before ``nesc.dequantize``)."""
    if not (isinstance(arg, fx.Node) and arg.op == "call_function"):
        return False
    if arg.target is LEGACY_DEQUANTIZE:
        return len(arg.args) >= 2 and _is_stored(arg.args[0]) and _is_stored(arg.args[1])
    return (arg.target is CAST and len(arg.args) == 1 and _is_stored(arg.args[0]) and set(arg.kwargs) == {"dtype"}
            and isinstance(arg.kwargs["dtype"], torch.dtype))


def _is_stored(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _legacy_int8_dtype(node: fx.Node) -> torch.dtype:
    """The compute dtype of torch's int8 dequantisation as nesc wrote it, after checking its constants."""
    rest, out = tuple(node.args[2:]), node.kwargs.get("out_dtype", torch.float32)
    exact = len(rest) == len(LEGACY_ARGS) and all(type(a) is type(b) and a == b for a, b in zip(rest, LEGACY_ARGS))
    if not exact or set(node.kwargs) - {"out_dtype"} or not (isinstance(out, torch.dtype) and out.is_floating_point):
        raise Invalid(f"dequantize node {node.name}: an int8 pool's dequantisation must be (values, scale, "
                      f"{', '.join(map(str, LEGACY_ARGS))}) to a float dtype, got {rest} {node.kwargs}")
    return out
