"""Read older artifacts into today's graph: formats 1-3 spell a sampled weight's gain (``scale``) as a
number in its ``nesc.regenerate`` node; from format 4 it is a float64 scalar buffer of the routing map,
read through ``get_attr`` like the starts and fractions, so that ``state_dict()`` holds it.

``scales_as_buffers`` turns each such number into a buffer ``scale`` of the module holding the node's
starts (a second gain under the same routing map, which no nesc wrote, gets its own ``scale_<k>``) and
reads it through a new ``get_attr``. The number is checked first (a finite float), as the schema checks
the buffer afterwards.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from nesc.core.modules import is_regenerate
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
