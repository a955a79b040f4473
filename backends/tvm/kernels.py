"""TE kernels for the epitome ops: the weight of a compressed layer, rebuilt from its pool inside the
compiled code.

``regenerate_te`` is ``nesc.core.sampling.regenerate_indexed`` written as one TE compute over the
weight's elements (in the parameter's own layout, so the consumer reads it like any weight):

    W[o, i, u, v] = lerp_x(lerp_y(lerp_i(lerp_o(g(0,0,0,0), g(1,0,0,0), fo), ...), ...), ...)
    g(co, ci, cy, cx) = (P * scale)[(o0 + a + co) % Op, (i0 + b + ci) % Ip,
                                    min(y0 + u + cy, Kh - 1), min(x0 + v + cx, Kw - 1)]
                      = padded[o0 + a + co, i0 + b + ci, y0 + u + cy, x0 + v + cx]

with block ``(j, k) = (o // bo, i // bi)``, offsets ``(a, b) = (o % bo, i % bi)``, ``(o0, i0, y0, x0) =
starts[j, k]`` and ``f = fracs[j, k]``. The corners and lerps exist only along the geometry's active
axes, nested in the order o, i, y, x, as the eager formula's one lerp per axis over the whole
window (channel axes wrap, spatial axes clamp to the last row); results agree with it to rounding.

The pool and the routing map are the kernel's only inputs: no index tensor, no weight-sized
constant. ``regenerate_rows_te`` is the fast form for the usual geometry (the window moves along
channels only): the weight as rows ``(O, I*kh*kw)``, each block row one contiguous run.

``gather_products_te`` is ``torch.ops.nesc.gather_products`` (``passes.reuse``'s product map): the
layer's output channels as interpolated copies of the channels of one op run with the pool's rows,

    out[..., c, ...] = lerp(products[..., g*rows + r, ...], products[..., g*rows + (r + step) % rows, ...], f[j])
                       + bias[c],     j = c // block, (g, o) = starts[j], r = (o + c % block) % rows

(``nesc.core.modules.product_index``). It reads ``products`` at ``g*rows + r < groups*rows`` only
while ``g < groups`` and ``o >= 0``: the deploy runtime checks the stored starts before any kernel runs.
"""

from __future__ import annotations

from nesc.core import names
from nesc.core.sampling import Geometry

from .adapter import te, tir

REGENERATE_NAME = names.TVM_REGENERATE  # PrimFunc name hint of every regeneration kernel
PADDED_NAME = names.TVM_PADDED_POOL  # block names the default schedule recognises
WEIGHT_NAME = names.TVM_WEIGHT
CROP_NAME = names.TVM_WEIGHT_CROP
# Block annotation of the weight: [output-block axis, its block size, input-block axis, its block size].
SPLIT_ATTR = names.TVM_SPLIT_ATTR
PRODUCTS_NAME = names.TVM_GATHER_PRODUCTS  # block (and PrimFunc hint) of the product map's gather
# Block annotation of the product map: the axis its gather indexes (the channel axis, >= 0).
PRODUCTS_DIM_ATTR = names.TVM_PRODUCTS_DIM_ATTR


def lerp(lo, hi, f):
    """``lo + f (hi - lo)``. ATen's CPU lerp switches to ``hi - (1 - f)(hi - lo)`` for ``f >= 0.5``;
    the two agree to rounding (an ulp), and the single form keeps the inner loop free of per-element
    selects: it vectorises to one fused multiply-add."""
    return lo + f * (hi - lo)


def _weight_axes(layout: str, idx) -> tuple:
    """Indices of the parameter layout -> (o, i, u, v) of the 4-D view."""
    zero = tir.const(0, "int32")
    if layout == "conv2d":
        return tuple(idx)
    if layout == "conv1d":
        o, i, v = idx
        return o, i, zero, v
    if layout == "linear":
        o, i = idx
        return o, i, zero, zero
    i, o = idx  # linear_t: the parameter is (I, O)
    return o, i, zero, zero


def dequantized(value, o, rows: te.Tensor | None, dtype: str):
    """A stored pool element as the compute ``dtype``: an int8 one times its row's scale ``rows[o]``
    (``nesc.core.quant``), a float16 one cast; a float32 pool's as it is. Inside the padded pool's
    compute, so the regeneration kernel itself dequantises (once per call, or once at load when lifted)."""
    value = value if value.dtype == dtype else value.astype(dtype)
    return value if rows is None else value * rows[o].astype(dtype)


def padded_pool_te(pool: te.Tensor, scale: float, geometry: Geometry, rows: te.Tensor | None = None,
                   dtype: str | None = None) -> te.Tensor:
    """The scaled pool padded so that every window (with its interpolation row) is a plain slice, as
    ``sampling._pad_for_windows``: channels wrap by repeating their first ``block`` rows, spatial axes
    repeat their last row. Pool-sized: computed once per call, then read with affine indices. ``rows``:
    an int8 pool's per-row scales; ``dtype``: the compute dtype (default: the pool's)."""
    Op, Ip, Kh, Kw = geometry.pool
    bo, bi = geometry.block
    act = geometry.active
    dtype = dtype or pool.dtype
    s = tir.const(scale, dtype)
    ext = (Op + bo * act[0], Ip + bi * act[1], Kh + act[2], Kw + act[3])
    return te.compute(ext, lambda o, i, y, x: dequantized(
        pool[o % Op, i % Ip, tir.min(y, Kh - 1), tir.min(x, Kw - 1)], o % Op, rows, dtype) * s, name=PADDED_NAME)


def _interpolate(read, fracs, j, k, active, dtype):
    """The nested lerps over the active axes (o innermost, then i, y, x) of ``read(corner)``."""

    def value(d: int, corner: tuple):
        if d == 0:
            return read(corner)
        d -= 1
        if not active[d]:
            return value(d, corner)
        lo = value(d, corner[:d] + (0,) + corner[d + 1:])
        hi = value(d, corner[:d] + (1,) + corner[d + 1:])
        return lerp(lo, hi, fracs[j, k, d].astype(dtype))

    return value(4, (0, 0, 0, 0))


def regenerate_te(pool: te.Tensor, starts: te.Tensor, fracs: te.Tensor, rows: te.Tensor | None = None, *,
                  scale: float, geometry: Geometry, dtype: str | None = None):
    """The weight in its parameter layout (``geometry.param_shape``) from ``pool (Op, Ip, Kh, Kw)``,
    ``starts`` int32 and ``fracs`` float ``(nbo, nbi, 4)``. Any geometry (spatial axes active or not).
    ``rows`` / ``dtype``: a quantized pool's scales and the compute dtype (``dequantized``)."""
    bo, bi = geometry.block
    dtype = dtype or pool.dtype
    padded = padded_pool_te(pool, scale, geometry, rows, dtype)

    def element(*idx):
        o, i, u, v = _weight_axes(geometry.layout, idx)
        j, k = o // bo, i // bi
        base = (o % bo, i % bi, u, v)
        start = [starts[j, k, d] for d in range(4)]
        read = lambda c: padded[tuple(start[d] + base[d] + c[d] for d in range(4))]  # noqa: E731
        return _interpolate(read, fracs, j, k, geometry.active, dtype)

    o_axis, i_axis = (1, 0) if geometry.layout == "linear_t" else (0, 1)
    attrs = {SPLIT_ATTR: [o_axis, bo, i_axis, bi]}
    return te.compute(geometry.param_shape, element, name=WEIGHT_NAME, tag=REGENERATE_NAME, attrs=attrs)


def rows_form(geometry: Geometry) -> bool:
    """Whether ``regenerate_rows_te`` applies: the window cannot move along the kernel's spatial axes
    (the pool's kernel is the weight's), so a block row is one contiguous run of the padded pool."""
    return not (geometry.active[2] or geometry.active[3])


def regenerate_rows_te(pool_rows: te.Tensor, starts: te.Tensor, fracs: te.Tensor, rows: te.Tensor | None = None, *,
                       scale: float, geometry: Geometry, dtype: str | None = None):
    """The weight as rows ``(O, I * kh * kw)`` (a reshape of the conv/linear layouts, the transpose of
    ``linear_t``'s), for geometries with ``rows_form``, from the pool as rows ``(Op, Ip * kh * kw)``
    (a free reshape). Column ``c = k * bi*kh*kw + r`` of block row ``o = j * bo + a`` reads
    ``padded[o0 + a + co, i0*kh*kw + r + ci*kh*kw]``: affine in ``r``, so a block row is one
    contiguous, vectorisable run of loads and lerps."""
    O, I, kh, kw = geometry.shape
    Op, Ip = geometry.pool[:2]
    bo, bi = geometry.block
    act = geometry.active
    area = kh * kw
    span = bi * area  # columns per block
    width = Ip * area
    dtype = dtype or pool_rows.dtype
    s = tir.const(scale, dtype)
    padded = te.compute(  # channels wrapped: (Op + bo, (Ip + bi) * kh * kw)
        (Op + bo * act[0], width + span * act[1]),
        lambda o, c: dequantized(pool_rows[o % Op, c % width], o % Op, rows, dtype) * s, name=PADDED_NAME)

    def element(o, c):
        j, k = o // bo, c // span
        a, r = o % bo, c % span
        o0, i0 = starts[j, k, 0], starts[j, k, 1]
        read = lambda cr: padded[o0 + a + cr[0], i0 * area + r + cr[1] * area]  # noqa: E731
        return _interpolate(read, fracs, j, k, act, dtype)

    attrs = {SPLIT_ATTR: [0, bo, 1, span]}
    # Whole blocks along the columns: a last block that overhangs the weight would put a bounds check
    # in the vectorised inner loop (measured 9x slower); it is computed whole and cropped instead.
    cols = -(-I // bi) * span
    weight = te.compute((O, cols), element, name=WEIGHT_NAME, tag=REGENERATE_NAME, attrs=attrs)
    if cols == I * area:
        return weight
    return te.compute((O, I * area), lambda o, c: weight[o, c], name=CROP_NAME)


def gather_products_te(products: te.Tensor, starts: te.Tensor, fracs: te.Tensor, bias: te.Tensor | None = None, *,
                       dim: int, channels: int, block: int, rows: int) -> te.Tensor:
    """``channels`` outputs along ``dim`` (>= 0) from ``products`` (``groups * rows`` channels there),
    ``starts`` int32 ``(ceil(channels / block), 2)``, ``fracs`` ``(ceil(channels / block),)`` and an
    optional ``bias (channels,)``. One compute over the output: the gather index depends on the
    channel only, so every other axis reads ``products`` contiguously."""
    shape = list(products.shape)
    shape[dim] = channels
    step = 1 if rows > 1 else 0  # a one-row pool cannot move along its rows (as product_index)

    def element(*idx):
        c = idx[dim]
        j = c // block
        g, o = starts[j, 0], starts[j, 1]
        r = o + c % block
        at = lambda row: products[idx[:dim] + (g * rows + row % rows,) + idx[dim + 1:]]  # noqa: E731
        out = lerp(at(r), at(r + step), fracs[j].astype(products.dtype))
        return out if bias is None else out + bias[c]

    return te.compute(shape, element, name=PRODUCTS_NAME, tag=PRODUCTS_NAME, attrs={PRODUCTS_DIM_ATTR: dim})
