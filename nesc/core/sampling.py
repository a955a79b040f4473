"""The core math: sample a weight from an epitome pool.

A weight ``W`` is viewed as 4-D ``(O, I, kh, kw)`` and cut into a grid of ``(nbo, nbi)`` blocks of
``(bo, bi, kh, kw)``. Block ``(j, k)`` is the window of the pool ``P: (Op, Ip, Kh, Kw)`` that starts at
its real-valued start index ``s = (o, i, y, x)``, read with linear interpolation:

    W[j*bo + a, k*bi + b, u, v] = scale * sum_c  w_c(frac(s)) * P[(o0+a+co) % Op, (i0+b+ci) % Ip,
                                                                  min(y0+u+cy, Kh-1), min(x0+v+cx, Kw-1)]

where ``(o0, i0, y0, x0) = floor(s)`` and ``c`` runs over the ``2^D`` corners of the ``D`` axes along
which the window can move (a channel axis of the pool wider than 1, a spatial axis larger than the
kernel). Channel axes wrap, so any start is valid and a narrow pool serves a wide layer; spatial
axes clamp the start to ``[0, K - k]``. ``W`` is linear in ``P`` and piecewise linear in ``s``, so it is
differentiable in both.

``regenerate`` is that formula, shared verbatim by the trainable ``EpitomeSampler`` (which derives
``floor``/``frac`` from its parameters every call) and the frozen op ``torch.ops.nesc.regenerate``
(which reads them from a routing map), so frozen and trained outputs agree bit for bit.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

# How a 4-D view (O, I, kh, kw) maps back to the parameter as the graph uses it.
LAYOUTS = ("conv2d", "conv1d", "linear", "linear_t")
# What one block's routing costs: int32 (o, i, y, x) + float fractions once frozen; the four trainable
# start coordinates before.
ROUTING_SCALARS_PER_BLOCK = 8
START_SCALARS_PER_BLOCK = 4
# A product map's (group, pool row) int32 and fraction per output row (``nesc.gather_products``).
PRODUCT_SCALARS_PER_ROW = 3


@dataclass(frozen=True)
class Geometry:
    """Static shape facts of one sampled weight.

    shape: the weight's 4-D view ``(O, I, kh, kw)``.
    pool: the pool's shape ``(Op, Ip, Kh, Kw)``.
    block: the block size ``(bo, bi)`` along the weight's output and input axes.
    layout: how the 4-D view maps back to the parameter (one of ``LAYOUTS``).
    """

    shape: tuple[int, int, int, int]
    pool: tuple[int, int, int, int]
    block: tuple[int, int]
    layout: str

    def __post_init__(self) -> None:
        O, I, kh, kw = self.shape
        Op, Ip, Kh, Kw = self.pool
        bo, bi = self.block
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; valid: {LAYOUTS}")
        if kh > Kh or kw > Kw:
            raise ValueError(
                f"pool {self.pool} is smaller than one kernel window ({kh}x{kw}) of weight {self.shape}"
            )
        if not (1 <= bo <= min(O, Op) and 1 <= bi <= min(I, Ip)):
            raise ValueError(f"block {self.block} must fit both the weight {self.shape} and the pool {self.pool}")

    @property
    def grid(self) -> tuple[int, int]:
        """Number of blocks along O and I."""
        return -(-self.shape[0] // self.block[0]), -(-self.shape[1] // self.block[1])

    @property
    def num_blocks(self) -> int:
        nbo, nbi = self.grid
        return nbo * nbi

    def frozen_routing(self, folded: bool = False, shared: bool = False) -> int:
        """Scalars a frozen routing map stores once ``passes.reuse`` has run: every block's, or for a
        weight it folds, the first ``ceil(Ip / bi)`` blocks of each output row (the folded weight keeps
        only ``Ip`` input columns); for a weight whose rows share one input routing (``shared``,
        ``NESConfig(reuse="outputs")``) and whose pool has fewer rows than the weight, one row of
        blocks plus the product map's (group, row, fraction) per output row."""
        nbo, nbi = self.grid
        kept = min(nbi, -(-self.pool[1] // self.block[1])) if folded else nbi
        if shared and self.pool[0] < self.shape[0]:
            return kept * ROUTING_SCALARS_PER_BLOCK + nbo * PRODUCT_SCALARS_PER_ROW
        return nbo * kept * ROUTING_SCALARS_PER_BLOCK

    @property
    def active(self) -> tuple[bool, bool, bool, bool]:
        """Axes along which a block's window can move: interpolation happens only along these."""
        Op, Ip, Kh, Kw = self.pool
        _, _, kh, kw = self.shape
        return Op > 1, Ip > 1, Kh > kh, Kw > kw

    @cached_property
    def corners(self) -> tuple[tuple[int, int, int, int], ...]:
        """The 2^D integer neighbours of a fractional start, as 0/1 offsets per axis."""
        axes = [(0, 1) if a else (0,) for a in self.active]
        return tuple(itertools.product(*axes))

    @property
    def start_max(self) -> tuple[int, int, int, int]:
        """The largest valid integer start of each coordinate (o, i, y, x) of a routing map: channel
        starts wrap into [0, Op) and [0, Ip), spatial ones clamp to [0, K - k]."""
        return (self.pool[0] - 1, self.pool[1] - 1, *self.start_limits)

    @property
    def start_limits(self) -> tuple[int, int]:
        """Largest valid spatial start (y, x); spatial axes clamp, channel axes wrap."""
        return self.pool[2] - self.shape[2], self.pool[3] - self.shape[3]

    @property
    def param_shape(self) -> tuple[int, ...]:
        O, I, kh, kw = self.shape
        return {"conv2d": (O, I, kh, kw), "conv1d": (O, I, kw), "linear": (O, I), "linear_t": (I, O)}[self.layout]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def to_param_layout(w4: Tensor, layout: str) -> Tensor:
    """(O, I, kh, kw) -> the parameter's own layout."""
    if layout == "conv2d":
        return w4
    if layout == "conv1d":
        return w4[:, :, 0, :]
    if layout == "linear":
        return w4[:, :, 0, 0]
    return w4[:, :, 0, 0].t().contiguous()


def split_starts(starts: Tensor, geometry: Geometry) -> tuple[Tensor, Tensor]:
    """Real-valued starts (nbo, nbi, 4) -> integer part (int32, wrapped/clamped) and fractional part.

    Channel axes wrap modulo the pool; spatial axes clamp to [0, K - k]; axes that cannot move are 0.
    The fractional part keeps its autograd link to ``starts`` (floor has zero gradient).
    """
    lo, hi, mods = _start_bounds(geometry, starts)
    s = torch.clamp(starts, lo, hi)  # space into [0, K - k]; an axis that cannot move to 0; channels free
    base = s.detach().floor()
    return torch.remainder(base, mods).to(torch.int32), s - base  # channels wrap; the rest is already inside


def _start_bounds(geometry: Geometry, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``split_starts``' per-coordinate clamp bounds and moduli, as tensors like ``like``: built once per
    geometry, dtype and device for plain eager tensors (read-only constants), inline while a tracer or
    compiler runs (its tensors are fakes or proxies, which must not outlive it)."""
    key = (geometry, like.dtype, like.device)
    eager = type(like) in (Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()
    bounds = _BOUNDS.get(key) if eager else None
    if bounds is None:
        Op, Ip = geometry.pool[:2]
        ylim, xlim = geometry.start_limits
        inf = math.inf
        lo = [-inf if Op > 1 else 0.0, -inf if Ip > 1 else 0.0, 0.0, 0.0]
        hi = [inf if Op > 1 else 0.0, inf if Ip > 1 else 0.0, float(ylim), float(xlim)]
        mods = [float(Op), float(Ip), float(ylim + 1), float(xlim + 1)]
        with torch.inference_mode(False):  # a cached constant made in inference mode could not be saved for backward
            bounds = tuple(torch.tensor(v, dtype=like.dtype, device=like.device) for v in (lo, hi, mods))
        if eager:
            _BOUNDS[key] = bounds
    return bounds


_BOUNDS: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


# A sampled weight's gain (``W = scale * R(P)``) as the modules store it: a float64 0-d buffer, part of
# ``state_dict()``; a 0-d tensor is read as the op's scalar, so float64 multiplies a pool of any dtype
# exactly as the Python float it replaces did.
def scale_buffer(scale: float | Tensor) -> Tensor:
    return torch.as_tensor(scale, dtype=torch.float64).detach().clone().reshape(())


def regenerate(pool: Tensor, starts: Tensor, fracs: Tensor, scale: float | Tensor, geometry: Geometry) -> Tensor:
    """Build the weight from the pool.

    pool: (Op, Ip, Kh, Kw). starts: int (nbo, nbi, 4), already wrapped/clamped. fracs: (nbo, nbi, 4)
    in [0, 1). Returns the weight in its parameter layout. Differentiable in ``pool`` and ``fracs``.

    Every block's window is a plain slice of the pool padded by wrap-around (channels) and by one
    edge row (spatial), so no index tensor as large as the weight is built (``_Regenerate``).
    """
    return _Regenerate.apply(pool, fracs, starts, float(scale), geometry)


def window_index(starts: Tensor, geometry: Geometry, taps: int = 2) -> Tensor:
    """Flat pool index of every element of every block's window, interpolation rows included.

    starts: int (nbo, nbi, 4), already wrapped/clamped. ``taps``: pool rows each weight element
    reads along an active axis (2: linear interpolation; ``2R`` for a tent of half-width up to
    ``R``, rows ``floor(s) - R + 1 .. floor(s) + R``). Returns int64 ``(nbo, nbi, eo, ei, ey, ex)``
    with ``e = (bo, bi, kh, kw) + (taps - 1) * active``: channel indices wrap modulo the pool, spatial
    indices clamp to its edge rows (a tap past the edge reads the edge row). Built only from
    ``starts`` and ``arange``: a graph that keeps this arithmetic (ONNX, TVM) stores the routing map,
    never an index tensor as large as the weight.
    """
    Op, Ip, Kh, Kw = geometry.pool
    _, _, kh, kw = geometry.shape
    bo, bi = geometry.block
    a = geometry.active
    s = starts.long()
    lo = 1 - taps // 2  # the first tap, relative to floor(s)

    def axis(d: int, length: int, limit: int, wrap: bool) -> Tensor:
        extra = (taps - 1) * a[d]
        idx = s[..., d, None] + torch.arange(length + extra, device=starts.device) + (lo if a[d] else 0)
        return torch.remainder(idx, limit) if wrap else idx.clamp(0, limit - 1)

    io = axis(0, bo, Op, True)[..., :, None, None, None]
    ii = axis(1, bi, Ip, True)[..., None, :, None, None]
    iy = axis(2, kh, Kh, False)[..., None, None, :, None]
    ix = axis(3, kw, Kw, False)[..., None, None, None, :]
    return ((io * Ip + ii) * Kh + iy) * Kw + ix


def regenerate_indexed(pool: Tensor, starts: Tensor, fracs: Tensor, scale: float | Tensor,
                       geometry: Geometry) -> Tensor:
    """``regenerate`` as index arithmetic: one gather of every block's window, then one lerp per
    active axis over all blocks at once.

    Same formula and the same float operations as ``regenerate`` (bit-identical on CPU), but with
    no slicing at the routing map's values (data-dependent Python), so tracers (torch.export, the ONNX
    exporter, TVM's importer) keep it as a small graph over the pool and the routing map. Autograd
    differentiates it in ``pool`` and ``fracs``.
    """
    nbo, nbi = geometry.grid
    w = (pool * scale).reshape(-1)[window_index(starts, geometry)]  # (nbo, nbi, eo, ei, ey, ex)
    for d in range(4):
        if geometry.active[d]:
            n = w.shape[2 + d] - 1
            f = fracs[..., d].to(w.dtype).reshape(nbo, nbi, 1, 1, 1, 1)
            w = torch.lerp(w.narrow(2 + d, 0, n), w.narrow(2 + d, 1, n), f)
    return assemble_blocks(w, geometry)


def assemble_blocks(w: Tensor, geometry: Geometry) -> Tensor:
    """Blocks ``(nbo, nbi, bo, bi, kh, kw)`` -> the weight in its parameter layout."""
    O, I, kh, kw = geometry.shape
    (nbo, nbi), (bo, bi) = geometry.grid, geometry.block
    w4 = w.permute(0, 2, 1, 3, 4, 5).reshape(nbo * bo, nbi * bi, kh, kw)
    if nbo * bo != O or nbi * bi != I:
        w4 = w4[:O, :I]  # the last blocks overhang the weight
    return to_param_layout(w4.contiguous(), geometry.layout)


class _Regenerate(torch.autograd.Function):
    """``regenerate`` over all blocks at once: the windows (one extra row per active axis) stacked from
    slices of the padded pool, one ``lerp`` per active axis weighted by the blocks' fractions, the last
    into the weight's layout. Backward (``_gradients``): the lerps' adjoints in reverse, the fractions'
    gradients ``<H, T[1:] - T[:-1]>`` from recomputed windows; only the padded pool is saved."""

    @staticmethod
    def forward(ctx, pool: Tensor, fracs: Tensor, starts: Tensor, scale: float | Tensor, geometry: Geometry) -> Tensor:
        padded, origins = _pad_for_windows(pool, starts, scale, geometry)
        f = fracs.detach().to(padded.dtype)
        w6, w4 = _block_view(padded.new_empty(_padded_shape(geometry)), geometry)
        _lerp_chain(_windows(padded, origins, geometry), f, geometry, out=w6)
        if tuple(w4.shape[:2]) != geometry.shape[:2]:
            w4 = w4[: geometry.shape[0], : geometry.shape[1]].contiguous()  # the last blocks overhang the weight
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(padded, f)
        ctx.origins, ctx.scale, ctx.geometry, ctx.frac_dtype = origins, scale, geometry, fracs.dtype
        return to_param_layout(w4, geometry.layout)

    @staticmethod
    def backward(ctx, grad: Tensor):
        padded, f = ctx.saved_tensors
        gpool, gfrac = _gradients(grad, padded, f, ctx.origins, ctx.scale, ctx.geometry, *ctx.needs_input_grad[:2])
        return gpool, (gfrac.to(ctx.frac_dtype) if gfrac is not None else None), None, None, None


def regenerate_grad(grad: Tensor, pool: Tensor, starts: Tensor, fracs: Tensor, scale: float | Tensor,
                    geometry: Geometry) -> tuple[Tensor, Tensor]:
    """The gradients in ``pool`` and ``fracs`` of ``regenerate``'s output, given its gradient ``grad``."""
    scale = float(scale)
    padded, origins = _pad_for_windows(pool, starts, scale, geometry)
    gpool, gfrac = _gradients(grad, padded, fracs.to(padded.dtype), origins, scale, geometry, True, True)
    return gpool, gfrac.to(fracs.dtype)


def _gradients(grad, padded, f, origins, scale, g: Geometry, want_pool: bool, want_frac: bool):
    """(pool, fraction) gradients from the padded scaled pool, its fractions ``f`` and the blocks' origins."""
    grad4, full = _from_param_layout(grad, g).to(padded.dtype), _padded_shape(g)
    if tuple(grad4.shape) != full:  # zeros where the last blocks overhang the weight
        grad4 = torch.nn.functional.pad(grad4, (0, 0, 0, 0, 0, full[1] - g.shape[1], 0, full[0] - g.shape[0]))
    H = _block_view(grad4, g)[0]  # (nbo, nbi, bo, bi, kh, kw)
    inputs = _lerp_chain(_windows(padded, origins, g), f, g, inputs_only=True)[1] if want_frac else {}
    gfrac = torch.zeros_like(f) if want_frac else None
    axes = [d for d in range(4) if g.active[d]]
    for d in reversed(axes):
        fd = _per_block(f[..., d])
        if want_frac:
            T, n = inputs[d], inputs[d].shape[2 + d] - 1
            gfrac[..., d] = (H * (T.narrow(2 + d, 1, n) - T.narrow(2 + d, 0, n))).sum((2, 3, 4, 5))
        if want_pool or d != axes[0]:  # H -> its lerp's adjoint, one row longer along d
            n = H.shape[2 + d]
            spread = H.new_empty(tuple(m + (k == 2 + d) for k, m in enumerate(H.shape)))
            torch.mul(H, 1 - fd, out=spread.narrow(2 + d, 0, n))
            spread.narrow(2 + d, n, 1).zero_()
            spread.narrow(2 + d, 1, n).addcmul_(H, fd.expand_as(H))
            H = spread
    gpad = torch.zeros_like(padded) if want_pool else None
    for window, h in zip(_window_views(gpad, origins, H.shape[2:]), H.flatten(0, 1).unbind(0)) if want_pool else ():
        window.add_(h)
    return (_fold_padding(gpad, g).mul_(scale) if want_pool else None), gfrac


def _padded_shape(g: Geometry) -> tuple[int, int, int, int]:  # the weight, its last blocks whole
    return g.grid[0] * g.block[0], g.grid[1] * g.block[1], g.shape[2], g.shape[3]


def _block_view(w4: Tensor, geometry: Geometry) -> tuple[Tensor, Tensor]:
    """A ``(nbo * bo, nbi * bi, kh, kw)`` weight as its blocks ``(nbo, nbi, bo, bi, kh, kw)`` (a view)."""
    (nbo, nbi), (bo, bi) = geometry.grid, geometry.block
    return w4.view(nbo, bo, nbi, bi, *w4.shape[2:]).permute(0, 2, 1, 3, 4, 5), w4


def _per_block(v: Tensor) -> Tensor:  # a scalar per block (nbo, nbi), broadcast over its elements
    return v.reshape(*v.shape, 1, 1, 1, 1)


def _window_views(t: Tensor, origins, extent) -> list[Tensor]:
    """Each block's window of ``t`` (a padded pool or its gradient), ``extent`` long from its origin: one
    strided view per block."""
    stride, base = t.stride(), t.storage_offset()
    return [t.as_strided(extent, stride, base + sum(a * b for a, b in zip(o, stride))) for o in origins]


def _windows(padded: Tensor, origins, geometry: Geometry) -> Tensor:
    """Every block's window of the padded pool, with one extra row along each active axis:
    ``(nbo, nbi, bo + a_o, bi + a_i, kh + a_y, kw + a_x)``."""
    extent = [n + a for n, a in zip((*geometry.block, *geometry.shape[2:]), geometry.active)]
    return torch.stack(_window_views(padded, origins, extent)).view(*geometry.grid, *extent)


def _lerp_chain(w: Tensor, f: Tensor, geometry: Geometry, out: Tensor | None = None,
                inputs_only: bool = False) -> tuple[Tensor | None, dict]:
    """The windows ``w`` read at the blocks' fractions ``f`` ``(nbo, nbi, 4)``: one lerp per active axis,
    the last into ``out``. Returns the blocks and each lerp's input by axis (for the backward); with
    ``inputs_only``, the inputs alone (the last lerp, whose output the backward never reads, is skipped)."""
    active = geometry.active
    last = max((d for d in range(4) if active[d]), default=None)
    inputs = {}
    for d in range(4):
        if active[d]:
            inputs[d], n = w, w.shape[2 + d] - 1
            if inputs_only and d == last:
                return None, inputs
            w = torch.lerp(w.narrow(2 + d, 0, n), w.narrow(2 + d, 1, n), _per_block(f[..., d]),
                           out=out if d == last else None)
    if last is None and out is not None:
        out.copy_(w)  # a pool exactly one window large: nothing to interpolate
    return w, inputs


def _pad_for_windows(pool: Tensor, starts: Tensor, scale: float, geometry: Geometry) -> tuple[Tensor, list]:
    """The scaled pool extended so that every window (and its interpolation corner) is a slice: channels
    wrap (their first ``block`` rows again), spatial axes repeat their last row; and the blocks' origins."""
    bo, bi = geometry.block
    p = pool * scale if scale != 1 else pool  # scale the small pool, not the weight
    p = torch.cat([p, p[:bo]], dim=0) if geometry.active[0] else p
    p = torch.cat([p, p[:, :bi]], dim=1) if geometry.active[1] else p
    p = torch.cat([p, p[:, :, -1:]], dim=2) if geometry.active[2] else p
    p = torch.cat([p, p[:, :, :, -1:]], dim=3) if geometry.active[3] else p
    return p, [tuple(o) for row in starts.tolist() for o in row]


def _fold_padding(gpad: Tensor, geometry: Geometry) -> Tensor:
    """The adjoint of ``_pad_for_windows``: add each padded copy's gradient back onto its source (in
    ``gpad``, which it overwrites)."""
    g = gpad
    for d in (3, 2, 1, 0):
        if geometry.active[d]:
            n, extra = geometry.pool[d], gpad.shape[d] - geometry.pool[d]
            target = g.narrow(d, 0, extra) if d < 2 else g.narrow(d, n - 1, 1)  # the wrapped rows; the edge row
            target += g.narrow(d, n, extra)
            g = g.narrow(d, 0, n)
    return g.contiguous()


def _from_param_layout(w: Tensor, geometry: Geometry) -> Tensor:
    """The parameter's own layout -> (O, I, kh, kw): the inverse of ``to_param_layout``."""
    O, I, kh, kw = geometry.shape
    if geometry.layout == "linear_t":
        w = w.t()
    return w.reshape(O, I, kh, kw)
