"""The block analysis and loop primitives that ``schedule.py``'s rules are built from.

Analysis reads a block off its iteration variables and read regions, never off op names: ``kind``
sorts a block into what the rules schedule (a tiled reduction, a dot product, a row reduction, an
elementwise op), ``vector_lanes`` and ``divisor`` pick split factors. The primitives are the few
moves every rule makes: inline a chain of consumers, fuse and parallelise outer loops, vectorise an
inner loop (in full registers, with a short tail). Layout moves for the tiled rule:
``rows_contiguous`` (may the output's last two axes be vectorised as one) and ``flatten_rows`` (make
them one), ``is_copy`` (a pad of width 0, to inline) and ``deinterleave`` (a producer read with a
stride along the vector axis rewritten in column phases); ``tile_shape`` picks its tile. A primitive that
cannot apply raises TVM's schedule error, and the rule that called it gives way to the next, simpler rule.
"""

from __future__ import annotations

from .adapter import arith, region_buffer, s_tir, tir, tvm

VECTOR_LANES = 8  # float32 lanes of AVX2; 16-wide inner tiles are two registers
MAX_INNER = 16  # widest vectorised inner tile
# Accumulator registers per register block: AVX2 has 16 vector registers, and the block needs a few
# more for the input's vector and the weights' broadcasts (16 accumulators spilled: 2.2x slower).
REGISTER_VECTORS = 12
ODD_TILE = 64  # accumulator elements of a register block whose lanes are not whole registers


# --------------------------------------------------------------------------------- analysis


def child_blocks(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tir.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def static(extent) -> int | None:
    return int(extent) if isinstance(extent, tir.IntImm) else None


def num_spatial(sch, block) -> int:
    return sum(iv.iter_type == tir.IterVar.DataPar for iv in sch.get(block).iter_vars)


def contiguous_reads(stmt, var) -> list:
    """Input regions (the accumulator excluded) whose innermost index depends on ``var``."""
    out = region_buffer(stmt.writes[0])
    return [
        r for r in stmt.reads
        if not region_buffer(r).same_as(out) and any(v.same_as(var) for v in tir.analysis.undefined_vars(r.region[-1].min))
    ]


def kind(sch, block) -> str:
    """tiled: a reduction with an input read contiguously along its last spatial axis; rows: another
    reduction; elementwise: no reduction."""
    stmt = sch.get(block)
    if not is_reduction(sch, block):
        return "elementwise"
    spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.DataPar]
    if not spatial or static(spatial[-1].dom.extent) in (None, 1):
        return "rows"  # a global reduction (mean over H, W)
    if contiguous_reads(stmt, spatial[-1].var):
        return "tiled"
    reduce = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.CommReduce]
    if len(contiguous_reads(stmt, reduce[-1].var)) >= 2 and (static(reduce[-1].dom.extent) or 1) % VECTOR_LANES == 0:
        return "dot"  # x @ w.T: both operands contiguous along the reduction
    return "rows"


def vector_lanes(n: int | None) -> int:
    """Vector lanes for an inner axis of ``n``: a multiple of the register width when one divides
    ``n`` (16, 8), else the whole axis when it is short, else its largest divisor up to ``MAX_INNER``."""
    if n is None:
        return 1
    for lanes in (MAX_INNER, VECTOR_LANES):
        if n % lanes == 0:
            return lanes
    return n if n <= MAX_INNER else divisor(n, MAX_INNER)


def divisor(n: int | None, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (1 when ``n`` is symbolic)."""
    if n is None:
        return 1
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def tile_shape(width: int | None, rows: int | None) -> tuple[int, int]:
    """(vector lanes along the last axis, rows of the register block) for a ``tiled`` reduction.

    Lanes divide ``width`` and are a whole number of registers where they can be (16, 8 or 4: 14
    lanes, legalized in pieces, ran a 1x1 conv at 3 GFLOP/s instead of 26 with 4), and the register
    block then holds up to ``REGISTER_VECTORS`` accumulators. A width that none of those divides (7,
    14, 49) takes its largest divisor that fits one register (7), or ``vector_lanes``'s choice when
    that is under 3, with ``ODD_TILE`` accumulator elements (7 lanes x 8 rows: fewer rows ran 7 x 7
    convs up to 3x slower)."""
    lanes = next((n for n in (MAX_INNER, VECTOR_LANES, VECTOR_LANES // 2) if width and width % n == 0), None)
    if lanes is None:
        lanes = divisor(width, VECTOR_LANES)  # within one register: 7 of 14 ran a 3x3 conv 1.4x faster than 14
        lanes = lanes if lanes >= 3 else vector_lanes(width)
        return lanes, divisor(rows, max(1, ODD_TILE // lanes))
    return lanes, divisor(rows, max(1, REGISTER_VECTORS // max(1, lanes // VECTOR_LANES)))


# ------------------------------------------------------------------------------- primitives


def work(sch, block) -> int:
    """Static iteration count of a block's loop nest (symbolic extents count 1)."""
    n = 1
    for lp in sch.get_loops(block):
        n *= static(sch.get(lp).extent) or 1
    return n


def inline_chain(sch, anchor, consumers):
    """Inline the blocks after ``anchor`` into the last that writes the anchor's shape and return it
    (or None): the epilogue a rule computes on each tile of the anchor. Blocks after that one (a pad
    for the next layer: computed at a tile of the anchor, it left its border unwritten) get their
    own parallel pass over the epilogue's output. With no such block, the last block is returned."""
    if not consumers:
        return None
    shape = region_buffer(sch.get(anchor).writes[0]).shape
    same = [i for i, b in enumerate(consumers) if _same_shape(region_buffer(sch.get(b).writes[0]).shape, shape)]
    last = same[-1] if same else len(consumers) - 1
    for b in consumers[:last]:
        sch.compute_inline(b)
    for b in consumers[last + 1:]:
        parallel_vectorize(sch, b)
    return consumers[last]


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_same_extent(x, y) for x, y in zip(a, b))


def _same_extent(a, b) -> bool:
    return a.same_as(b) or static(a) is not None and static(a) == static(b)


def try_inline(sch, block) -> None:
    try:
        sch.compute_inline(block)
    except s_tir.ScheduleError:
        pass  # a block that cannot be inlined (several consumers, a reduction) keeps its own loops


def parallel(sch, loops) -> None:
    """Fuse the outer loops and run them in parallel."""
    loops = list(loops)
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    sch.parallel(fused)


def parallel_vectorize(sch, block) -> None:
    """Parallel outer loops; the innermost loop vectorised when static (split to at most MAX_INNER,
    or in full registers with a short tail when no multiple of the register width divides it)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = static(sch.get(inner).extent)
    if extent is not None and extent > MAX_INNER and extent % VECTOR_LANES and len(loops) > 1:
        # a row of 58 (a padded 56) as 3 x 16 + 10 lanes, not 29 x 2
        parallel(sch, loops[:-1])
        vectorize_with_tail(sch, inner)
    elif extent is not None and extent > 1 and len(loops) > 1:
        lanes = divisor(extent, MAX_INNER)
        if lanes < extent:
            io, inner = sch.split(inner, [None, lanes])
            loops = list(loops[:-1]) + [io]
        else:
            loops = list(loops[:-1])
        sch.vectorize(inner)
        parallel(sch, loops)
    else:
        parallel(sch, loops)


def vectorize_with_tail(sch, loop) -> None:
    """Vectorise a static loop in full registers: the largest multiple of MAX_INNER lanes, then the
    rest as one short vector (a block row of 262 columns is 16 x 16 + 6, not 131 x 2)."""
    extent = static(sch.get(loop).extent)
    if not extent or extent <= 1:
        return
    lanes = min(MAX_INNER, extent)
    main = extent - extent % lanes
    if main < extent:
        loop, tail = sch.loop_partition(loop, [main, None])
        sch.vectorize(tail)
    if main > lanes:
        _, loop = sch.split(loop, [None, lanes])
    sch.vectorize(loop)



def vectorize_pad(sch, block) -> None:
    """Vectorise a pad's innermost loop with its borders partitioned off: the interior, where the pad's
    bounds test is true for every value of the other axes (column phases included), becomes a loop
    of its own that the simplifier clears of the test, and so vectorises; a lane-varying test made
    the whole row scalar (a stride-2 depthwise conv spent two thirds of its time in its pad). Any
    other block: ``vectorize_with_tail``."""
    loop = sch.get_loops(block)[-1]
    interior = pad_interior(sch, block)
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
    """The prologue of the tiled rules: the largest ``tiled`` block is the anchor; its producers are
    inlined (a zero-width pad), re-laid out (``deinterleave``), left for the caller to compute per
    tile (``per_channel``) or given their own parallel pass; its elementwise consumers are inlined
    into one epilogue. ``check(sch, anchor, extents)`` may raise first, before anything changes.
    Returns (anchor, epilogue or None, the producers to compute per tile)."""
    blocks = child_blocks(sch)
    anchor = max((b for b in blocks if kind(sch, b) == "tiled"), key=lambda b: work(sch, b))
    if check is not None:
        loops = sch.get_loops(anchor)
        check(sch, anchor, [static(sch.get(lp).extent) for lp in loops[: num_spatial(sch, anchor)]])
    index = [b.same_as(anchor) for b in blocks].index(True)
    local = []
    for b in blocks[:index]:
        if not deinterleave(sch, b, anchor) and is_copy(sch, b):
            try_inline(sch, b)  # a pad of width 0 (a 1x1 conv's): the anchor reads the input itself
        elif per_channel(sch, b, anchor):
            local.append(b)
        elif len(sch.get_loops(b)) > 1 and pad_interior(sch, b) is not None:
            parallel(sch, sch.get_loops(b)[:-1])  # a pad: its own parallel pass, rows vectorised inside
            vectorize_pad(sch, b)
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
