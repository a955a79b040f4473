"""Default CPU schedules: fast compiled code from a lowered module without any tuning.

``tvm.compile`` on a CPU target only legalizes (serial, unvectorised loops, 20-90x slower than torch
eager), and dlight's CPU rules leave convolutions alone. ``prepare`` runs the passes between import
and ``tvm.compile`` — batch norm decomposed into a scale/shift, legalization, fusion — and then gives
every PrimFunc a rule-based schedule read off its blocks, never off op names:

* ``tiled`` — a reduction whose inputs are contiguous along its last spatial axis (conv2d, depthwise
  and grouped conv, conv1d, matmul, batched matmul, pooling windows): tile the last spatial axis
  (vector lanes) and the one before it (a register block of output channels or rows), keep the
  reduction loops between the tile loops and the register block, accumulate in a small local
  buffer, decompose the reduction, parallelise the outer loops, vectorise the inner axis, unroll the
  register block, and compute the elementwise epilogue (bias, batch-norm scale/shift, activation,
  residual add) on the tile while it is in cache.
* ``rows`` — a reduction along the contiguous axis (softmax, layer norm, global mean): parallel rows,
  serial reduction.
* ``products`` — the product map's gather (``kernels.gather_products_te``) and the elementwise ops fused
  after it (batch-norm scale/shift, activation, residual add): inlined into one pass, parallel over
  the axes up to the channel axis (whose gather index is fixed inside), every axis after it fused
  into one contiguous run vectorised in full registers; a linear layer's (channels last) as
  ``elementwise``.
* ``elementwise`` — everything else (injective ops, the epitome regeneration kernels (``names.TVM_REGENERATE``)): intermediate
  blocks inlined, outer loops fused and parallelised, the innermost static axis vectorised.

A function that no rule can schedule keeps its legalized form and is reported by ``schedule_func``
(``rule == "none"``); tests check that this never happens on the registry models.
"""

from __future__ import annotations

from .adapter import region_buffer, relax, s_tir, tir, tvm
from .kernels import CROP_NAME, PADDED_NAME, PRODUCTS_DIM_ATTR, SPLIT_ATTR, WEIGHT_NAME

VECTOR_LANES = 8  # float32 lanes of AVX2; 16-wide inner tiles are two registers
MAX_INNER = 16  # widest vectorised inner tile
REGISTER_TILE = 64  # accumulator elements per register block (AVX2 has 16 ymm registers)
RULES = ("tiled", "dot", "rows", "regenerate", "products", "elementwise", "reshape", "none")
OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps must not fuse a scheduled function again


def prepare(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize, fuse and schedule every PrimFunc of ``mod``; the result goes straight into
    ``tvm.compile(mod, target)``. No tuning, no constants created from parameters."""
    return schedule_module(fuse(mod, target))[0]


def fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Relax ops -> fused, unscheduled PrimFuncs (the CPU backend's legalize passes, with batch norm
    decomposed first)."""
    with target:
        return tvm.transform.Sequential(
            [
                # Batch norm as an elementwise scale/shift that fuses into the conv's epilogue; never
                # folded into a weight (parameters are inputs, and a pool may be shared).
                relax.transform.DecomposeOpsForInference(),
                # x @ w.T as one NT matmul reading w in its stored (out, in) layout, rather than a
                # transpose of every linear weight on every call
                relax.transform.FuseTransposeMatmul(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
        )(mod)


def schedule_module(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, str]]:
    """Schedule every PrimFunc of ``mod``; returns the module and {function name: rule used}."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    rules = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tir.PrimFunc):
            if relax.analysis.has_reshape_pattern(func):
                # left as it is: tvm.compile's RewriteDataflowReshape turns it into a view (no copy)
                rules[gv.name_hint] = "reshape"
                continue
            scheduled, rules[gv.name_hint] = schedule_func(func)
            out[gv] = scheduled
    return out, rules


def schedule_func(func: tir.PrimFunc) -> tuple[tir.PrimFunc, str]:
    """The scheduled function and the rule that scheduled it (one of ``RULES``)."""
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
        return func, "none"
    for rule in _candidates(func):
        sch = s_tir.Schedule(func)
        try:
            rule(sch)
        except (RuntimeError, ValueError):  # s_tir.ScheduleError and TVM's internal checks
            continue  # the next, simpler rule
        name = rule.__name__.removeprefix("_")
        done = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)
        return done, name
    return func, "none"


def _candidates(func: tir.PrimFunc):
    sch = s_tir.Schedule(func)
    if any(sch.get(b).name_hint == WEIGHT_NAME for b in _blocks(sch)):
        return (_regenerate, _elementwise)
    kinds = [_kind(sch, b) for b in _blocks(sch)]
    if set(kinds) == {"elementwise"} and any(_products_dim(sch, b) is not None for b in _blocks(sch)):
        return (_products, _elementwise)
    if kinds.count("dot") == 1 and not ({"tiled", "rows"} & set(kinds)):
        return (_dot, _rows, _elementwise)
    if "tiled" in kinds:
        return (_tiled, _rows, _elementwise)
    if "rows" in kinds or "dot" in kinds:
        return (_rows, _elementwise)
    return (_elementwise,)


# --------------------------------------------------------------------------------- analysis


def _blocks(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tir.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, tir.IntImm) else None


def _num_spatial(sch, block) -> int:
    return sum(iv.iter_type == tir.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _contiguous_reads(stmt, var) -> list:
    """Input regions (the accumulator excluded) whose innermost index depends on ``var``."""
    out = region_buffer(stmt.writes[0])
    return [
        r for r in stmt.reads
        if not region_buffer(r).same_as(out) and any(v.same_as(var) for v in tir.analysis.undefined_vars(r.region[-1].min))
    ]


def _kind(sch, block) -> str:
    """tiled: a reduction with an input read contiguously along its last spatial axis; rows: another
    reduction; elementwise: no reduction."""
    stmt = sch.get(block)
    if not _is_reduction(sch, block):
        return "elementwise"
    spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.DataPar]
    if not spatial or _static(spatial[-1].dom.extent) in (None, 1):
        return "rows"  # a global reduction (mean over H, W)
    if _contiguous_reads(stmt, spatial[-1].var):
        return "tiled"
    reduce = [iv for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.CommReduce]
    if len(_contiguous_reads(stmt, reduce[-1].var)) >= 2 and (_static(reduce[-1].dom.extent) or 1) % VECTOR_LANES == 0:
        return "dot"  # x @ w.T: both operands contiguous along the reduction
    return "rows"


def _lanes(n: int | None) -> int:
    """Vector lanes for an inner axis of ``n``: a multiple of the register width when one divides
    ``n`` (16, 8), else the whole axis when it is short, else its largest divisor up to ``MAX_INNER``."""
    if n is None:
        return 1
    for lanes in (MAX_INNER, VECTOR_LANES):
        if n % lanes == 0:
            return lanes
    return n if n <= MAX_INNER else _divisor(n, MAX_INNER)


def _divisor(n: int | None, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (1 when ``n`` is symbolic)."""
    if n is None:
        return 1
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


# ------------------------------------------------------------------------------------ rules


def _tiled(sch) -> None:
    blocks = _blocks(sch)
    anchor = max((b for b in blocks if _kind(sch, b) == "tiled"), key=lambda b: _work(sch, b))
    index = [b.same_as(anchor) for b in blocks].index(True)
    producers, consumers = blocks[:index], blocks[index + 1 :]
    for b in producers:
        _parallel_vectorize(sch, b)  # pad, transposes: their own parallel pass over the input
    epilogue = _inline_chain(sch, consumers)

    loops = sch.get_loops(anchor)
    n_spatial = _num_spatial(sch, anchor)
    spatial, reduce = list(loops[:n_spatial]), list(loops[n_spatial:])
    extents = [_static(sch.get(lp).extent) for lp in spatial]
    lanes = _lanes(extents[-1])
    xo, xi = sch.split(spatial[-1], [None, lanes])
    t = _register_axis(sch, anchor, extents)
    fo = fi = None
    if t is not None:
        fo, fi = sch.split(spatial[t], [None, _divisor(extents[t], max(1, REGISTER_TILE // lanes))])
    outer = [fo if i == t else lp for i, lp in enumerate(spatial[:-1])]
    sch.reorder(*outer, xo, *reduce, *([fi] if fi is not None else []), xi)
    # Accumulate the register block in a tile-sized buffer; write it back (with the epilogue) once per tile.
    if epilogue is None:
        epilogue = sch.cache_write(anchor, 0, "local")
    else:
        sch.set_scope(anchor, 0, "local")
    sch.reverse_compute_at(epilogue, xo)
    sch.vectorize(xi)
    if fi is not None and (_static(sch.get(fi).extent) or 1) > 1:
        sch.unroll(fi)
    # With one lane and no register block, the epilogue and the init have no loop of their own below
    # the tile: their innermost loop is a tile loop, which also runs the reduction and must stay serial
    # (vectorising it gave wrong sums: a 31-wide fold at batch 1).
    inner = lanes > 1 or (fi is not None and (_static(sch.get(fi).extent) or 1) > 1)
    if inner:
        sch.vectorize(sch.get_loops(epilogue)[-1])
    _parallel(sch, outer)  # before decompose_reduction: parallel needs the block to be a whole reduction
    if reduce:
        init = sch.decompose_reduction(anchor, reduce[0])
        if inner:
            sch.vectorize(sch.get_loops(init)[-1])


def _register_axis(sch, block, extents) -> int | None:
    """The spatial axis (not the last) to block in registers: one with a static extent that the
    contiguous input does not depend on (output channels of a conv, rows of a matmul), else the
    static one just before the last."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tir.IterVar.DataPar]
    used = set()
    for region in _contiguous_reads(stmt, spatial[-1]):
        for r in region.region:
            used |= {v.name for v in tir.analysis.undefined_vars(r.min)}
    free = [i for i in range(len(spatial) - 1) if extents[i] and extents[i] > 1 and spatial[i].name not in used]
    if free:
        return free[-1]
    static = [i for i in range(len(spatial) - 1) if extents[i] and extents[i] > 1]
    return static[-1] if static else None


def _regenerate(sch) -> None:
    """The epitome kernel: the padded pool in parallel; the weight split into its blocks, so that its
    reads of the padded pool are affine (block start + offset); parallel over blocks and output rows,
    the rest of a block row (contiguous in the weight and, in rows form, in the padded pool) vectorised."""
    _parallel_vectorize(sch, sch.get_sblock(PADDED_NAME))
    if any(sch.get(b).name_hint == CROP_NAME for b in _blocks(sch)):
        _parallel_vectorize(sch, sch.get_sblock(CROP_NAME))
    weight = sch.get_sblock(WEIGHT_NAME)
    o_axis, bo, i_axis, bi = (int(v) for v in sch.get(weight).annotations[SPLIT_ATTR])
    loops = sch.get_loops(weight)
    rest = [lp for d, lp in enumerate(loops) if d not in (o_axis, i_axis)]
    j, a = sch.split(loops[o_axis], [None, bo])
    k, b = sch.split(loops[i_axis], [None, bi])
    # The loop of the weight's innermost split axis runs along memory; the other one goes outside.
    outer, row = ([j, k, a], [b, *rest]) if i_axis > o_axis else ([j, k, b], [a, *rest])
    sch.reorder(*outer, *row)
    row = sch.fuse(*row) if len(row) > 1 else row[0]
    _vectorize_with_tail(sch, row)
    _parallel(sch, outer)


def _products(sch) -> None:
    """The product map's gather and its elementwise consumers in one pass over the output. Inlined
    into the last block when that has the gather's axes (elementwise ops, a pad; a residual add may
    join two gathers); otherwise (a reshape after it) each gather keeps its own loops, scheduled the
    same way, and the rest is elementwise."""
    blocks = _blocks(sch)
    dims = [_products_dim(sch, b) for b in blocks]
    gathers = {(d, len(sch.get_loops(b))) for b, d in zip(blocks, dims) if d is not None}
    fused = dims[-1] is None and len(gathers) == 1 and next(iter(gathers))[1] == len(sch.get_loops(blocks[-1]))
    for b, d in zip(blocks[:-1], dims[:-1]):
        if fused or d is None:
            _try_inline(sch, b)
    for b in _blocks(sch):
        d = _products_dim(sch, b)
        if d is not None or fused:
            _product_rows(sch, b, next(iter(gathers))[0] if d is None else d)
        else:
            _parallel_vectorize(sch, b)


def _products_dim(sch, block) -> int | None:
    """The channel axis of a gather_products block (its annotation), or None for any other block."""
    annotations = sch.get(block).annotations
    return int(annotations[PRODUCTS_DIM_ATTR]) if PRODUCTS_DIM_ATTR in annotations else None


def _product_rows(sch, block, dim: int) -> None:
    """Parallel over the axes up to ``dim`` (batch, channel); the axes after it (H, W: contiguous, and
    the gather index does not change along them) fused and vectorised in full registers."""
    loops = sch.get_loops(block)
    if dim >= len(loops) - 1 or any(_static(sch.get(lp).extent) is None for lp in loops[dim + 1:]):
        _parallel_vectorize(sch, block)  # channels last (linear): vector lanes over channels
        return
    rest = loops[dim + 1:]
    row = sch.fuse(*rest) if len(rest) > 1 else rest[0]
    _vectorize_with_tail(sch, row)
    _parallel(sch, loops[: dim + 1])


def _vectorize_with_tail(sch, loop) -> None:
    """Vectorise a static loop in full registers: the largest multiple of MAX_INNER lanes, then the
    rest as one short vector (a block row of 262 columns is 16 x 16 + 6, not 131 x 2)."""
    extent = _static(sch.get(loop).extent)
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


def _dot(sch) -> None:
    """x @ w.T: both operands run along the reduction. Split it into vector lanes and rfactor them, so
    that each lane accumulates its own partial dot product (contiguous loads, one FMA per lane) for a
    register block of outputs; the lanes are summed once per output at the end, with the epilogue."""
    blocks = _blocks(sch)
    index = [_kind(sch, b) for b in blocks].index("dot")
    anchor = blocks[index]
    for b in blocks[:index]:
        _parallel_vectorize(sch, b)
    epilogue = _inline_chain(sch, blocks[index + 1 :])
    n_spatial = _num_spatial(sch, anchor)
    loops = sch.get_loops(anchor)
    reduce = list(loops[n_spatial:])
    lanes = MAX_INNER if _static(sch.get(reduce[-1]).extent) % MAX_INNER == 0 else VECTOR_LANES
    ko, ki = sch.split(reduce[-1], [None, lanes])
    rf = sch.rfactor(ki, factor_axis=n_spatial)
    rf_loops = sch.get_loops(rf)  # spatial..., reduce[:-1]..., ko, ki
    extents = [_static(sch.get(lp).extent) for lp in rf_loops[:n_spatial]]
    jo, ji = sch.split(rf_loops[n_spatial - 1], [None, _divisor(extents[-1], 4)])
    # The block of w outermost: it stays in L1 while every row of x (the batch) streams past it.
    outer = [jo, *rf_loops[: n_spatial - 1]]
    sch.reorder(*outer, *rf_loops[n_spatial:-1], ji, rf_loops[-1])
    sch.vectorize(rf_loops[-1])
    sch.unroll(ji)
    sch.set_scope(rf, 0, "local")
    sch.reverse_compute_at(anchor, outer[-1])
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, outer[-1])
    _parallel(sch, outer)
    sch.decompose_reduction(rf, rf_loops[n_spatial])


def _rows(sch) -> None:
    blocks = _blocks(sch)
    for b in blocks[:-1]:
        if not _is_reduction(sch, b):
            _try_inline(sch, b)
    for b in _blocks(sch):
        if _is_reduction(sch, b):
            _parallel(sch, sch.get_loops(b)[: _num_spatial(sch, b)])
        else:
            _parallel_vectorize(sch, b)


def _elementwise(sch) -> None:
    blocks = _blocks(sch)
    for b in blocks[:-1]:
        _try_inline(sch, b)
    for b in _blocks(sch):
        _parallel_vectorize(sch, b)


# ------------------------------------------------------------------------------- primitives


def _work(sch, block) -> int:
    """Static iteration count of a block's loop nest (symbolic extents count 1)."""
    n = 1
    for lp in sch.get_loops(block):
        n *= _static(sch.get(lp).extent) or 1
    return n


def _inline_chain(sch, consumers):
    """Inline every consumer but the last into its successor; return the last (or None)."""
    if not consumers:
        return None
    for b in consumers[:-1]:
        sch.compute_inline(b)
    return consumers[-1]


def _try_inline(sch, block) -> None:
    try:
        sch.compute_inline(block)
    except s_tir.ScheduleError:
        pass  # a block that cannot be inlined (several consumers, a reduction) keeps its own loops


def _parallel(sch, loops) -> None:
    """Fuse the outer loops and run them in parallel."""
    loops = list(loops)
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    sch.parallel(fused)


def _parallel_vectorize(sch, block) -> None:
    """Parallel outer loops; the innermost loop vectorised when static (split to at most MAX_INNER)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = _static(sch.get(inner).extent)
    if extent is not None and extent > 1 and len(loops) > 1:
        lanes = _divisor(extent, MAX_INNER)
        if lanes < extent:
            io, inner = sch.split(inner, [None, lanes])
            loops = list(loops[:-1]) + [io]
        else:
            loops = list(loops[:-1])
        sch.vectorize(inner)
        _parallel(sch, loops)
    else:
        _parallel(sch, loops)
