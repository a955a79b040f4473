"""freeze (rewrite): turn every trainable sampler into a routing map and one ``nesc.regenerate`` node.

The learned start indices (plus, with a transformation learner, its running average offset — what
eval mode uses) are split once into int32 starts and float fractions per block and stored as buffers
of a ``RoutingMap`` under ``names.ROUTES``. Samplers and learners are removed. Regeneration uses the
same function as training, so the frozen model equals the trained model in eval mode bit for bit.

Requires: nothing (a graph without samplers is left as it is). Ensures: no EpitomeSampler is called
and ``names.SAMPLERS`` is gone; the module stores only pools, routing maps (8 scalars per block) and
the parameters left dense.

    before:  %w = call_module[<samplers>.conv1_weight](%pool)
    after:   %s = get_attr[<routes>.conv1_weight.starts]; %f = get_attr[...fracs]
             %g = get_attr[...scale]  (the sampler's gain: a float64 scalar buffer, in state_dict)
             %w = call_function[nesc.regenerate](%pool, %s, %f, %g, [O, I, kh, kw], [bo, bi], "conv2d")
"""

from __future__ import annotations

from torch import fx, nn

from nesc.core import names
from nesc.core.modules import REGENERATE, RoutingMap, sampler_of

from .infra import NescPass, PassResult, broken_promise


class Freeze(NescPass):
    name = "freeze"

    def call(self, gm: fx.GraphModule) -> PassResult:
        sampled = [n for n in gm.graph.nodes if sampler_of(gm, n) is not None]
        if sampled and not hasattr(gm, names.ROUTES):
            gm.add_module(names.ROUTES, nn.Module())
        for node in sampled:
            _freeze_one(gm, node)
        if hasattr(gm, names.SAMPLERS):
            delattr(gm, names.SAMPLERS)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(sampled))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if sampler_of(gm, n) is not None]
        if left or hasattr(gm, names.SAMPLERS):
            raise broken_promise(self.name, f"samplers still called: {left[:5]}")


def freeze(gm: fx.GraphModule) -> PassResult:
    """``Freeze()(gm)``: the pass as a plain function."""
    return Freeze()(gm)


def _freeze_one(gm: fx.GraphModule, node: fx.Node) -> None:
    """Sampler call -> routing map buffers + one regenerate node (tied reads share one routing map)."""
    sampler = sampler_of(gm, node)
    routes = getattr(gm, names.ROUTES)
    key = node.target.rsplit(".", 1)[-1]
    if not hasattr(routes, key):
        routes.add_module(key, RoutingMap(*sampler.routing(), sampler.scale))
    g = sampler.geometry
    with gm.graph.inserting_before(node):
        starts = gm.graph.get_attr(f"{names.ROUTES}.{key}.starts")
        fracs = gm.graph.get_attr(f"{names.ROUTES}.{key}.fracs")
        scale = gm.graph.get_attr(f"{names.ROUTES}.{key}.scale")
        args = (node.args[0], starts, fracs, scale, list(g.shape), list(g.block), g.layout)
        new = gm.graph.call_function(REGENERATE, args)
    new.meta[names.SAMPLED_WEIGHT] = sampler.weight_name
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
