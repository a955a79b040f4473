"""Converters for what apache-tvm 0.27's torch importer gets wrong, keyed as its converter table is.

Each entry takes over one op from the importer (``from_exported_program(custom_convert_map=...)``),
handles the case the importer mistranslates, and hands every other case back to the importer's own
converter, unchanged:

* ``arange.start_step`` with a negative integer step: the importer types ``arange(16, -16, -1)`` as
  34 elements long (its ceiling division rounds the wrong way for a negative step) while it computes
  32, so the next broadcast fails at build time (Funnel's relative positions). Emitted as
  ``start + step * arange(n)``, with ``n`` counted here.
* ``slice_scatter.default`` with an open bound (``start=None`` / ``end=None``: a re-exported
  ``x[..., :n] *= m``, Funnel's relative shift): the importer hands ``None`` to ``relax.prim_value``,
  which raises. An open start is 0 and an open end ``sys.maxsize`` (torch's own "to the end", which
  the importer clamps to the axis length).

    %r = aten.arange.start_step(16, -16, -1)   ->   %i = arange(0, 32, 1); %r = %i * -1 + 16
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from torch import fx

from .adapter import relax

_SLICE_SCATTER = ("input", "src", "dim", "start", "end", "step")


def convert_arange(node: fx.Node, importer) -> relax.Var:
    """``aten.arange.start_step(start, end, step)``; see the module docstring."""
    args = node.args
    if not (len(args) == 3 and all(type(a) is int for a in args) and args[2] < 0):
        return _own_converter(importer, "arange.start_step")(node)
    start, end, step = args
    dtype = str(node.meta["val"].dtype).removeprefix("torch.")
    bb = importer.block_builder
    index = bb.emit(relax.op.arange(0, len(range(start, end, step)), 1, dtype=dtype))  # (n,)
    return bb.emit(relax.op.add(bb.emit(relax.op.multiply(index, relax.const(step, dtype))), relax.const(start, dtype)))


def convert_slice_scatter(node: fx.Node, importer) -> relax.Var:
    """``aten.slice_scatter(input, src, dim, start, end, step)``; see the module docstring."""
    given = dict(zip(_SLICE_SCATTER, node.args)) | dict(node.kwargs)
    if given.get("start", 0) is not None and given.get("end", 0) is not None:
        return _own_converter(importer, "slice_scatter.default")(node)
    given["start"] = 0 if given.get("start") is None else given["start"]
    given["end"] = sys.maxsize if given.get("end") is None else given["end"]
    given.setdefault("dim", 0)
    given.setdefault("step", 1)
    # The importer's converter reads only ``args`` and ``kwargs``: the same node with the bounds closed.
    closed = SimpleNamespace(args=tuple(given[k] for k in _SLICE_SCATTER), kwargs={})
    return _own_converter(importer, "slice_scatter.default")(closed)


def _own_converter(importer, op: str):
    """The importer's own converter of ``op``, bound to ``importer`` (its ``convert_map`` entry is ours)."""
    return importer.create_convert_map()[op]


# op name, as the importer spells it -> converter (node, importer) -> relax.Var.
IMPORTER_FIXES = {
    "arange.start_step": convert_arange,
    "slice_scatter.default": convert_slice_scatter,
}

__all__ = ["IMPORTER_FIXES", "convert_arange", "convert_slice_scatter"]
