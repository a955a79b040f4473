"""decompose_gather_products (rewrite, ONNX export only): spell every ``nesc.gather_products`` node
(``passes.reuse``'s product map) as the aten ops of ``gather_products_aten``.

torch.onnx does not know the custom op. The product map is already index arithmetic: the two product
channels each output channel reads come from the map's int32 starts and an ``arange``
(``nesc.core.modules.product_index``), then two ``index_select`` of the products, one ``lerp`` with
the map's fractions (one per map row, expanded over its block) and the bias. The node keeps its
arguments, so the exported file reads the map's starts and fractions as the stored tensors they are
(never an index-sized constant of them) and the products stay what one conv or linear computes
with the pool's rows: nothing dense comes back.

Requires: a frozen graph; each gather_products node reads its starts and fractions through
``get_attr``. Ensures: no ``nesc.gather_products`` node is left; the graph lints; outputs equal the
frozen graph's bit for bit (the same float operations as the op's eager kernel); no ``get_attr``
added.

    before:  %y = call_function[nesc.gather_products](%conv, %starts, %fracs, %bias, 1, 16, 6, 7)
    after:   %y = call_function[gather_products_aten](%conv, %starts, %fracs, %bias, 1, 16, 6, 7)
             (captured by torch.export as arange / index / remainder / index_select / lerp / add)
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from nesc.core.modules import GATHER_ARGS, is_gather_products
from nesc.passes.infra import PassResult

from .retarget import RetargetNodes


def gather_products_aten(products: Tensor, starts: Tensor, fracs: Tensor, bias: Tensor | None, dim: int,
                         channels: int, block: int, rows: int) -> Tensor:
    """``torch.ops.nesc.gather_products`` in ops torch.onnx translates: the same values, the same float
    operations (two gathers, one lerp per element, the bias added after it).

    The index is ``product_index`` laid out as (map rows, block): row ``j``'s ``block`` channels read
    ``g*rows + (o + a) % rows`` for ``a`` in ``arange(block)``. Built that way, the only index-sized
    constant onnxsim can fold is that ``arange(block)``, not one ``channels``-long vector per step."""
    dim = dim % products.dim()
    n = starts.shape[0]  # rows of the product map: ceil(channels / block)
    g, o = starts.long().unbind(-1)  # (n,) each
    lo = o[:, None] + torch.arange(block, device=starts.device)  # (n, block)
    step = 1 if rows > 1 else 0  # a one-row pool cannot move along its rows
    base = g[:, None] * rows
    index = [(base + (lo + s) % rows).reshape(-1)[:channels] for s in (0, step)]  # (channels,) each
    lo_p, hi_p = (products.index_select(dim, i) for i in index)
    view = [1] * products.dim()
    view[dim] = -1
    f = fracs.to(products.dtype)[:, None].expand(n, block).reshape(-1)[:channels].view(view)
    out = torch.lerp(lo_p, hi_p, f)
    return out if bias is None else out + bias.view(view)


class DecomposeGatherProducts(RetargetNodes):
    name = "decompose_gather_products"
    matches = staticmethod(is_gather_products)
    target = staticmethod(gather_products_aten)
    stored = {GATHER_ARGS.index("starts"): "product map's starts", GATHER_ARGS.index("fracs"): "product map's fracs"}
    what, op = "product maps", "gather_products"


def decompose_gather_products(gm: fx.GraphModule) -> PassResult:
    """``DecomposeGatherProducts()(gm)``: the pass as a plain function."""
    return DecomposeGatherProducts()(gm)

