"""freeze (rewrite): turn every trainable sampler into a routing map and one ``nesc.regenerate`` node.

The learned start indices (plus, with a transformation learner, its running average offset — what
eval mode uses) are split once into int32 starts and float fractions per block and stored as buffers
of a ``RoutingMap`` under ``nesc_routes``. Samplers and learners are removed. Regeneration uses the
same function as training, so the frozen model equals the trained model in eval mode bit for bit.

Requires: epitomize. Guarantees: no EpitomeSampler is left; the module stores only pools, routing
maps (8 scalars per block) and the parameters left dense.

    before:  %w = call_module[nesc_samplers.conv1_weight](%pool)
    after:   %s = get_attr[nesc_routes.conv1_weight.starts]; %f = get_attr[...fracs]
             %w = call_function[nesc.regenerate](%pool, %s, %f, scale, [O, I, kh, kw], [bo, bi], "conv2d")
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from nesc.core import names
from nesc.core.modules import EpitomeSampler, RoutingMap

from .epitomize import SAMPLERS

ROUTES = "nesc_routes"


def freeze(gm: fx.GraphModule) -> PassResult:
    if not hasattr(gm, ROUTES):
        gm.add_module(ROUTES, nn.Module())
    routes = getattr(gm, ROUTES)
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), EpitomeSampler):
            continue
        sampler: EpitomeSampler = gm.get_submodule(node.target)
        key = node.target.rsplit(".", 1)[-1]
        if not hasattr(routes, key):
            routes.add_module(key, RoutingMap(*sampler.routing()))
        g = sampler.geometry
        with gm.graph.inserting_before(node):
            starts = gm.graph.get_attr(f"{ROUTES}.{key}.starts")
            fracs = gm.graph.get_attr(f"{ROUTES}.{key}.fracs")
            args = (node.args[0], starts, fracs, sampler.scale, list(g.shape), list(g.block), g.layout)
            new = gm.graph.call_function(torch.ops.nesc.regenerate.default, args)
        new.meta[names.SAMPLED_WEIGHT] = sampler.weight_name
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    if hasattr(gm, SAMPLERS):
        delattr(gm, SAMPLERS)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified)
