"""passes.decompose_regenerate (rewrite): every ``nesc.regenerate`` node becomes aten index arithmetic
over the pool and the routing map; outputs stay bit-identical to the frozen model's."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    COMPRESS_ALL,
    EXACT,
    F64,
    StageNet,
    assert_close,
    check_pass,
    graph_signature,
    naive_regenerate,
    regenerate_nodes,
    registry_inputs,
    run,
    stage_net_inputs,
    transformed_registry,
)
from nesc.models import list_models
from nesc.passes.decompose_regenerate import DecomposeRegenerate, decompose_regenerate
from nesc.passes.pipeline import FREEZE, PASSES, TRANSFORM
from torch import fx

import nesc
from nesc.core.errors import PassOrderError
from nesc.core.sampling import Geometry

ATEN = torch.ops.aten


def _frozen_stage_net() -> fx.GraphModule:
    torch.manual_seed(0)
    gm = nesc.transform(StageNet(), stage_net_inputs(), init="random", ratio=2, **COMPRESS_ALL)
    with torch.no_grad():  # fractional starts, so every interpolation axis is exercised
        for sampler in gm.nesc_samplers.children():
            sampler.starts.add_(torch.rand_like(sampler.starts) * 3)
    return nesc.freeze(gm)


def _attr_reads(node: fx.Node) -> set[str]:
    """Targets of the get_attr nodes that ``node`` depends on."""
    seen, stack, out = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            out.add(n.target)
        stack.extend(n.all_input_nodes)
    return out


def test_registered_as_a_named_pass_outside_the_transform_and_freeze_pipelines() -> None:
    assert PASSES.get("decompose_regenerate") is DecomposeRegenerate
    assert "decompose_regenerate" not in TRANSFORM + FREEZE


def test_no_regenerate_node_is_left_and_weights_are_gathered_from_pool_and_routing_map() -> None:
    frozen = _frozen_stage_net()
    weights = {n.meta[nesc.core.names.SAMPLED_WEIGHT]: n for n in regenerate_nodes(frozen)}
    gm = check_pass(decompose_regenerate(copy.deepcopy(frozen)), modified=True)
    assert not regenerate_nodes(gm)
    gathers = [n for n in gm.graph.nodes if n.target is ATEN.index.Tensor]
    lerps = [n for n in gm.graph.nodes if n.target is ATEN.lerp.Tensor]
    assert len(gathers) == len(weights)  # one gather per weight
    assert lerps, "no interpolation left in the graph"
    for gather in gathers:
        reads = _attr_reads(gather)
        assert any(r.startswith("nesc_pool_") for r in reads), reads
        assert any(r.startswith("nesc_routes.") and r.endswith(".starts") for r in reads), reads
    # The weight's name moves to the node that now produces it, and no tensor was added to the module.
    produced = {n.meta[nesc.core.names.SAMPLED_WEIGHT] for n in gm.graph.nodes if nesc.core.names.SAMPLED_WEIGHT in n.meta}
    assert produced == set(weights)
    assert {k for k, _ in gm.state_dict().items()} == set(frozen.state_dict())


def test_outputs_equal_the_frozen_model_bit_for_bit() -> None:
    frozen = _frozen_stage_net()
    gm = decompose_regenerate(copy.deepcopy(frozen)).graph_module
    for seed in range(2):
        x = stage_net_inputs(batch=3, seed=seed)
        assert_close(run(gm, x), run(frozen, x), EXACT, "decomposed vs frozen")


# 50-80 regenerated layers: tracing each takes ~0.1-0.2 s on one core.
SLOW = {"efficientnet_b0", "mobilenetv2"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_models()])
def test_registry_models_stay_bit_identical(name: str) -> None:
    _, gm = transformed_registry(name)
    frozen = nesc.freeze(gm)
    decomposed = check_pass(decompose_regenerate(copy.deepcopy(frozen)), modified=True)
    assert not regenerate_nodes(decomposed)
    assert_close(run(decomposed, registry_inputs(name)), run(frozen, registry_inputs(name)), EXACT, name)


def test_regenerated_weight_matches_the_element_by_element_reference() -> None:
    """Independent of the code under test: the decomposed subgraph's weight against DESIGN.md's rule."""
    g = Geometry((10, 6, 3, 3), (4, 5, 4, 5), (3, 4), "conv2d")
    torch.manual_seed(1)
    pool = torch.randn(g.pool, dtype=torch.float64)
    real = torch.rand(*g.grid, 4, dtype=torch.float64) * torch.tensor([9.0, 9.0, 1.0, 2.0])
    real[..., 2] = real[..., 2].clamp(max=1.0)
    real[..., 3] = real[..., 3].clamp(max=2.0)
    base, frac = real.floor(), real - real.floor()
    starts = base.to(torch.int32)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.nesc_pool_0 = torch.nn.Parameter(pool)
            self.register_buffer("s", starts)
            self.register_buffer("f", frac)
            self.register_buffer("g", torch.tensor(0.5, dtype=torch.float64))

    graph = fx.Graph()
    p, s, f, scale = (graph.get_attr(t) for t in ("nesc_pool_0", "s", "f", "g"))
    graph.output(graph.call_function(torch.ops.nesc.regenerate.default,
                                     (p, s, f, scale, list(g.shape), list(g.block), g.layout)))
    gm = decompose_regenerate(fx.GraphModule(Holder(), graph)).graph_module
    with torch.no_grad():
        assert_close(gm(), naive_regenerate(pool, real, 0.5, g), F64, "decomposed weight")


def test_a_graph_without_regenerate_nodes_is_left_alone() -> None:
    _, gm = transformed_registry("mlp")  # trainable: samplers, no regenerate node
    before = graph_signature(gm)
    check_pass(decompose_regenerate(gm), modified=False)
    assert graph_signature(gm) == before


def test_a_pool_that_is_not_a_get_attr_is_an_error_naming_the_node() -> None:
    frozen = _frozen_stage_net()
    node = regenerate_nodes(frozen)[0]
    with frozen.graph.inserting_before(node):
        moved = frozen.graph.call_function(torch.clone, (node.args[0],))
    node.update_arg(0, moved)
    with pytest.raises(PassOrderError, match=rf"{node.name}.*pool.*get_attr.*nesc.freeze"):
        decompose_regenerate(frozen)
