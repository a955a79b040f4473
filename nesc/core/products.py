"""``torch.ops.nesc.gather_products``: ``passes.reuse``'s product map, output channels as (interpolated)
copies of the channels of one op run with a pool's rows; a ``torch.library`` custom op (fake kernel and
autograd registered) that torch.export keeps as one node. ``nesc.core.modules`` imports it (and
re-exports ``gather_products_op`` / ``product_index``); importing either registers the op.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def product_index(starts: Tensor, channels: int, block: int, rows: int) -> Tensor:
    """The two product channels output channel ``c`` interpolates between, ``(channels, 2)``: row
    ``j = c // block`` of the product map starts at pool row ``o`` of product group ``g`` (``starts[j] =
    (g, o)``), so channel ``c`` reads rows ``o + c % block`` and the next one (mod ``rows``, the pool's
    rows, as ``regenerate`` wraps them) of group ``g``'s ``rows`` products."""
    c = torch.arange(channels, device=starts.device)
    g, o = starts[c // block].long().unbind(-1)
    lo = o + c % block
    step = 1 if rows > 1 else 0  # a one-row pool cannot move along its rows
    return torch.stack([g * rows + lo % rows, g * rows + (lo + step) % rows], -1)


@torch.library.custom_op("nesc::gather_products", mutates_args=())
def gather_products_op(products: Tensor, starts: Tensor, fracs: Tensor, bias: Tensor | None, dim: int,
                       channels: int, block: int, rows: int) -> Tensor:
    """``passes.reuse``'s product map: ``channels`` outputs along ``dim``, each the interpolation of
    two of ``products``' channels (``product_index``) with its row's fraction, plus ``bias``.

    ``products`` is one op (conv, linear) run with a pool's rows as its weight, ``rows`` channels per
    group of distinct input routing; the op is linear in its weight, so interpolating its outputs
    equals running it with the interpolated weight. ``starts``: int32 ``(ceil(channels / block), 2)``,
    ``(group, pool row)`` per output row; ``fracs``: ``(ceil(channels / block),)`` in ``[0, 1)``."""
    dim = dim % products.dim()
    index = product_index(starts, channels, block, rows)
    lo, hi = products.index_select(dim, index[:, 0]), products.index_select(dim, index[:, 1])
    view = [1] * products.dim()
    view[dim] = -1
    f = fracs.to(products.dtype).repeat_interleave(block)[:channels].view(view)
    out = torch.lerp(lo, hi, f)
    return out if bias is None else out + bias.view(view)


@gather_products_op.register_fake
def _gather_products_fake(products, starts, fracs, bias, dim, channels, block, rows):
    shape = list(products.shape)
    shape[dim % products.dim()] = channels
    return products.new_empty(shape)


def _gather_products_setup(ctx, inputs, output):
    products, starts, fracs, bias, dim, channels, block, rows = inputs
    ctx.save_for_backward(products, starts, fracs)
    ctx.args = (dim % products.dim(), channels, block, rows, bias is not None)


def _gather_products_backward(ctx, grad):
    products, starts, fracs = ctx.saved_tensors
    dim, channels, block, rows, has_bias = ctx.args
    view = [1] * products.dim()
    view[dim] = -1
    index = product_index(starts, channels, block, rows)
    f = fracs.to(grad.dtype).repeat_interleave(block)[:channels].view(view)
    gp = torch.zeros_like(products).index_add_(dim, index[:, 0], grad * (1 - f)).index_add_(dim, index[:, 1], grad * f)
    others = [d for d in range(grad.dim()) if d != dim]
    diff = products.index_select(dim, index[:, 1]) - products.index_select(dim, index[:, 0])
    per_channel = (grad * diff).sum(others)
    gf = F.pad(per_channel, (0, fracs.numel() * block - channels)).view(-1, block).sum(1).to(fracs.dtype)
    return gp, None, gf, grad.sum(others) if has_bias else None, None, None, None, None


gather_products_op.register_autograd(_gather_products_backward, setup_context=_gather_products_setup)


__all__ = ["gather_products_op", "product_index"]
