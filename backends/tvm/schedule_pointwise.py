"""The panel rules, for targets with 16-lane registers: vector lanes along a layer's outputs, read from
a transposed panel of its weight. ``pointwise`` is a 1x1 convolution's, ``panel`` a linear layer's.

``tiled`` runs a 1x1 conv's vector lanes along the flattened H x W of its output. Where H x W is no
multiple of a register (14 x 14 = 196, 7 x 7 = 49: MobileNetV2's and ResNet's late layers) those
lanes are a half register or an odd vector, and the conv ran at about half of what the machine does.
This rule turns the tile around, as a GEMM microkernel does, for targets with 16-lane registers:

    out[n, co, p] = sum_ci W[co, ci] * x[n, ci, p]          (p = y * W + x, ``flatten_rows``)

* the weight's panel for a block of ``lanes`` output channels is copied transposed (``[ci, co]``)
  inside the output-channel loop, once per block: ``lanes x ci`` elements, in cache, for
  ``lanes x ci x H x W`` FMAs (a copy of the whole weight up front ran a 1280 x 320 conv 1.6x slower);
* the register block is ``R`` output positions (a divisor of H x W up to ``REGISTER_VECTORS``), each a
  broadcast of ``x[n, ci, p]``, times one vector load of the panel: ``R`` accumulators of ``lanes``;
* the accumulator is laid out ``(p, co)`` so its lanes are contiguous, and the epilogue (bias, batch
  norm scale/shift, activation, residual add) writes it back transposed, once per tile.

``panel`` does the same for ``x @ w.T`` (``dot`` blocks: a linear layer's tokens or batch rows,
``rows`` of them per register block, ``R`` a divisor of the row count up to ``PANEL_ROWS``), whose
output is contiguous along the lanes: no transposed write-back (a ViT's 65 tokens ran ``dot`` at
20 GFLOP/s, an odd row count ``gemm`` cannot vectorise).

``pointwise`` requires a ``tiled`` anchor whose output's last two axes ``rows_contiguous`` allows flattening, whose
flat width is no multiple of ``VECTOR_LANES`` (where it is, ``tiled``'s own lanes are whole
registers), and whose output channels divide into ``lanes``; raises ``ValueError`` otherwise (and
``tiled`` takes over). Guarantees the same results as the unscheduled function (schedule primitives
only; the reduction order over ``ci`` is unchanged).
"""

from __future__ import annotations

from .adapter import arith, region_buffer, tir
from .schedule_layout import flatten_rows, rows_contiguous, tiled_anchor
from .schedule_primitives import (
    child_blocks,
    inline_chain,
    kind,
    parallel_vectorize,
    REGISTER_VECTORS,
    VECTOR_LANES,
    divisor,
    parallel,
    static,
)

MIN_ROWS = 3  # fewest output positions per register block (fewer: the panel's loads dominate)
PANEL_ROWS = 13  # rows of x per register block of ``panel``: 13 accumulators of AVX-512's 32 registers
PANEL_MIN_ROWS = 32  # fewer rows of x in all: the panel's copy costs more than it saves (``dot``)


def pointwise(sch, lanes: int) -> None:
    """Schedule ``sch`` (see the module docstring) with vector lanes of ``lanes`` output channels."""
    anchor, epilogue, local = tiled_anchor(sch, check=_check(lanes))
    if local:
        raise ValueError("pointwise: a producer to compute per tile (a 1x1 conv has none)")
    loops = sch.get_loops(anchor)
    n_spatial = len([iv for iv in sch.get(anchor).iter_vars if iv.iter_type == tir.IterVar.DataPar])
    extents = [static(sch.get(lp).extent) for lp in loops[:n_spatial]]  # the batch may be symbolic
    flat = flatten_rows(sch, anchor, epilogue, n_spatial, extents[-1])
    width = extents[-2] * extents[-1]
    rows = divisor(width, REGISTER_VECTORS)
    if rows < MIN_ROWS:
        raise ValueError(f"pointwise: {width} output positions have no divisor in [{MIN_ROWS}, {REGISTER_VECTORS}]")
    loops = sch.get_loops(anchor)
    outer, channel, position, reduce = list(loops[: n_spatial - 3]), loops[n_spatial - 3], loops[n_spatial - 2], loops[n_spatial - 1:]
    co, co_lanes = sch.split(channel, [None, lanes])
    po, pi = sch.split(position, [None, rows])
    # the channel block outermost: its weight panel is copied once and serves every image and position
    sch.reorder(co, *outer, po, *reduce, pi, co_lanes)

    stmt = sch.get(anchor)
    flat_var = stmt.iter_vars[n_spatial - 2].var
    weight = [i for i, r in enumerate(stmt.reads)
              if not any(v.same_as(flat_var) for rng in r.region for v in tir.analysis.undefined_vars(rng.min))]
    if len(weight) != 1 or len(region_buffer(stmt.reads[weight[0]]).shape) < 2:
        raise ValueError("pointwise: no single weight operand that is the same for every output position")
    panel = sch.cache_read(anchor, weight[0], "global")
    rank = len(region_buffer(stmt.reads[weight[0]]).shape)
    sch.transform_layout(panel, ("write", 0), lambda o, *rest: (*rest, o))  # [co, ci, 1, 1] -> [ci, 1, 1, co]

    if epilogue is None:
        epilogue = sch.cache_write(anchor, 0, "local")
        flat(epilogue)
    else:
        sch.set_scope(anchor, 0, "local")
    sch.transform_layout(anchor, ("write", 0), lambda *ax: (*ax[:-2], ax[-1], ax[-2]))  # (co, p) -> (p, co)
    sch.reverse_compute_at(epilogue, po)
    e_channel, e_position = sch.get_loops(epilogue)[-2:]
    sch.reorder(e_position, e_channel)
    sch.vectorize(e_channel)
    sch.unroll(e_position)
    sch.vectorize(co_lanes)
    sch.unroll(pi)

    sch.compute_at(panel, co)
    panel_loops = sch.get_loops(panel)[1:]
    if len(panel_loops) == rank:
        # the copy's loops in the panel's order (ci outer, co inner): contiguous writes, a vector of
        # ``lanes`` channels each
        sch.reorder(*panel_loops[1:], panel_loops[0])
        sch.vectorize(sch.get_loops(panel)[-1])
    parallel(sch, [co])
    init = sch.decompose_reduction(anchor, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])


def panel(sch, lanes: int) -> None:
    """``x @ w.T`` with vector lanes along w's rows (the outputs) from a transposed panel of w."""
    blocks = child_blocks(sch)
    index = [kind(sch, b) for b in blocks].index("dot")
    anchor = blocks[index]
    stmt = sch.get(anchor)
    spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.DataPar]
    extents = [static(iv.dom.extent) for iv in spatial]
    if len(spatial) < 2 or extents[-1] is None or extents[-1] % lanes:
        raise ValueError(f"panel: {extents[-1]} outputs are no multiple of {lanes} lanes")
    # rows of a symbolic batch (batch x 65 tokens, flattened): a multiple of their static factor
    factor = extents[-2] or int(arith.Analyzer().modular_set(spatial[-2].dom.extent).coeff)
    total = 1
    for n in extents[:-1]:
        total *= n or PANEL_MIN_ROWS  # a symbolic batch: at least one full block of rows
    rows = divisor(factor, PANEL_ROWS)
    if rows < MIN_ROWS or total < PANEL_MIN_ROWS:
        raise ValueError(f"panel: {total} rows of x ({rows} per register block) do not pay for the panel")
    out_var = spatial[-1].var
    others = {iv.var.name for iv in spatial[:-1]}
    weight = [i for i, r in enumerate(stmt.reads) if not region_buffer(r).same_as(region_buffer(stmt.writes[0]))
              and not any(v.name in others for rng in r.region for v in tir.analysis.undefined_vars(rng.min))
              and any(v.same_as(out_var) for rng in r.region for v in tir.analysis.undefined_vars(rng.min))]
    if len(weight) != 1:
        raise ValueError("panel: no single weight operand read the same for every row")
    for b in blocks[:index]:
        parallel_vectorize(sch, b)
    epilogue = inline_chain(sch, anchor, blocks[index + 1 :])
    loops = sch.get_loops(anchor)
    n_spatial = len(spatial)
    outer, row, col, reduce = list(loops[: n_spatial - 2]), loops[n_spatial - 2], loops[n_spatial - 1], loops[n_spatial:]
    jo, ji = sch.split(col, [None, lanes])
    io, ii = sch.split(row, [None, rows])
    sch.reorder(jo, *outer, io, *reduce, ii, ji)
    copy = sch.cache_read(anchor, weight[0], "global")
    sch.transform_layout(copy, ("write", 0), lambda j, k: (k, j))
    if epilogue is None:
        epilogue = sch.cache_write(anchor, 0, "local")
    else:
        sch.set_scope(anchor, 0, "local")
    sch.reverse_compute_at(epilogue, io)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    sch.unroll(sch.get_loops(epilogue)[-2])
    sch.vectorize(ji)
    sch.unroll(ii)
    sch.compute_at(copy, jo)
    copy_loops = sch.get_loops(copy)[1:]
    if len(copy_loops) == 2:  # (j, k) -> k outer, j inner: contiguous writes of the panel
        sch.reorder(copy_loops[1], copy_loops[0])
        sch.vectorize(sch.get_loops(copy)[-1])
    parallel(sch, [jo])
    init = sch.decompose_reduction(anchor, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])


def _check(lanes: int):
    def check(sch, anchor, extents) -> None:
        stmt = sch.get(anchor)
        if len(extents) < 3 or not rows_contiguous(stmt):
            raise ValueError("pointwise: not a 1x1 convolution's flat output")
        if (extents[-2] * extents[-1]) % VECTOR_LANES == 0:
            raise ValueError("pointwise: H x W fills whole registers; tiled's lanes run along it")
        if extents[-3] is None or extents[-3] % lanes:
            raise ValueError(f"pointwise: {extents[-3]} output channels are no multiple of {lanes} lanes")
    return check


__all__ = ["panel", "pointwise"]
