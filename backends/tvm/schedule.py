"""Default CPU schedules: fast compiled code from a lowered module without any tuning.

``tvm.compile`` on a CPU target only legalizes (serial, unvectorised loops, 20-90x slower than torch
eager), and dlight's CPU rules leave convolutions alone. ``prepare`` runs the passes between import
and ``tvm.compile`` — batch norm as a per-channel scale and shift (``scale_shift.py``), legalization
(GELU with a polynomial erf), fusion — and then gives every PrimFunc a rule-based schedule read off
its blocks, never off op names:

* ``tiled`` — a reduction whose inputs are contiguous along its last spatial axis (conv2d, depthwise
  and grouped conv, conv1d, matmul, batched matmul, pooling windows): tile the last spatial axis
  (vector lanes: whole registers where they divide it, ``tile_shape``) and the one before it (a
  register block of output channels or rows, up to 12 accumulator registers), keep the reduction
  loops between the tile loops and the register block, accumulate in a small local buffer,
  decompose the reduction, parallelise the outer loops, vectorise the inner axis, unroll the
  register block, and compute the elementwise epilogue (bias, batch-norm scale/shift, activation,
  residual add) on the tile while it is in cache. Layout moves read off the reads: an output whose
  last two axes an input reads whole and unshifted (a 1x1 conv) has them flattened into one axis,
  block and epilogue alike (14 x 14 is 196 = 49 x 4 lanes, not 14 rows of an odd 14-lane vector;
  ``flatten_rows``); a zero-width pad is inlined (the conv reads its input itself); a producer
  read with a stride along the vector axis (the padded input of a stride-2 conv, depthwise or not)
  writes its last axis split into phases, ``w -> (w % s, w // s)``, so that the conv's reads become
  contiguous (``deinterleave``); and a depthwise conv's padded input is computed inside the conv's
  parallel loop, the rows of each tile while they are in cache (``per_channel``), where a dense
  conv's stays one pass (every tile sums over all input channels).
* ``pointwise`` — a 1x1 conv whose flat H x W fills no whole register (14 x 14, 7 x 7), on targets
  with 16-lane registers (``register_lanes``): vector lanes along output channels and a register
  block of output positions, as a GEMM microkernel (``schedule_pointwise.py``); ``panel`` the same
  for ``x @ w.T`` with 32 rows or more (tokens: 65 of them fill no register along the rows). The
  three ``x @ w.T`` rules (``panel``, ``gemm``, ``dot``) are in ``schedule_matmul.py``.
* ``gemm`` — ``x @ w.T`` (both operands contiguous along the reduction) with at least
  ``GEMM_MIN_ROWS`` static rows of x, a multiple of 4 (tokens of a transformer, batch x positions): x copied
  transposed in a small pass, then tiled as ``tiled`` does with the vector lanes along x's rows and a
  register block of w's rows (one broadcast scalar each), the accumulator transposed to match. No
  weight is copied or re-laid out (weights are parameters, read as they are stored).
* ``dot`` — the same with few rows (a linear layer at batch 1 or 8) or an odd count (65 tokens):
  vector lanes along the reduction,
  each accumulating a partial dot product, summed once per output.
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
(``rule == "none"``); tests check that this never happens on the registry models. The rules are
built from the block analysis and loop primitives of ``schedule_primitives.py``.
"""

from __future__ import annotations

import functools

from .adapter import relax, s_tir, tir, topi, tvm
from .kernels import CROP_NAME, PADDED_NAME, PRODUCTS_DIM_ATTR, SPLIT_ATTR, WEIGHT_NAME
from .scale_shift import scale_shift_batch_norm
from .schedule_layout import flatten_rows, rows_contiguous, tiled_anchor, vectorize_pad
from .schedule_matmul import dot, gemm, panel
from .schedule_pointwise import pointwise
from .schedule_primitives import (
    MAX_INNER,
    VECTOR_LANES,
    child_blocks,
    is_reduction,
    kind,
    num_spatial,
    parallel,
    parallel_vectorize,
    register_axis,
    static,
    tile_shape,
    try_inline,
    vectorize_with_tail,
)

RULES = ("pointwise", "tiled", "panel", "gemm", "dot", "rows", "regenerate", "products", "elementwise", "reshape", "none")
OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps must not fuse a scheduled function again


def prepare(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize, fuse and schedule every PrimFunc of ``mod``; the result goes straight into
    ``tvm.compile(mod, target)``. No tuning, no constants created from parameters."""
    return schedule_module(fuse(mod, target), register_lanes(target))[0]


def register_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of one vector register of ``target``: 16 with AVX-512 (where ``pointwise``,
    ``panel`` and ``dot``'s row block were measured), else ``VECTOR_LANES`` (AVX2, NEON's pairs; what
    the other rules' tiles are sized for)."""
    if target.kind.name == "llvm" and tvm.target.codegen.target_has_features("avx512f", target):
        return MAX_INNER
    return VECTOR_LANES


def fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Relax ops -> fused, unscheduled PrimFuncs (the CPU backend's legalize passes, with batch norm
    decomposed first)."""
    with target:
        return tvm.transform.Sequential(
            [
                # Batch norm as an elementwise scale/shift (computed per channel) that fuses into the
                # conv's epilogue; never folded into a weight (parameters are inputs, and a pool may
                # be shared). DecomposeOpsForInference handles the rest (a batch norm without affine).
                scale_shift_batch_norm,
                relax.transform.DecomposeOpsForInference(),
                # x @ w.T as one NT matmul reading w in its stored (out, in) layout, rather than a
                # transpose of every linear weight on every call
                relax.transform.FuseTransposeMatmul(),
                relax.transform.LegalizeOps({"relax.nn.gelu": _gelu}),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
        )(mod)


def _gelu(bb, call):
    """``relax.nn.gelu`` as relax legalizes it, ``x * (1/2 + erf(x / sqrt 2) / 2)``, with TOPI's
    polynomial ``fast_erf`` (float32 to a few ulp): ``erf`` is a libm call per element that no
    vector loop can hold (a ViT's GELU ran at 4 ns per element, 16% of the model)."""
    def gelu(x):
        half, scaled = tir.const(0.5, x.dtype), x * tir.const(0.5**0.5, x.dtype)
        erf = topi.fast_erf(scaled) if x.dtype == "float32" else topi.erf(scaled)
        return x * (half + erf * half)
    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def schedule_module(mod: tvm.IRModule, lanes: int = VECTOR_LANES) -> tuple[tvm.IRModule, dict[str, str]]:
    """Schedule every PrimFunc of ``mod`` for registers of ``lanes`` float32 lanes (``register_lanes``);
    returns the module and {function name: rule used}."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    rules = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tir.PrimFunc):
            if relax.analysis.has_reshape_pattern(func):
                # left as it is: tvm.compile's RewriteDataflowReshape turns it into a view (no copy)
                rules[gv.name_hint] = "reshape"
                continue
            scheduled, rules[gv.name_hint] = schedule_func(func, lanes)
            out[gv] = scheduled
    return out, rules


def schedule_func(func: tir.PrimFunc, lanes: int = VECTOR_LANES) -> tuple[tir.PrimFunc, str]:
    """The scheduled function and the rule that scheduled it (one of ``RULES``)."""
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
        return func, "none"
    for rule in _candidates(func, lanes):
        sch = s_tir.Schedule(func)
        try:
            rule(sch)
        except (RuntimeError, ValueError):  # s_tir.ScheduleError and TVM's internal checks
            continue  # the next, simpler rule
        name = rule.__name__.removeprefix("_")
        done = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)
        return done, name
    return func, "none"


def _candidates(func: tir.PrimFunc, lanes: int):
    sch = s_tir.Schedule(func)
    if any(sch.get(b).name_hint == WEIGHT_NAME for b in child_blocks(sch)):
        return (_regenerate, _elementwise)
    kinds = [kind(sch, b) for b in child_blocks(sch)]
    if set(kinds) == {"elementwise"} and any(_products_dim(sch, b) is not None for b in child_blocks(sch)):
        return (_products, _elementwise)
    wide = lanes >= MAX_INNER  # the panel rules: measured on 16-lane registers only
    if kinds.count("dot") == 1 and not ({"tiled", "rows"} & set(kinds)):
        return (*([_bound(panel, lanes=lanes)] if wide else []), gemm, _bound(dot, register=lanes), _rows, _elementwise)
    if "tiled" in kinds:
        return (*([_bound(pointwise, lanes=lanes)] if wide else []), _tiled, _rows, _elementwise)
    if "rows" in kinds or "dot" in kinds:
        return (_rows, _elementwise)
    return (_elementwise,)


def _bound(rule, **kwargs):
    """``rule`` with the target's register width bound, under its own name (``schedule_func``'s rule name)."""
    return functools.update_wrapper(functools.partial(rule, **kwargs), rule)


# ------------------------------------------------------------------------------------ rules


def _tiled(sch) -> None:
    anchor, epilogue, local = tiled_anchor(sch)
    loops = sch.get_loops(anchor)
    n_spatial = num_spatial(sch, anchor)
    extents = [static(sch.get(lp).extent) for lp in loops[:n_spatial]]
    t = register_axis(sch, anchor, extents)
    flat = None
    if (t is None or t < n_spatial - 2) and rows_contiguous(sch.get(anchor)):
        # a 1x1 conv: H and W of the output run along memory as one axis (14 x 14 is 196 lanes' worth)
        flat = flatten_rows(sch, anchor, epilogue, n_spatial, extents[-1])
        loops, extents = sch.get_loops(anchor), [*extents[:-2], extents[-2] * extents[-1]]
    spatial, reduce = list(loops[: len(extents)]), list(loops[len(extents) :])
    lanes, block = tile_shape(extents[-1], extents[t] if t is not None else None)
    xo, xi = sch.split(spatial[-1], [None, lanes])
    fo = fi = None
    if t is not None:
        fo, fi = sch.split(spatial[t], [None, block])
    outer = [fo if i == t else lp for i, lp in enumerate(spatial[:-1])]
    sch.reorder(*outer, xo, *reduce, *([fi] if fi is not None else []), xi)
    # Accumulate the register block in a tile-sized buffer; write it back (with the epilogue) once per tile.
    if epilogue is None:
        epilogue = sch.cache_write(anchor, 0, "local")
        if flat is not None:
            flat(epilogue)
    else:
        sch.set_scope(anchor, 0, "local")
    sch.reverse_compute_at(epilogue, xo)
    sch.vectorize(xi)
    if fi is not None and (static(sch.get(fi).extent) or 1) > 1:
        sch.unroll(fi)
    # With one lane and no register block, the epilogue and the init have no loop of their own below
    # the tile: their innermost loop is a tile loop, which also runs the reduction and must stay serial
    # (vectorising it gave wrong sums: a 31-wide fold at batch 1).
    inner = lanes > 1 or (fi is not None and (static(sch.get(fi).extent) or 1) > 1)
    if inner:
        sch.vectorize(sch.get_loops(epilogue)[-1])
    parallel(sch, outer)  # before decompose_reduction: parallel needs the block to be a whole reduction
    for b in local:  # a depthwise conv's padded input: the rows of this tile, while they are in cache
        sch.compute_at(b, sch.get_loops(anchor)[0])
        vectorize_pad(sch, b)
    if reduce:
        init = sch.decompose_reduction(anchor, reduce[0])
        if inner:
            sch.vectorize(sch.get_loops(init)[-1])


def _regenerate(sch) -> None:
    """The epitome kernel: the padded pool in parallel; the weight split into its blocks, so that its
    reads of the padded pool are affine (block start + offset); parallel over blocks and output rows,
    the rest of a block row (contiguous in the weight and, in rows form, in the padded pool) vectorised."""
    parallel_vectorize(sch, sch.get_sblock(PADDED_NAME))
    if any(sch.get(b).name_hint == CROP_NAME for b in child_blocks(sch)):
        parallel_vectorize(sch, sch.get_sblock(CROP_NAME))
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
    vectorize_with_tail(sch, row)
    parallel(sch, outer)


def _products(sch) -> None:
    """The product map's gather and its elementwise consumers in one pass over the output. Inlined
    into the last block when that has the gather's axes (elementwise ops, a pad; a residual add may
    join two gathers); otherwise (a reshape after it) each gather keeps its own loops, scheduled the
    same way, and the rest is elementwise."""
    blocks = child_blocks(sch)
    dims = [_products_dim(sch, b) for b in blocks]
    gathers = {(d, len(sch.get_loops(b))) for b, d in zip(blocks, dims) if d is not None}
    fused = dims[-1] is None and len(gathers) == 1 and next(iter(gathers))[1] == len(sch.get_loops(blocks[-1]))
    for b, d in zip(blocks[:-1], dims[:-1]):
        if fused or d is None:
            try_inline(sch, b)
    for b in child_blocks(sch):
        d = _products_dim(sch, b)
        if d is not None or fused:
            _product_rows(sch, b, next(iter(gathers))[0] if d is None else d)
        else:
            parallel_vectorize(sch, b)


def _products_dim(sch, block) -> int | None:
    """The channel axis of a gather_products block (its annotation), or None for any other block."""
    annotations = sch.get(block).annotations
    return int(annotations[PRODUCTS_DIM_ATTR]) if PRODUCTS_DIM_ATTR in annotations else None


def _product_rows(sch, block, dim: int) -> None:
    """Parallel over the axes up to ``dim`` (batch, channel); the axes after it (H, W: contiguous, and
    the gather index does not change along them) fused and vectorised in full registers."""
    loops = sch.get_loops(block)
    if dim >= len(loops) - 1 or any(static(sch.get(lp).extent) is None for lp in loops[dim + 1:]):
        parallel_vectorize(sch, block)  # channels last (linear): vector lanes over channels
        return
    rest = loops[dim + 1:]
    row = sch.fuse(*rest) if len(rest) > 1 else rest[0]
    vectorize_with_tail(sch, row)
    parallel(sch, loops[: dim + 1])


def _rows(sch) -> None:
    blocks = child_blocks(sch)
    for b in blocks[:-1]:
        if not is_reduction(sch, b):
            try_inline(sch, b)
    for b in child_blocks(sch):
        if is_reduction(sch, b):
            parallel(sch, sch.get_loops(b)[: num_spatial(sch, b)])
        else:
            parallel_vectorize(sch, b)


def _elementwise(sch) -> None:
    blocks = child_blocks(sch)
    for b in blocks[:-1]:
        try_inline(sch, b)
    for b in child_blocks(sch):
        parallel_vectorize(sch, b)
