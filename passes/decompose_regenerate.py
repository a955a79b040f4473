"""decompose_regenerate (rewrite): spell every ``nesc.regenerate`` node out as aten index arithmetic.

Exporters and compilers do not know the custom op ``torch.ops.nesc.regenerate``, and its eager kernel
loops over blocks in Python, which a tracer would unroll into constants. This pass replaces each such
node with the aten graph of ``nesc.core.sampling.regenerate_indexed``: an index built from the routing
map's int32 starts and ``arange`` (never a weight-sized constant), one ``index`` (gather) of the
flattened pool, and one ``lerp`` per active axis with the routing map's fractions. The gather and the
lerps read the pool parameter and the routing-map buffers through their ``get_attr`` nodes, so a
downstream exporter sees the compressed tensors as inputs of the regeneration, not a dense weight.

Requires: a frozen graph (``passes.freeze``); each regenerate node reads its pool, starts and
fractions through ``get_attr``. Ensures: no ``nesc.regenerate`` node is left; the graph lints;
outputs equal the frozen graph's bit for bit (``regenerate_indexed`` performs the same float
operations as ``regenerate``); the subgraph adds no ``get_attr`` (no new stored tensor).

    before:  %w = call_function[nesc.regenerate](%pool, %starts, %fracs, %scale, [O, I, kh, kw], [bo, bi], "conv2d")
    after:   %idx = ... aten.arange / add / remainder / clamp on %starts ...
             %win = aten.index(aten.view(aten.mul(%pool, %scale), [-1]), [%idx]); %w = ... aten.lerp(.., %fracs) ...
"""

from __future__ import annotations

from torch import Tensor, fx
from torch.fx.experimental.proxy_tensor import make_fx

from nesc.core import names
from nesc.core.errors import PassOrderError
from nesc.core.modules import is_regenerate
from nesc.core.sampling import Geometry, regenerate_indexed

from .infra import NescPass, PassResult, broken_promise

# The tensors a regenerate node reads, in its argument order; each through a get_attr.
ROLES = ("pool", "starts", "fracs", "scale")


class DecomposeRegenerate(NescPass):
    name = "decompose_regenerate"

    def requires(self, gm: fx.GraphModule) -> None:
        for node in _regenerate_nodes(gm):
            for arg, role in zip(node.args[:4], ROLES):
                _tensor_of(gm, node, arg, role)

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = _regenerate_nodes(gm)
        for node in nodes:
            _inline(gm, node, _traced_regeneration(gm, node))
        if nodes:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(nodes))

    def ensures(self, gm: fx.GraphModule) -> None:
        if _regenerate_nodes(gm):
            raise broken_promise(self.name, "regenerate nodes are left")


def decompose_regenerate(gm: fx.GraphModule) -> PassResult:
    """``DecomposeRegenerate()(gm)``: the pass as a plain function."""
    return DecomposeRegenerate()(gm)


def _regenerate_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_regenerate(n)]


def _traced_regeneration(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    """``regenerate_indexed`` for this node's geometry, traced to aten ops on (pool, starts, fracs, scale)."""
    shape, block, layout = node.args[4:]
    tensors = [_tensor_of(gm, node, arg, role) for arg, role in zip(node.args[:4], ROLES)]
    geometry = Geometry(tuple(shape), tuple(tensors[0].shape), tuple(block), layout)

    def regeneration(p: Tensor, s: Tensor, f: Tensor, g: Tensor) -> Tensor:
        return regenerate_indexed(p, s, f, g, geometry)

    # Fake tensors: tracing needs shapes and dtypes only, not a weight-sized computation.
    traced = make_fx(regeneration, tracing_mode="fake")(*tensors)
    stray = [n.target for n in traced.graph.nodes if n.op == "get_attr"]
    if stray:  # a tensor constant would be stored in the exported file next to the pool
        raise AssertionError(f"regenerate_indexed traced to tensor constants {stray}; it must use only its inputs")
    return traced


def _tensor_of(gm: fx.GraphModule, node: fx.Node, arg, role: str) -> Tensor:
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        raise PassOrderError(
            f"decompose_regenerate: node {node.name!r} (weight {node.meta.get(names.SAMPLED_WEIGHT, '?')}) reads its "
            f"{role} from {arg!r}, expected a get_attr of the frozen module's tensor. Run it on the output of "
            f"nesc.freeze or nesc.load, which read pools and routing maps through get_attr."
        )
    return gm.get_parameter(arg.target) if role == "pool" else gm.get_buffer(arg.target)


def _inline(gm: fx.GraphModule, node: fx.Node, traced: fx.GraphModule) -> None:
    """Copy ``traced``'s nodes in place of ``node``, its placeholders bound to node's tensor args."""
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, node.args[:4]))
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(traced.graph, env)
    out.meta.update(node.meta)  # the weight's name (names.SAMPLED_WEIGHT) stays on the node that makes it
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
