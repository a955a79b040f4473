"""The schedule rules for ``x @ w.T`` (``dot`` blocks: both operands contiguous along the reduction;
a linear layer's weight read in its stored (out, in) layout, never transposed per call):

* ``panel`` — targets with 16-lane registers, 32 rows of x or more: vector lanes along w's rows (the
  outputs), read from a transposed panel of w copied once per block of outputs (``lanes x k``
  elements, in cache), a register block of up to ``PANEL_ROWS`` rows of x, each a broadcast scalar;
  the output is contiguous along the lanes, so the accumulator is written back as it is (a ViT's 65
  tokens, which no register divides, ran ``dot`` at 20 GFLOP/s and this at 70-90).
* ``gemm`` — ``GEMM_MIN_ROWS`` static rows of x or more, a multiple of 4: x copied transposed, vector
  lanes along its rows, a register block of w's rows (one broadcast scalar each), the accumulator
  transposed to match.
* ``dot`` — few rows (a linear layer at batch 1 or 8) or an odd count: vector lanes along the
  reduction, each accumulating a partial dot product, summed once per output; a register block of
  outputs, and of rows of x too where the target has 32 vector registers.

Each raises ``ValueError`` (or TVM's schedule error) where it does not apply, and the next takes over.
"""

from __future__ import annotations

from .adapter import arith, region_buffer, tir
from .schedule_pointwise import MIN_ROWS
from .schedule_primitives import (
    MAX_INNER,
    REGISTER_VECTORS,
    VECTOR_LANES,
    child_blocks,
    contiguous_reads,
    divisor,
    inline_chain,
    kind,
    num_spatial,
    parallel,
    parallel_vectorize,
    static,
    vector_lanes,
)

GEMM_MIN_ROWS = 16  # rows of x that make ``gemm``'s vector lanes along them pay (fewer: ``dot``)
GEMM_REGISTER_ROWS = 8  # outputs per register block in ``gemm`` (rows of w, one broadcast each)
PANEL_ROWS = 13  # rows of x per register block of ``panel``: 13 accumulators of AVX-512's 32 registers
PANEL_MIN_ROWS = 32  # fewer rows of x in all: the panel's copy costs more than it saves (``dot``)


def _anchor(sch):
    """The rules' anchor, the one ``dot`` block: (child blocks, its index, the block)."""
    blocks = child_blocks(sch)
    index = [kind(sch, b) for b in blocks].index("dot")
    return blocks, index, blocks[index]


def _prologue(sch, blocks, index):
    """The producers before the anchor in their own parallel passes; the consumers after it inlined into
    one epilogue (``inline_chain``), which is returned."""
    for b in blocks[:index]:
        parallel_vectorize(sch, b)
    return inline_chain(sch, blocks[index], blocks[index + 1 :])


def panel(sch, lanes: int) -> None:
    """``x @ w.T`` with vector lanes along w's rows (the outputs) from a transposed panel of w."""
    blocks, index, anchor = _anchor(sch)
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
    if len(weight) != 1 or len(region_buffer(stmt.reads[weight[0]]).shape) != 2:
        raise ValueError("panel: no single 2-D weight operand read the same for every row")
    epilogue = _prologue(sch, blocks, index)
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


def gemm(sch) -> None:
    """x @ w.T with many rows of x: copy x transposed (rows along memory: a small pass over the input),
    then tile as ``tiled`` does, vector lanes along the rows of x and a register block of the outputs
    of w's rows, each a broadcast scalar of w. Every lane accumulates a whole output: no horizontal sum
    per output, as ``dot``'s lanes need. Raises (and ``dot`` takes over) when x has too few rows."""
    blocks, index, anchor = _anchor(sch)
    n_spatial = num_spatial(sch, anchor)
    stmt = sch.get(anchor)
    spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.DataPar]
    rows = static(spatial[-2].dom.extent) if n_spatial >= 2 else None
    if rows is None or rows < GEMM_MIN_ROWS or rows % (VECTOR_LANES // 2):
        # too few rows, or no whole registers along them (65 tokens: 13-lane vectors ran a ViT's
        # matmuls at 3 GFLOP/s): ``dot``'s lanes run along the reduction instead
        raise ValueError("gemm: x's rows do not fill whole vector registers")
    row_var = spatial[-2].var
    x = [r for r in contiguous_reads(stmt, stmt.iter_vars[-1].var)
         if any(v.same_as(row_var) for v in tir.analysis.undefined_vars(r.region[-2].min))]
    if len(x) != 1:
        raise ValueError("gemm: no single operand runs along the rows")
    x_index = [i for i, r in enumerate(stmt.reads) if r.same_as(x[0])][0]
    epilogue = _prologue(sch, blocks, index)
    copy = sch.cache_read(anchor, x_index, "global")
    rank = len(region_buffer(x[0]).shape)
    sch.transform_layout(copy, ("write", 0), lambda *ax: (*ax[: rank - 2], ax[rank - 1], ax[rank - 2]))
    loops = sch.get_loops(anchor)
    lanes = vector_lanes(rows)
    outer_loops, (i_loop, j_loop), reduce = loops[: n_spatial - 2], loops[n_spatial - 2 : n_spatial], loops[n_spatial:]
    io, ii = sch.split(i_loop, [None, lanes])
    cols = static(sch.get(j_loop).extent)
    jo, ji = sch.split(j_loop, [None, divisor(cols, GEMM_REGISTER_ROWS)])
    sch.reorder(*outer_loops, io, jo, *reduce, ji, ii)
    if epilogue is None:
        epilogue = sch.cache_write(anchor, 0, "local")
    else:
        sch.set_scope(anchor, 0, "local")
    # the accumulator transposed too, so that its vector lanes are contiguous registers
    swap = lambda *ax: (*ax[:-2], ax[-1], ax[-2])  # noqa: E731
    sch.transform_layout(anchor, ("write", 0), swap)
    sch.reverse_compute_at(epilogue, jo)
    sch.vectorize(ii)
    sch.unroll(ji)
    parallel_vectorize(sch, copy)
    parallel(sch, [*outer_loops, io])
    init = sch.decompose_reduction(anchor, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])


def dot(sch, register: int = VECTOR_LANES) -> None:
    """x @ w.T: both operands run along the reduction. Split it into vector lanes and rfactor them, so
    that each lane accumulates its own partial dot product (contiguous loads, one FMA per lane) for a
    register block of outputs (and rows of x, with ``register``-lane registers); the lanes are summed
    once per output at the end, with the epilogue."""
    blocks, index, anchor = _anchor(sch)
    epilogue = _prologue(sch, blocks, index)
    n_spatial = num_spatial(sch, anchor)
    loops = sch.get_loops(anchor)
    reduce = list(loops[n_spatial:])
    lanes = MAX_INNER if static(sch.get(reduce[-1]).extent) % MAX_INNER == 0 else VECTOR_LANES
    ko, ki = sch.split(reduce[-1], [None, lanes])
    rf = sch.rfactor(ki, factor_axis=n_spatial)
    rf_loops = sch.get_loops(rf)  # spatial..., reduce[:-1]..., ko, ki
    extents = [static(sch.get(lp).extent) for lp in rf_loops[:n_spatial]]
    outputs = divisor(extents[-1], 4)
    jo, ji = sch.split(rf_loops[n_spatial - 1], [None, outputs])
    # Rows of x in the register block too where the target's registers hold them (AVX-512's 32: 4 rows
    # x 4 outputs; a batch-8 MLP layer 1.3-1.6x faster), each load of w then serves every row.
    per_acc = -(-lanes // register)  # registers per accumulator
    budget = REGISTER_VECTORS * (2 if register >= MAX_INNER else 1)
    rb = divisor(extents[-2], budget // (per_acc * outputs)) if n_spatial >= 2 else 1
    if rb > 1:
        io, ii = sch.split(rf_loops[n_spatial - 2], [None, rb])
        outer = [jo, *rf_loops[: n_spatial - 2], io]
        sch.reorder(*outer, *rf_loops[n_spatial:-1], ii, ji, rf_loops[-1])
        sch.unroll(ii)
    else:
        # The block of w outermost: it stays in L1 while every row of x (the batch) streams past it.
        outer = [jo, *rf_loops[: n_spatial - 1]]
        sch.reorder(*outer, *rf_loops[n_spatial:-1], ji, rf_loops[-1])
    sch.vectorize(rf_loops[-1])
    sch.unroll(ji)
    sch.set_scope(rf, 0, "local")
    sch.reverse_compute_at(anchor, outer[-1])
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, outer[-1])
    parallel(sch, outer)
    sch.decompose_reduction(rf, rf_loops[n_spatial])


__all__ = ["GEMM_MIN_ROWS", "dot", "gemm", "panel"]
