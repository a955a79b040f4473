"""The ``pointwise`` schedule rule, for targets with 16-lane registers: a 1x1 convolution's vector
lanes along its output channels, read from a transposed panel of its weight (``panel`` in
``schedule_matmul.py`` is the same for a linear layer).

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

``pointwise`` requires a ``tiled`` anchor whose output's last two axes ``rows_contiguous`` allows flattening, whose
flat width is no multiple of ``VECTOR_LANES`` (where it is, ``tiled``'s own lanes are whole
registers), and whose output channels divide into ``lanes``; raises ``ValueError`` otherwise (and
``tiled`` takes over). Guarantees the same results as the unscheduled function (schedule primitives
only; the reduction order over ``ci`` is unchanged).
"""

from __future__ import annotations

from .adapter import region_buffer, tir
from .schedule_layout import flatten_rows, rows_contiguous, tiled_anchor
from .schedule_primitives import (
    REGISTER_VECTORS,
    VECTOR_LANES,
    divisor,
    num_spatial,
    parallel,
    static,
)

MIN_ROWS = 3  # fewest output positions per register block (fewer: the panel's loads dominate)


def pointwise(sch, lanes: int) -> None:
    """Schedule ``sch`` (see the module docstring) with vector lanes of ``lanes`` output channels."""
    anchor, epilogue, local = tiled_anchor(sch, check=_check(lanes))
    if local:
        raise ValueError("pointwise: a producer to compute per tile (a 1x1 conv has none)")
    loops = sch.get_loops(anchor)
    n_spatial = num_spatial(sch, anchor)
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
    copy = sch.cache_read(anchor, weight[0], "global")
    rank = len(region_buffer(stmt.reads[weight[0]]).shape)
    sch.transform_layout(copy, ("write", 0), lambda o, *rest: (*rest, o))  # [co, ci, 1, 1] -> [ci, 1, 1, co]

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

    sch.compute_at(copy, co)
    copy_loops = sch.get_loops(copy)[1:]
    if len(copy_loops) == rank:
        # the copy's loops in the panel's order (ci outer, co inner): contiguous writes, a vector of
        # ``lanes`` channels each
        sch.reorder(*copy_loops[1:], copy_loops[0])
        sch.vectorize(sch.get_loops(copy)[-1])
    parallel(sch, [co])
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


__all__ = ["MIN_ROWS", "pointwise"]
