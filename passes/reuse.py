"""reuse (rewrite): fold the input channels and share the output products of frozen weights.

**Input-channel folding.** A sampled weight whose blocks of each output row share their
output-channel and spatial starts and read consecutive pool columns from an integer input start
(what ``NESConfig(reuse=True)`` trains: ``EpitomeSampler.tie``) has periodic input columns:
``W[:, i] = W[:, i mod Ip]`` for the pool's ``Ip`` input channels, whatever the pool holds. Then

    conv(x, W) = conv(fold(x), W[:, :Ip]),   fold(x)[c] = sum over i = c (mod Ip) of x[i]

(the same for linear and matmul along the last axis): ``I / Ip`` times fewer multiply-adds, for
``(I - Ip)`` adds per output position of the fold. The regenerate node then builds only ``W[:, :Ip]``.

**Product maps.** Output row ``j`` of a weight reads pool rows ``o_j, o_j + 1, ...`` (interpolated by
``f_j``) under some input/spatial routing. Rows whose blocks share ``(o_j, f_j)`` and whose input
routing is one of ``G`` distinct ones are all interpolations of the op run once with the pool's ``Op``
rows under each routing, since the op is linear in its weight:

    conv(x, lerp(P[o], P[o+1], f)) = lerp(Z[o], Z[o+1], f),   Z = conv(x, P_g)  (Op channels per group g)

so ``G * Op`` output channels are computed instead of ``O`` (``NESConfig(reuse="outputs")`` trains
``G = 1``), and ``nesc.gather_products`` copies or interpolates them into place, bias after. Applied
where ``G * Op < O``.

Both conditions are checked on the routing map's structure, never on the pool's values, so they hold
after fine-tuning. Left alone, each with its reason in ``gm.meta[names.REUSE]``: grouped and depthwise
convs (each output reads its own group), transposed convs, weights read through another op (a
transpose) or by several ops, inputs no wider than the pool, routing maps that do not repeat, and
product maps that would not be smaller (or addmm, whose bias comes first).

Requires: a frozen graph (``nesc.regenerate`` nodes) with find_weights' meta. Ensures: outputs equal
the unrewritten graph's to float rounding (the fold and the interpolation reorder sums);
``gm.meta[names.REUSE]`` holds one decision per frozen weight; find_weights must run again before the
report reads the graph.

    before:  %w = nesc.regenerate(%pool, %starts, %fracs, s, [O, I, kh, kw], [bo, bi], "conv2d")
             %y = conv2d(%x, %w, %b, ...)
    after:   %xp = pad(%x, channels I -> C * Ip); %xf = sum(reshape(%xp, (N, C, Ip, H, W)), 1)
             %w = nesc.regenerate(%pool, %starts', %fracs', s, [G * Op, Ip, kh, kw], [Op, bi], "conv2d")
             %z = conv2d(%xf, %w, None, ...)
             %y = nesc.gather_products(%z, %rows, %row_fracs, %b, 1, O, bo, Op)
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.nn import functional as F

from nesc.core import names
from nesc.core.modules import GATHER_PRODUCTS, REGENERATE, RoutingMap, is_regenerate

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
            why = _rewrite(gm, op_node, info)
            decisions[info.weight_name] = why
            modified |= any(part.startswith(("folded", "shared")) for part in why.split("; "))
        gm.meta[names.REUSE] = decisions
        if modified:
            _drop_unused_routes(gm)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def reuse(gm: fx.GraphModule) -> PassResult:
    """``Reuse()(gm)``: the pass as a plain function."""
    return Reuse()(gm)


def _rewrite(gm: fx.GraphModule, op_node: fx.Node, info) -> str:
    """Fold one op's input channels and share its products across outputs where exact; the decision."""
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
    folded = _fold(gm, op_node, spec, weight)
    return f"{folded}; {_share(gm, op_node, spec, op_node.args[spec.weight])}"


def _fold(gm: fx.GraphModule, op_node: fx.Node, spec, weight: fx.Node) -> str:
    """Rewrite one op if its weight's input columns repeat; returns the decision, for the report."""
    pool, starts, fracs, scale, shape, block, layout = weight.args
    O, I, kh, kw = shape
    Ip = gm.get_parameter(pool.target).shape[1]
    if I <= Ip:
        return f"kept: {I} input channels, no wider than the pool's {Ip}"
    s, f = gm.get_buffer(starts.target), gm.get_buffer(fracs.target)
    if not _periodic(s, f, block[1], Ip):
        return "kept: the routing map's input columns do not repeat (train with NESConfig(reuse=True))"
    keep = math.ceil(Ip / block[1])  # input blocks covering the first Ip columns
    x = op_node.args[spec.input]
    with gm.graph.inserting_before(op_node):
        new_s, new_f = _add_routes(gm, f"{starts.target.split('.')[-2]}_folded", s[:, :keep], f[:, :keep])
        folded = gm.graph.call_function(fold_channels, (x, Ip, 1 if spec.family == "conv" else -1))
        new_w = gm.graph.call_function(REGENERATE, (pool, new_s, new_f, scale, [O, Ip, kh, kw], list(block), layout))
    new_w.meta.update(weight.meta)
    args = list(op_node.args)
    args[spec.input], args[spec.weight] = folded, new_w
    op_node.args = tuple(args)
    gm.graph.erase_node(weight)
    return f"folded: {I} -> {Ip} input channels ({I / Ip:.2f}x fewer multiply-adds)"


def _share(gm: fx.GraphModule, op_node: fx.Node, spec, weight: fx.Node) -> str:
    """Run the op once with the pool's rows under each distinct input routing and make every output
    channel an (interpolated) copy of those products, if that is fewer output channels."""
    pool, starts, fracs, scale, shape, block, layout = weight.args
    O, I, kh, kw = shape
    Op = gm.get_parameter(pool.target).shape[0]
    if spec.bias is not None and spec.family == "matmul":
        return "kept outputs: addmm (its bias is its first argument)"
    s, f = gm.get_buffer(starts.target), gm.get_buffer(fracs.target)
    row_s, row_f = s[:, :1, 0].expand_as(s[..., 0]), f[:, :1, 0].expand_as(f[..., 0])
    if not (torch.equal(s[..., 0], row_s) and torch.equal(f[..., 0], row_f)):
        return "kept outputs: the blocks of an output row start at different pool rows"
    # Rows with the same input/spatial routing read the same products: one group per distinct routing.
    keys = torch.cat([s[..., 1:].float(), f[..., 1:]], -1).flatten(1)
    uniq, group = torch.unique(keys, dim=0, return_inverse=True)
    G = uniq.shape[0]
    if G * Op >= O:
        return (f"kept outputs: {G} distinct input routing(s) x {Op} pool rows >= {O} outputs "
                f"(train with NESConfig(reuse='outputs'))")
    first = torch.stack([(group == g).nonzero()[0, 0] for g in range(G)])  # one row of each group
    new_s, new_f = s[first].clone(), f[first].clone()
    new_s[..., 0], new_f[..., 0] = 0, 0
    # The product map's routing: per output row, its group and pool row (wrapped), and the fraction.
    row_starts = torch.stack([group, s[:, 0, 0].long()], 1)
    key = f"{starts.target.split('.')[-2]}_shared"
    bias = _arg(op_node, spec.bias, None) if spec.bias is not None else None
    if "bias" in op_node.kwargs:
        bias = op_node.kwargs["bias"]
    with gm.graph.inserting_before(op_node):
        w_s, w_f = _add_routes(gm, key, new_s, new_f)
        p_s, p_f = _add_routes(gm, f"{key}_products", row_starts, f[:, 0, 0])
        new_w = gm.graph.call_function(REGENERATE, (pool, w_s, w_f, scale, [G * Op, I, kh, kw], [Op, block[1]], layout))
    new_w.meta.update(weight.meta)
    args, kwargs = list(op_node.args), dict(op_node.kwargs)
    args[spec.weight] = new_w
    if "bias" in kwargs:
        kwargs["bias"] = None
    elif spec.bias is not None and spec.bias < len(args):
        args[spec.bias] = None
    op_node.args, op_node.kwargs = tuple(args), kwargs
    gm.graph.erase_node(weight)
    with gm.graph.inserting_after(op_node):
        out = gm.graph.call_function(GATHER_PRODUCTS, (op_node, p_s, p_f, bias, 1 if spec.family == "conv" else -1,
                                                       O, block[0], Op))
    op_node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    return f"shared: {O} outputs from {G * Op} products ({O / (G * Op):.2f}x fewer multiply-adds)"


def _add_routes(gm: fx.GraphModule, key: str, starts: torch.Tensor, fracs: torch.Tensor) -> tuple[fx.Node, fx.Node]:
    """A routing map under ``key`` and the get_attr nodes reading it, inserted at the graph's insert point."""
    getattr(gm, names.ROUTES).add_module(key, RoutingMap(starts.clone(), fracs.clone()))
    return (gm.graph.get_attr(f"{names.ROUTES}.{key}.starts"), gm.graph.get_attr(f"{names.ROUTES}.{key}.fracs"))


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
