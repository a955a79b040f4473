"""passes.freeze (rewrite) and nesc.freeze: samplers become compact routing maps read by
``nesc.regenerate`` nodes; the frozen model equals the trained model in eval mode bit for bit and
stores pools + routing maps + what stayed dense."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nesc
from helpers import (
    BYTES_RTOL,
    COMPRESS_ALL,
    EXACT,
    ShapeBranchNet,
    StageNet,
    assert_close,
    assert_matches_eager,
    check_pass,
    dense_twin,
    graph_signature,
    regenerate_nodes,
    run,
    sampler_nodes,
    stage_net_inputs,
    transformed_registry,
)
from nesc.core import names
from nesc.core.errors import NescWarning
from nesc.passes.freeze import freeze as freeze_pass
from nesc.core.modules import EpitomeSampler, RoutingMap, TransformationLearner


def _trained(model_cls=StageNet, steps: int = 3, **config):
    """A transformed model after a few SGD steps, so its start indices are fractional."""
    torch.manual_seed(0)
    model = model_cls()
    gm = nesc.transform(model, stage_net_inputs(), **{"init": "random", "ratio": 2, **COMPRESS_ALL, **config})
    opt = torch.optim.SGD(gm.parameters(), lr=0.3)
    gm.train()
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(gm(*stage_net_inputs(seed=step)), torch.arange(4)).backward()
        opt.step()
    fractional = [s for _, s in sampler_nodes(gm) if (s.starts - s.starts.round()).abs().max() > 1e-3]
    assert fractional, "training left every start index on an integer"
    return model, gm


def test_samplers_become_regenerate_nodes_reading_routing_maps() -> None:
    _, gm = _trained()
    frozen = nesc.freeze(gm)
    frozen.graph.lint()
    assert not sampler_nodes(frozen)
    assert not any(isinstance(m, (EpitomeSampler, TransformationLearner)) for m in frozen.modules())
    nodes = regenerate_nodes(frozen)
    assert len(nodes) == 5
    for node in nodes:
        pool, starts, fracs, scale, shape, block, layout = node.args
        assert pool.target.startswith("nesc_pool") and isinstance(frozen.get_parameter(pool.target), nn.Parameter)
        s, f = frozen.get_buffer(starts.target), frozen.get_buffer(fracs.target)
        assert s.dtype == torch.int32 and f.dtype == torch.float32
        g = frozen.get_buffer(scale.target)  # the gain is state, not a graph constant
        assert g.dtype == torch.float64 and g.shape == () and scale.target in frozen.state_dict()
        nbo, nbi = math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])
        assert s.shape == f.shape == (nbo, nbi, 4)
        assert isinstance(frozen.get_submodule(starts.target.rsplit(".", 1)[0]), RoutingMap)
        assert node.meta[names.SAMPLED_WEIGHT] in {
            "stem.weight",
            "conv3.weight",
            "conv1.weight",
            "mix.weight",
            "head.weight",
        }
    assert not any(n.endswith("starts") for n, _ in frozen.named_parameters()), "start indices are still trainable"
    assert not frozen.training


def test_frozen_equals_the_trained_model_in_eval_mode_bit_for_bit() -> None:
    model, gm = _trained()
    frozen = nesc.freeze(gm)
    x = stage_net_inputs(seed=9)
    assert_close(run(frozen, x), run(gm, x), EXACT, "frozen vs trained (eval)")
    assert_matches_eager(frozen, dense_twin(frozen, model), x)  # and both are the dense computation


def test_freeze_leaves_the_trainable_model_alone() -> None:
    _, gm = _trained()
    before = graph_signature(gm)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    nesc.freeze(gm)
    assert graph_signature(gm) == before and len(sampler_nodes(gm)) == 5
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())


def test_pass_result_and_second_freeze() -> None:
    _, gm = _trained(steps=1)
    gm.eval()
    frozen = check_pass(freeze_pass(gm), modified=True)
    before = graph_signature(frozen)
    check_pass(freeze_pass(frozen), modified=False)
    assert graph_signature(frozen) == before


def test_freeze_bakes_the_learners_running_offset() -> None:
    _, gm = _trained(learner=True)
    offsets = [s.learner.running_offset.abs().sum() for _, s in sampler_nodes(gm)]
    assert all(o > 0 for o in offsets), "the learner never moved"
    frozen = nesc.freeze(gm)
    assert not any(isinstance(m, TransformationLearner) for m in frozen.modules())
    x = stage_net_inputs(seed=5)
    assert_close(run(frozen, x), run(gm, x), EXACT, "frozen vs trained-with-learner (eval)")


def test_export_captured_model_freezes_with_parity() -> None:
    _, gm = _trained(ShapeBranchNet)
    assert gm.meta[names.CAPTURE] == "export"
    frozen = nesc.freeze(gm)
    x = stage_net_inputs(seed=6)
    assert_close(run(frozen, x), run(gm, x), EXACT, "export path frozen vs trained")


def test_frozen_model_can_still_be_fine_tuned_through_its_pools() -> None:
    _, gm = _trained(steps=1)
    frozen = nesc.freeze(gm).train()
    loss = F.cross_entropy(frozen(*stage_net_inputs()), torch.arange(4))
    loss.backward()
    pools = [p for n, p in frozen.named_parameters() if n.startswith("nesc_pool")]
    assert pools and all(p.grad is not None and p.grad.abs().sum() > 0 for p in pools)


# ------------------------------------------------------------------------- size, resnet18_cifar


@pytest.fixture(scope="module")
def resnet_frozen():
    model, gm = transformed_registry("resnet18_cifar")
    return model, gm, nesc.freeze(gm)


def test_frozen_bytes_are_dense_bytes_over_the_ratio(resnet_frozen) -> None:
    model, gm, frozen = resnet_frozen
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stored = nesc.stored_bytes(frozen)
    assert abs(stored - dense_bytes / 4) <= BYTES_RTOL * dense_bytes / 4, (stored, dense_bytes / 4)
    assert nesc.stored_params(frozen) == gm.meta[names.PLAN].planned


def test_routing_maps_are_compact(resnet_frozen) -> None:
    model, gm, frozen = resnet_frozen
    routes = frozen.get_submodule("nesc_routes")
    routing_bytes = sum(b.numel() * b.element_size() for b in routes.buffers())
    replaced = sum(model.get_parameter(name).numel() * 4 for name in gm.meta[names.PLAN].layers)
    assert routing_bytes < 0.01 * replaced, f"{routing_bytes} B of routing for {replaced} B of weights"
    assert len(regenerate_nodes(frozen)) == len(list(routes.children())) == len(gm.meta[names.PLAN].layers)
    for rm in routes.children():
        # 4 int32 starts + 4 float fractions per block: 32 bytes a block, nothing per weight element
        assert rm.starts.element_size() == 4 and rm.fracs.element_size() == 4
        assert rm.starts.shape[-1] == rm.fracs.shape[-1] == 4


def test_freezing_a_model_still_sampling_with_a_wide_kernel_warns() -> None:
    _, gm = _trained()
    nesc.set_sampling_width(gm, 2.0)
    with pytest.warns(NescWarning, match="2 cells wide"):
        nesc.freeze(gm)
    nesc.set_sampling_width(gm, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NescWarning)
        nesc.freeze(gm)


@pytest.mark.parametrize("form", ["trainable", "frozen"])
def test_a_state_dict_holds_everything_that_determines_the_outputs(form) -> None:
    """A checkpoint loaded into a transform of a differently initialised model gives the trained
    model's outputs bit for bit: the gains (``scale``) are buffers, not graph constants."""
    _, trained = _trained()
    torch.manual_seed(1)
    other = nesc.transform(StageNet(), stage_net_inputs(), init="random", ratio=2, **COMPRESS_ALL)
    gains = lambda gm: {n: b for n, b in gm.named_buffers() if n.endswith(".scale")}  # noqa: E731
    assert gains(trained) and gains(trained).keys() == gains(other).keys()
    assert any(not torch.equal(a, gains(other)[n]) for n, a in gains(trained).items()), "same gains: no test"
    if form == "frozen":
        trained, other = nesc.freeze(trained), nesc.freeze(other)
        assert gains(trained)
    else:  # mid-training, the sampling kernel is wider (nesc.train.fit anneals it): state too
        nesc.set_sampling_width(trained, 2.0)
    x = stage_net_inputs(seed=9)
    assert not torch.equal(run(other, x), run(trained, x))
    other.load_state_dict(trained.state_dict())
    assert torch.equal(run(other, x), run(trained, x))
    if form == "trainable":  # and in training mode, gradients included
        for gm in (trained, other):
            gm.train().zero_grad(set_to_none=True)
            torch.manual_seed(0)
            F.cross_entropy(gm(*x), torch.arange(4)).backward()
        for (name, a), b in zip(trained.named_parameters(), other.parameters()):
            assert torch.equal(a.grad, b.grad), name
