"""Layout moves of the tiled schedule rules, read off the blocks' iteration variables and regions.

``tiled_anchor`` is the rules' prologue: it picks the anchor reduction, reads its input through
``im2col`` where its rows fill no register, and deals with each producer: a zero-width pad is
inlined (``is_copy``), a producer read with a stride along the vector axis writes its last axis in
column phases (``deinterleave``), a depthwise conv's padded input is computed per tile
(``per_channel``), any other gets its own parallel pass (a pad's row vectorised with its borders
partitioned off: ``vectorize_pad``). ``rows_contiguous`` says whether the output's last two axes may
be vectorised as one, and ``flatten_rows`` makes them one. Each move either applies or raises TVM's
schedule error (or ``ValueError``), and the rule gives way to the next, simpler one.
"""

from __future__ import annotations

from .adapter import arith, region_buffer, tir, tvm
from .schedule_primitives import (
    MAX_INNER,
    VECTOR_LANES,
    child_blocks,
    contiguous_reads,
    inline_chain,
    kind,
    num_spatial,
    parallel,
    parallel_vectorize,
    static,
    try_inline,
    vectorize_with_tail,
    work,
)


def vectorize_pad(sch, block, interior: tuple[int, int] | None = None) -> None:
    """Vectorise a pad's innermost loop with its borders partitioned off: the interior, where the pad's
    bounds test is true for every value of the other axes (column phases included), becomes a loop
    of its own that the simplifier clears of the test, and so vectorises; a lane-varying test made
    the whole row scalar (a stride-2 depthwise conv spent two thirds of its time in its pad). Any
    other block: ``vectorize_with_tail``. ``interior``: ``pad_interior``'s answer, when the caller has it."""
    loop = sch.get_loops(block)[-1]
    interior = interior or pad_interior(sch, block)
    if interior is None:
        vectorize_with_tail(sch, loop)
        return
    (lo, hi), extent = interior, static(sch.get(loop).extent)
    # the interior in whole vectors of MAX_INNER lanes and one shorter rest (split needs a loop that
    # starts at 0: the pieces are partitions too)
    whole, rest = divmod(hi - lo, MAX_INNER)
    pieces = [lo, *([MAX_INNER] * whole), rest, extent - hi]
    sizes = [n for n in pieces if n > 0]
    parts = sch.loop_partition(loop, [*sizes[:-1], None]) if len(sizes) > 1 else [loop]
    offset = 0
    for part, size in zip(parts, sizes):
        if lo <= offset < hi and size > 1:
            sch.vectorize(part)
        offset += size


def pad_interior(sch, block) -> tuple[int, int] | None:
    """[lo, hi) of the innermost loop where the block's ``if_then_else(bounds, load, value)`` takes the
    load for every value of the other axes, when that is a proper part of the loop; else None."""
    stmt, extent = sch.get(block), static(sch.get(sch.get_loops(block)[-1]).extent)
    body, axes = stmt.body, list(stmt.iter_vars)
    if not (extent and isinstance(body, tir.BufferStore) and isinstance(body.value, tvm.ir.Call)
            and getattr(body.value.op, "name", "") == "prim.if_then_else" and axes
            and static(axes[-1].dom.extent) == extent):
        return None
    clauses, stack = [], [body.value.args[0]]
    while stack:
        c = stack.pop()
        if isinstance(c, tir.And):
            stack += [c.a, c.b]
        else:
            clauses.append(c)
    var, analyzer = axes[-1].var, arith.Analyzer()
    for iv in axes[:-1]:
        analyzer.bind(iv.var, iv.dom)
    lo, hi = 0, extent
    for c in clauses:
        if not isinstance(c, (tir.LE, tir.LT)) or not any(v.same_as(var) for v in tir.analysis.undefined_vars(c)):
            continue
        # a <= b or a < b as coeff * var + rest >= least
        linear = arith.detect_linear_equation(c.b - c.a, [var])
        if len(linear) != 2 or static(linear[0]) in (None, 0):
            return None
        coeff, least = static(linear[0]), 0 if isinstance(c, tir.LE) else 1
        bound = analyzer.const_int_bound(linear[1])
        if coeff > 0:
            lo = max(lo, -((bound.min_value - least) // coeff))  # ceil((least - rest_min) / coeff)
        else:
            hi = min(hi, (bound.min_value - least) // -coeff + 1)
    return (lo, hi) if 0 <= lo < hi <= extent and (lo, hi) != (0, extent) else None


def deinterleave(sch, producer, anchor) -> bool:
    """A strided read along the vector axis (a stride-2 conv reads every other column of its padded
    input) made contiguous: the producer writes its last axis split into phases, ``w -> (w % s, w // s)``,
    so the anchor's read ``s * x + k`` becomes ``[k % s, x + k // s]``: unit stride along ``x``.
    Returns whether it did."""
    stmt, out = sch.get(anchor), region_buffer(sch.get(producer).writes[0])
    spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.DataPar]
    if not spatial:
        return False
    last = spatial[-1].var
    strides = set()
    for r in stmt.reads:
        if region_buffer(r).same_as(out):
            linear = arith.detect_linear_equation(r.region[-1].min, [last])
            strides.add(static(linear[0]) if len(linear) == 2 else None)
    width = static(out.shape[-1])
    if len(strides) != 1 or (stride := strides.pop()) is None or stride <= 1 or not width or width % stride:
        return False
    phases = lambda *ax: (*ax[:-1], ax[-1] % stride, ax[-1] // stride)  # noqa: E731
    sch.transform_layout(producer, ("write", 0), phases)
    try:  # the producer's loops in the new order too: contiguous writes
        sch.transform_block_layout(producer, tir.IndexMap.from_func(phases, ndim=len(out.shape)))
    except (RuntimeError, ValueError):
        pass
    return True


def flatten_rows(sch, anchor, epilogue, n_spatial: int, width: int):
    """The anchor's last two spatial axes (and its output's) as one, ``(y, x) -> y * width + x``: its
    block and its output buffer re-laid out, and the epilogue's block with them, so that a tile of
    the flat axis reads and writes exactly its own elements (a fused loop's tiles that cross rows
    would make the epilogue's region a rectangle of whole rows). Returns what flattens a later
    ``cache_write`` block the same way."""
    rows = lambda *v: (*v[:-2], v[-2] * width + v[-1])  # noqa: E731

    def block_map(block, spatial):
        ndim = len(sch.get(block).iter_vars)
        index = lambda *v: (*rows(*v[:spatial]), *v[spatial:])  # noqa: E731
        sch.transform_block_layout(block, tir.IndexMap.from_func(index, ndim=ndim))

    def with_output(block):  # the anchor's output buffer and the block that reads it, both flat
        sch.transform_layout(anchor, ("write", 0), rows)
        block_map(block, len(sch.get(block).iter_vars))

    block_map(anchor, n_spatial)
    if epilogue is not None:
        with_output(epilogue)
    return with_output


def tiled_anchor(sch, check=None):
    """The prologue of the tiled rules: the largest ``tiled`` block is the anchor, its input read
    through ``im2col`` where that applies; its producers are inlined (a zero-width pad), re-laid out
    (``deinterleave``), left for the caller to compute per tile (``per_channel``) or given their own
    parallel pass (a pad's rows by ``vectorize_pad``); its elementwise consumers are inlined into one
    epilogue (``inline_chain``). ``check(sch, anchor, extents)`` may raise first, before anything
    changes. Returns (anchor, epilogue or None, the producers to compute per tile)."""
    blocks = child_blocks(sch)
    anchor = max((b for b in blocks if kind(sch, b) == "tiled"), key=lambda b: work(sch, b))
    if check is not None:
        loops = sch.get_loops(anchor)
        check(sch, anchor, [static(sch.get(lp).extent) for lp in loops[: num_spatial(sch, anchor)]])
    index = [b.same_as(anchor) for b in blocks].index(True)
    im2col(sch, anchor)  # rows of 4: the input re-laid out so that H x W is one axis (before deinterleave)
    local = []
    for b in blocks[:index]:
        if not deinterleave(sch, b, anchor) and is_copy(sch, b):
            try_inline(sch, b)  # a pad of width 0 (a 1x1 conv's): the anchor reads the input itself
        elif per_channel(sch, b, anchor):
            local.append(b)
        elif len(sch.get_loops(b)) > 1 and (interior := pad_interior(sch, b)) is not None:
            parallel(sch, sch.get_loops(b)[:-1])  # a pad: its own parallel pass, rows vectorised inside
            vectorize_pad(sch, b, interior)
        else:
            parallel_vectorize(sch, b)  # transposes: their own parallel pass over the input
    return anchor, inline_chain(sch, anchor, blocks[index + 1 :]), local


def per_channel(sch, producer, anchor) -> bool:
    """Whether the anchor reads ``producer``'s output (a padded input) one image and channel at a time:
    no reduction variable indexes its first two axes (N, C) (a depthwise conv's input; a dense conv sums over
    input channels and would make every tile recompute all of them). Such a producer is cheaper
    computed per tile, into a buffer that stays in cache, than as a pass of its own over memory."""
    stmt, out = sch.get(anchor), region_buffer(sch.get(producer).writes[0])
    # a reduction of extent 1 (a depthwise conv's input channel per group) is a constant, not a sum
    reduce = {iv.var.name for iv in stmt.iter_vars
              if iv.iter_type == tir.IterVar.CommReduce and static(iv.dom.extent) != 1}
    regions = [r for r in stmt.reads if region_buffer(r).same_as(out)]
    if len(out.shape) < 3 or not regions:
        return False
    return not any(v.name in reduce for r in regions for rng in r.region[:2]  # (batch, channels)
                   for v in tir.analysis.undefined_vars(rng.min))


def im2col(sch, anchor) -> bool:
    """A conv whose output rows fill no whole register but whose H x W does (ResNet's 4 x 4 last stage
    at 32 x 32 input: 4-lane vectors): its input read through a copy with the window unrolled,
    ``x_col[n, ci, ky, kx, y, x] = x_pad[n, ci, s * y + ky, s * x + kx]`` (``reindex``), in which H
    and W of the output run along memory and ``flatten_rows`` makes them one axis of 16 lanes. The
    copy holds ``kh x kw`` times the input (small where this applies); a depthwise conv, which reads
    each input once per output, keeps its own reads. Returns whether it did."""
    stmt = sch.get(anchor)
    spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.DataPar]
    if len(spatial) < 4 or rows_contiguous(stmt):
        return False
    h, w = (static(iv.dom.extent) for iv in spatial[-2:])
    if not h or not w or w % VECTOR_LANES == 0 or (h * w) % VECTOR_LANES:
        return False
    reads = contiguous_reads(stmt, spatial[-1].var)
    uses = lambda rng, iv: any(v.same_as(iv.var) for v in tir.analysis.undefined_vars(rng.min))  # noqa: E731
    if len(reads) != 1 or not (uses(reads[0].region[-2], spatial[-2]) and uses(reads[0].region[-1], spatial[-1])):
        return False
    summed = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.CommReduce and static(iv.dom.extent) != 1]
    if not any(uses(rng, iv) for rng in reads[0].region[:2] for iv in summed):
        return False  # a depthwise conv: memory-bound, its input copied 9 times over would cost more
    copy = sch.reindex(anchor, ("read", [i for i, r in enumerate(stmt.reads) if r.same_as(reads[0])][0]))
    # the anchor reads the copy at its own iteration variables (those of extent 1 dropped): y and x last
    col = region_buffer(sch.get(copy).writes[0])
    region = next(r.region for r in sch.get(anchor).reads if region_buffer(r).same_as(col))
    y, x = (next((i for i, rng in enumerate(region) if rng.min.same_as(s.var)), None) for s in spatial[-2:])
    if y is None or x is None:
        raise ValueError("im2col: the conv does not read its copy at its own H and W")
    rows_last = lambda *ax: (*(a for i, a in enumerate(ax) if i not in (y, x)), ax[y], ax[x])  # noqa: E731
    sch.transform_layout(copy, ("write", 0), rows_last)
    sch.transform_block_layout(copy, tir.IndexMap.from_func(rows_last, ndim=len(region)))
    parallel_vectorize(sch, copy)
    return True


def is_copy(sch, block) -> bool:
    """Whether ``block`` copies a buffer of its own shape element for element, at the same indices (a
    zero-width pad). A transpose or a reshape is not one: inlined, it would turn the reads strided."""
    body = sch.get(block).body
    if not (isinstance(body, tir.BufferStore) and isinstance(body.value, tvm.ir.TensorLoad)):
        return False
    load = body.value
    return (len(load.indices) == len(body.indices) and all(a.same_as(b) for a, b in zip(load.indices, body.indices))
            and len(load.source.shape) == len(body.buffer.shape)
            and all(a.same_as(b) or static(a) is not None and static(a) == static(b)
                    for a, b in zip(load.source.shape, body.buffer.shape)))


def rows_contiguous(stmt) -> bool:
    """Whether the output's last two axes can be one: every input read along the last axis indexes its
    last two dimensions by exactly the output's last two axes (plus reduction axes of extent 1), over
    the whole of them (a 1x1 conv with stride 1 and no padding), and all those extents are static."""
    spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.DataPar]
    if len(spatial) < 3 or any(static(iv.dom.extent) is None for iv in spatial[-2:]):
        return False
    reads = contiguous_reads(stmt, spatial[-1].var)
    if not reads:
        return False
    # a reduction axis of extent 1 (the kernel window of a 1x1 conv) reads at offset 0: y + ry is y
    analyzer = arith.Analyzer()
    for iv in stmt.iter_vars:
        if iv.iter_type == tir.IterVar.CommReduce and static(iv.dom.extent) == 1:
            analyzer.bind(iv.var, iv.dom.min)
    for r in reads:
        region, shape = r.region, region_buffer(r).shape
        if len(region) < 2:
            return False
        for dim, iv in zip((-2, -1), spatial[-2:]):
            rng = region[dim]
            start = analyzer.simplify(rng.min)
            if not (isinstance(start, tir.Var) and start.same_as(iv.var)) or static(rng.extent) != 1:
                return False
            if static(shape[dim]) != static(iv.dom.extent):
                return False
    return True
