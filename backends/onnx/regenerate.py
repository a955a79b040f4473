"""decompose_regenerate_onnx (rewrite, ONNX export only): spell every ``nesc.regenerate`` node as the
aten ops of ``regenerate_rows``, the form of ``regenerate_indexed`` that onnxruntime folds cheaply.

onnxruntime computes the regeneration once, when a session is created, and keeps every intermediate
tensor of the folded subgraph as an initializer until its constant folder has visited the whole
graph: the session's peak memory is the sum of all of them, over all layers. So each weight-sized
ONNX node costs its bytes at load time, and this form has few:

* one ``Gather`` of the pool's *rows*: the trailing pool axes that every window reads whole (a 3x3
  kernel from a 3x3 pool: 9 floats a row) are the gathered rows, so the index is that many times
  smaller than the weight; it is int32 (``Gather`` takes int32, ``GatherND`` only int64), built from
  the routing map's starts and small ``arange``\\ s, the small axes combined first, so that only the
  last ``Add`` is as large as the index;
* the interpolation, where the windows move along channel axes only (every registry model: a pool's
  kernel is the layer's): one grouped ``Conv`` over the gathered windows (a group per block, its
  kernel the bilinear weights, ``(1-f, f)`` per active axis, outer product), then one ``Transpose``
  and one ``Reshape`` to the parameter's layout. Otherwise (a pool spatially larger than the
  kernel), one ``lo + f * (hi - lo)`` per active axis, two ``Slice``\\ s and three elementwise nodes
  each, over an index laid out in the parameter's order (no ``Transpose``). Either is a fraction of
  torchlib's ``aten.lerp``, torch's two-sided formula (six weight-sized nodes per axis);
* a ``Slice`` only along an axis where the last block overhangs the weight.

Same formula as ``nesc.core.sampling.regenerate_indexed`` (the same window, the same wrap and clamp),
equal up to float rounding (bilinear weights, one-sided lerps); the parity with eager PyTorch is
tested through onnxruntime. Requires: a frozen graph (each regenerate node's pool, starts and
fractions are ``get_attr``\\ s, as ``nesc.freeze`` and ``nesc.load`` make them). Ensures: no
``nesc.regenerate`` node is left; the graph lints; no ``get_attr`` added (the file stores the routing
map, no index).

    before:  %w = call_function[nesc.regenerate](%pool, %starts, %fracs, scale, [O, I, kh, kw], [bo, bi], layout)
    after:   %w = call_function[regenerate_rows](%pool, %starts, %fracs, scale, [O, I, kh, kw], [bo, bi], layout)
             (captured by torch.export as arange / add / remainder / embedding / convolution / permute / view)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from nesc.core.modules import is_regenerate
from nesc.core.sampling import Geometry
from nesc.passes.infra import PassResult

from .retarget import RetargetNodes


def regenerate_rows(pool: Tensor, starts: Tensor, fracs: Tensor, scale: float | Tensor, shape, block,
                    layout: str) -> Tensor:
    """``torch.ops.nesc.regenerate``'s weight (same arguments) in the ops listed in the module docstring."""
    g = Geometry(tuple(shape), tuple(pool.shape), tuple(block), layout)
    Op, Ip, Kh, Kw = g.pool
    O, I, kh, kw = g.shape
    (bo, bi), (nbo, nbi), active = g.block, g.grid, g.active
    whole_x = not active[3]  # every window reads all Kw columns (kw == Kw) ...
    whole_y = whole_x and not active[2]  # ... and all Kh rows: a row is the pool's Kh x Kw plane
    row = (Kh if whole_y else 1) * (Kw if whole_x else 1)
    # scale: a float, or a 0-d buffer (a graph input: always multiplied, never compared while tracing)
    one = not isinstance(scale, Tensor) and scale == 1
    rows = (pool if one else pool * scale.to(pool.dtype) if isinstance(scale, Tensor) else pool * scale).reshape(-1, row)

    def axis(d: int, length: int, limit: int, stride: int, wrap: bool) -> Tensor:  # (nbo, nbi, length (+1))
        idx = starts[..., d, None] + torch.arange(length + active[d], dtype=starts.dtype, device=starts.device)
        idx = torch.remainder(idx, limit) if wrap else idx.clamp(0, limit - 1)
        return idx if stride == 1 else idx * stride

    # Row index strides, in rows: x 1, y (when not in the row), i, o.
    sy = 1 if whole_x else Kw
    si = (1 if whole_y else Kh) * sy
    io, ii = axis(0, bo, Op, si * Ip, wrap=True), axis(1, bi, Ip, si, wrap=True)
    if whole_y:
        w = _bilinear(rows, io, ii, fracs, active, (nbo, nbi, bo, bi))  # (nbo, bo, nbi, bi, row)
    else:
        spatial = axis(2, kh, Kh, sy, wrap=False)  # (nbo, nbi, ey, [ex])
        if not whole_x:
            spatial = spatial[..., :, None] + axis(3, kw, Kw, 1, wrap=False)[..., None, :]
        w = _separable(rows, io, ii, spatial, fracs, active, (nbo, nbi, bo, bi))  # (nbo, bo, nbi, bi, ...)
    if layout == "linear_t":  # (nbo, bo, nbi, bi, 1...) -> (I, O)
        w = w.reshape(nbo * bo, nbi * bi).t()
        return _crop(_crop(w, 0, I), 1, O)
    spatial_shape = {"conv2d": (kh, kw), "conv1d": (kw,), "linear": ()}[layout]
    return _crop(_crop(w.reshape(nbo * bo, nbi * bi, *spatial_shape), 0, O), 1, I)


def _bilinear(rows: Tensor, io: Tensor, ii: Tensor, fracs: Tensor, active, grid) -> Tensor:
    """Windows that move along the channel axes only: gathered with the blocks as channels, interpolated
    by one grouped convolution (a block's kernel: the outer product of ``(1-f, f)`` per active axis).
    Returns ``(nbo, bo, nbi, bi, row)``."""
    nbo, nbi, bo, bi = grid
    nb = nbo * nbi
    index = io.reshape(1, nb, -1, 1) + ii.reshape(1, nb, 1, -1)  # (1, nb, eo, ei)
    w = F.embedding(index, rows)  # (1, nb, eo, ei, row)
    kernel = None  # (nb, 1, 2 or 1, 2 or 1, 1)
    for d, view in ((0, (nb, 1, 2, 1, 1)), (1, (nb, 1, 1, 2, 1))):
        if active[d]:
            f = fracs[..., d].reshape(nb, 1).to(w.dtype)
            k = torch.cat([1 - f, f], dim=1).reshape(view)
            kernel = k if kernel is None else kernel * k
    if kernel is not None:
        # An explicit zero bias: torchlib (onnxscript 0.7) spells conv3d's missing bias with shape (nb, 2).
        w = F.conv3d(w, kernel, kernel.new_zeros(nb), groups=nb)  # (1, nb, bo, bi, row)
    return w.reshape(nbo, nbi, bo, bi, -1).permute(0, 2, 1, 3, 4)


def _separable(rows: Tensor, io: Tensor, ii: Tensor, spatial: Tensor, fracs: Tensor, active, grid) -> Tensor:
    """Windows that also move along a spatial axis: gathered in the parameter's order
    ``(nbo, eo, nbi, ei, ey, [ex], row)``, interpolated one active axis after the other."""
    nbo, nbi = grid[:2]
    tail = (1,) * (spatial.dim() - 2)
    index = io.permute(0, 2, 1).reshape(nbo, -1, nbi, 1, *tail) + spatial[:, None, :, None]
    index = index + ii.reshape(nbo, 1, nbi, -1, *tail)  # (nbo, eo, nbi, ei, ey, [ex])
    w = F.embedding(index, rows)
    for d, dim in ((0, 1), (1, 3), (2, 4), (3, 5)):
        if active[d]:  # x is active only when it is in the index (dim 5)
            n = w.shape[dim] - 1
            f = fracs[..., d].to(w.dtype).reshape(nbo, 1, nbi, 1, *[1] * (w.dim() - 4))
            lo, hi = w.narrow(dim, 0, n), w.narrow(dim, 1, n)
            w = lo + f * (hi - lo)
    return w


def _crop(w: Tensor, dim: int, size: int) -> Tensor:
    return w if w.shape[dim] == size else w.narrow(dim, 0, size)  # only where the last block overhangs


class DecomposeRegenerateOnnx(RetargetNodes):
    name = "decompose_regenerate_onnx"
    matches = staticmethod(is_regenerate)
    target = staticmethod(regenerate_rows)
    stored = {0: "pool", 1: "starts", 2: "fracs"}
    what, op = "pools and routing maps", "regenerate"


def decompose_regenerate_onnx(gm: fx.GraphModule) -> PassResult:
    """``DecomposeRegenerateOnnx()(gm)``: the pass as a plain function."""
    return DecomposeRegenerateOnnx()(gm)

