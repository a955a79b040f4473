"""The block analysis and loop primitives that ``schedule.py``'s rules are built from.

Analysis reads a block off its iteration variables and read regions, never off op names: ``kind``
sorts a block into what the rules schedule (a tiled reduction, a dot product, a row reduction, an
elementwise op), ``vector_lanes`` and ``divisor`` pick split factors. The primitives are the few
moves every rule makes: inline a chain of consumers, fuse and parallelise outer loops, vectorise an
inner loop (in full registers, with a short tail); ``tile_shape`` picks the tiled rules' tile. The
layout moves of the tiled rules are in ``schedule_layout.py``. A primitive that cannot apply raises
TVM's schedule error, and the rule that called it gives way to the next, simpler rule.
"""

from __future__ import annotations

from .adapter import region_buffer, s_tir, tir

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


def register_axis(sch, block, extents) -> int | None:
    """The spatial axis (not the last) to block in registers: one with a static extent that the
    contiguous input does not depend on (output channels of a conv, rows of a matmul), else the
    static one just before the last."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.DataPar]
    used = set()
    for region in contiguous_reads(stmt, spatial[-1]):
        for r in region.region:
            used |= {v.name for v in tir.analysis.undefined_vars(r.min)}
    free = [i for i in range(len(spatial) - 1) if extents[i] and extents[i] > 1 and spatial[i].name not in used]
    if free:
        return free[-1]
    sized = [i for i in range(len(spatial) - 1) if extents[i] and extents[i] > 1]
    return sized[-1] if sized else None


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
