"""reuse (rewrite): fold the input channels of every frozen weight whose input columns repeat.

A sampled weight whose blocks of each output row share their output-channel and spatial starts and
read consecutive pool columns from an integer input start (what ``NESConfig(reuse=True)`` trains:
``EpitomeSampler.tie``) has periodic input columns: ``W[:, i] = W[:, i mod Ip]`` for the pool's ``Ip``
input channels, whatever the pool holds. Then

    conv(x, W) = conv(fold(x), W[:, :Ip]),   fold(x)[c] = sum over i = c (mod Ip) of x[i]

(the same for linear and matmul along the last axis): the op runs on ``Ip`` instead of ``I`` input
channels, ``I / Ip`` times fewer multiply-adds, for ``(I - Ip)`` adds per output position of the fold.
The regenerate node then builds only ``W[:, :Ip]`` (the first ``ceil(Ip / bi)`` input blocks of the
routing map), so regeneration and the routing map shrink too. The condition is checked on the
routing map's structure, never on the pool's values, so it still holds after fine-tuning.

Left alone, each with its reason in ``gm.meta[names.REUSE]``: grouped and depthwise convs (each
output reads its own group), transposed convs, weights read through another op (a transpose) or by
several ops, layers whose input is no wider than the pool, and routing maps that are not periodic.

Requires: a frozen graph (``nesc.regenerate`` nodes) with find_weights' meta. Ensures: outputs equal
the unrewritten graph's to float rounding (the fold reorders a sum); ``gm.meta[names.REUSE]`` holds one
decision per frozen weight; find_weights must run again before the report reads the graph.

    before:  %w = nesc.regenerate(%pool, %starts, %fracs, s, [O, I, kh, kw], [bo, bi], "conv2d")
             %y = conv2d(%x, %w, ...)
    after:   %xp = pad(%x, channels I -> C * Ip); %xf = sum(reshape(%xp, (N, C, Ip, H, W)), 1)
             %w = nesc.regenerate(%pool, %starts', %fracs', s, [O, Ip, kh, kw], [bo, bi], "conv2d")
             %y = conv2d(%xf, %w, ...)
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.nn import functional as F

from nesc.core import names
from nesc.core.modules import REGENERATE, RoutingMap, is_regenerate

from .find_weights import WEIGHT_OPS, weight_nodes
from .infra import NescPass, PassResult, require_meta


class Reuse(NescPass):
    name = "reuse"

    def requires(self, gm: fx.GraphModule) -> None:
        if any(is_regenerate(n) for n in gm.graph.nodes):
            require_meta(gm, names.DENSE_PARAMS, self.name, "passes.find_weights")

    def call(self, gm: fx.GraphModule) -> PassResult:
        decisions: dict[str, str] = {}
        modified = False
        for op_node in list(weight_nodes(gm)):
            info = op_node.meta[names.WEIGHT]
            if info.state != "frozen":
                continue
            why = _fold(gm, op_node, info)
            decisions[info.weight_name] = why
            modified |= why.startswith("folded")
        gm.meta[names.REUSE] = decisions
        if modified:
            _drop_unused_routes(gm)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def reuse(gm: fx.GraphModule) -> PassResult:
    """``Reuse()(gm)``: the pass as a plain function."""
    return Reuse()(gm)


def _fold(gm: fx.GraphModule, op_node: fx.Node, info) -> str:
    """Rewrite one op if its weight's input columns repeat; returns the decision, for the report."""
    spec = WEIGHT_OPS.get(op_node.target)
    if spec is None or spec.family not in ("conv", "linear", "matmul"):
        return f"kept: {info.op} is not a conv, linear or matmul"
    if info.op in ("conv2d_dw", "conv2d_group") or (spec.groups is not None and _arg(op_node, spec.groups, 1) != 1):
        return "kept: grouped conv (each output reads its own input group)"
    if spec.transposed is not None and _arg(op_node, spec.transposed, False):
        return "kept: transposed conv"
    weight = op_node.args[spec.weight]
    if not (isinstance(weight, fx.Node) and is_regenerate(weight)):
        return "kept: the weight reaches the op through another op"
    if len(weight.users) != 1:
        return "kept: the weight is read by several ops"
    pool, starts, fracs, scale, shape, block, layout = weight.args
    O, I, kh, kw = shape
    Ip = gm.get_parameter(pool.target).shape[1]
    if I <= Ip:
        return f"kept: {I} input channels, no wider than the pool's {Ip}"
    s, f = gm.get_buffer(starts.target), gm.get_buffer(fracs.target)
    if not _periodic(s, f, block[1], Ip):
        return "kept: the routing map's input columns do not repeat (train with NESConfig(reuse=True))"
    keep = math.ceil(Ip / block[1])  # input blocks covering the first Ip columns
    key = f"{starts.target.split('.')[-2]}_folded"
    routes = getattr(gm, names.ROUTES)
    routes.add_module(key, RoutingMap(s[:, :keep].clone(), f[:, :keep].clone()))
    x = op_node.args[spec.input]
    dim = 1 if spec.family == "conv" else -1
    with gm.graph.inserting_before(op_node):
        folded = gm.graph.call_function(fold_channels, (x, Ip, dim))
        new_s = gm.graph.get_attr(f"{names.ROUTES}.{key}.starts")
        new_f = gm.graph.get_attr(f"{names.ROUTES}.{key}.fracs")
        new_w = gm.graph.call_function(REGENERATE, (pool, new_s, new_f, scale, [O, Ip, kh, kw], list(block), layout))
    new_w.meta.update(weight.meta)
    args = list(op_node.args)
    args[spec.input], args[spec.weight] = folded, new_w
    op_node.args = tuple(args)
    gm.graph.erase_node(weight)
    return f"folded: {I} -> {Ip} input channels ({I / Ip:.2f}x fewer multiply-adds)"


def fold_channels(x: torch.Tensor, period: int, dim: int) -> torch.Tensor:
    """Sum the channels of ``x`` along ``dim`` that are equal modulo ``period``: zero-pad the axis to a
    multiple of ``period``, split it into (copies, period) and sum the copies."""
    dim = dim % x.dim()
    n = x.shape[dim]
    copies = -(-n // period)
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, copies * period - n]
    x = F.pad(x, pad)
    return x.reshape(*x.shape[:dim], copies, period, *x.shape[dim + 1 :]).sum(dim)


def _periodic(starts: torch.Tensor, fracs: torch.Tensor, bi: int, Ip: int) -> bool:
    """Every block of a row shares the row's (o, y, x) start and fractions, reads the input columns
    after its left neighbour's (``i0 + k * bi`` mod ``Ip``) and has no input fraction."""
    nbi = starts.shape[1]
    row_s, row_f = starts[:, :1], fracs[:, :1]
    other = [0, 2, 3]
    same = torch.equal(starts[..., other], row_s[..., other].expand_as(starts[..., other])) and torch.equal(
        fracs[..., other], row_f[..., other].expand_as(fracs[..., other]))
    step = (row_s[..., 1].long() + torch.arange(nbi) * bi) % Ip
    return same and bool((fracs[..., 1] == 0).all()) and torch.equal(starts[..., 1].long() % Ip, step)


def _arg(node: fx.Node, index: int, default):
    return node.args[index] if index < len(node.args) else default


def _drop_unused_routes(gm: fx.GraphModule) -> None:
    """Remove the routing maps no node reads any more (replaced by their folded copies)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    routes = getattr(gm, names.ROUTES)
    for key in [k for k, _ in routes.named_children()]:
        if f"{names.ROUTES}.{key}.starts" not in used and f"{names.ROUTES}.{key}.fracs" not in used:
            delattr(routes, key)
