"""Trainable models through ``nesc.save`` / ``nesc.load`` (format 5): the loaded model is a trainable
GraphModule whose outputs and gradients equal the original's bit for bit (CPU), which trains on exactly as
the original does, and which freezes and saves again. The reference is the original model itself."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import nesc
from nesc.core import names
from nesc.core.config import LayerConfig, NESConfig
from nesc.core.errors import ArtifactError
from nesc.core.modules import EpitomeSampler, TransformationLearner, set_sampling_width
from nesc.serialize import FORMAT_VERSION, FROZEN_VERSION, meta
from serialize_cases import SHAPE, header, relocate, trainable_model

STEPS = 3


@pytest.fixture(params=["plain", "learner"])
def pair(request, trainable_artifacts):
    """(a private copy of the original, a fresh load of its artifact), both in train mode."""
    gm, path = trainable_artifacts[request.param]
    return copy.deepcopy(gm).train(), nesc.load(path).train()


def _samplers(gm) -> dict[str, EpitomeSampler]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, EpitomeSampler)}


def _forward_backward(gm, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # dropout draws the same mask in both models
    out = gm(x)
    out.square().mean().backward()
    return out


def _assert_equal_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_it_loads_as_the_trainable_model_it_was(pair, trainable_artifacts) -> None:
    original, loaded = pair
    samplers = _samplers(loaded)
    assert samplers.keys() == _samplers(original).keys() and samplers  # same paths, real samplers
    for path, s in samplers.items():
        o = original.get_submodule(path)
        assert (s.geometry, s.tied, s.width, s.weight_name) == (o.geometry, o.tied, o.width, o.weight_name)
        assert s.starts.requires_grad and isinstance(s.starts, torch.nn.Parameter)
        assert (s.learner is None) == (o.learner is None)
        if s.learner is not None:
            assert type(s.learner) is TransformationLearner and s.learner.channel_dim == o.learner.channel_dim
    params = dict(loaded.named_parameters())
    assert params.keys() == dict(original.named_parameters()).keys()
    _assert_equal_state(original, loaded)
    for _, path in trainable_artifacts.values():
        assert header(path)["__metadata__"]["format_version"] == str(FORMAT_VERSION) == "5"


def test_outputs_and_gradients_are_bit_identical(pair) -> None:
    original, loaded = pair
    x = torch.randn(4, *SHAPE[1:])
    a, b = _forward_backward(original, x, 1), _forward_backward(loaded, x, 1)
    assert torch.equal(a, b)
    pa, pb = dict(original.named_parameters()), dict(loaded.named_parameters())
    assert all(pa[k].grad is not None for k in pa)  # every pool, start and learner weight gets a gradient
    for k in pa:
        assert torch.equal(pa[k].grad, pb[k].grad), k
    _assert_equal_state(original, loaded)  # batch-norm statistics and learners' running offsets moved alike
    with torch.no_grad():
        assert torch.equal(original.eval()(x), loaded.eval()(x))


def test_training_continues_exactly_as_on_the_original(pair) -> None:
    original, loaded = pair
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (original, loaded)]
    gen = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        x = torch.randn(4, *SHAPE[1:], generator=gen)
        for model, opt in zip((original, loaded), opts):
            opt.zero_grad()
            _forward_backward(model, x, step)
            opt.step()
    moved = [s for s in _samplers(original).values() if not torch.equal(s.starts, s.origin)]
    assert moved  # the steps changed the start indices: the comparison below covers learned starts
    _assert_equal_state(original, loaded)


def test_plan_config_and_report_come_back(pair) -> None:
    original, loaded = pair
    plan, got = original.meta[names.PLAN], loaded.meta[names.PLAN]
    assert got.pools == plan.pools and got.layers == plan.layers and got.dense == plan.dense
    assert (got.dense_total, got.target, got.planned, got.notes) == (plan.dense_total, plan.target, plan.planned,
                                                                     plan.notes)
    assert all(got.sharing(p) == plan.sharing(p) for p in plan.pools)
    assert loaded.meta[names.CONFIG] == original.meta[names.CONFIG]
    want, got = (nesc.summary(m, print_table=False).to_dict() for m in (original, loaded))
    # Dense tensors are grouped by what holds them: BatchNorm2d modules before, aten batch norms after export.
    assert sorted(got.pop("other_dense").values()) == sorted(want.pop("other_dense").values())
    assert got == want


def test_load_then_freeze_then_save(pair, tmp_path) -> None:
    original, loaded = pair
    x = torch.randn(3, *SHAPE[1:])
    frozen = nesc.freeze(loaded)
    assert not _samplers(frozen)
    with torch.no_grad():
        want = nesc.freeze(original)(x)
        assert torch.equal(frozen(x), want)
    nesc.save(frozen, tmp_path / "frozen.nesc")
    assert header(tmp_path / "frozen.nesc")["__metadata__"]["format_version"] == str(FROZEN_VERSION)
    with torch.no_grad():
        assert torch.equal(nesc.load(tmp_path / "frozen.nesc")(x), want)


def test_a_loaded_model_saves_again_to_the_same_model(pair, tmp_path) -> None:
    original, loaded = pair
    nesc.save(loaded, tmp_path / "again.nesc")
    again = nesc.load(tmp_path / "again.nesc").train()
    x = torch.randn(2, *SHAPE[1:])
    assert torch.equal(_forward_backward(again, x, 5), _forward_backward(original, x, 5))
    _assert_equal_state(original, again)


def test_pools_and_samplers_anywhere_in_the_module_tree(tmp_path) -> None:
    """Pools on submodules (as placement for sharding puts them), samplers under other parents, a path atom
    that is not an identifier, tied routing (reuse) and a sampling width above 1: all come back."""
    gm = trainable_model(reuse="inputs")
    set_sampling_width(gm, 2.0)
    moves = {"nesc_pool_0": "blocks.block1-0.pool", "nesc_samplers.conv_weight": "blocks.block1-0.sampler",
             "nesc_pool_2": "head.nesc_pool", "nesc_samplers.fc_weight": "head.deep.er.sampler"}
    relocate(gm, moves)
    nesc.save(gm, tmp_path / "moved.nesc")
    loaded = nesc.load(tmp_path / "moved.nesc").train()
    assert {"blocks.block1-0.sampler", "head.deep.er.sampler"} <= _samplers(loaded).keys()
    assert all(s.width == 2.0 and s.tied == "inputs" for s in _samplers(loaded).values())
    x = torch.randn(2, *SHAPE[1:])
    assert torch.equal(_forward_backward(loaded, x, 7), _forward_backward(gm, x, 7))
    pa, pb = dict(gm.named_parameters()), dict(loaded.named_parameters())
    assert pa.keys() == pb.keys() and "blocks.block1-0.pool" in pb
    for k in pa:
        assert torch.equal(pa[k].grad, pb[k].grad), k


def test_what_the_artifact_cannot_describe_is_refused_up_front(tmp_path) -> None:
    gm = trainable_model()
    nesc.prepare_qat(gm)
    with pytest.raises(ArtifactError, match="prepare_qat") as info:
        nesc.save(gm, tmp_path / "qat.nesc")
    assert "pool_fake_quant" in str(info.value)
    assert not (tmp_path / "qat.nesc").exists()


@pytest.mark.parametrize("config", [
    NESConfig(),
    NESConfig(ratio=8, policy="per_stage", reuse="outputs", learner=True, pool_extent=2, seed=3),
    NESConfig(ratio=None, param_budget=5000, overrides={"conv": LayerConfig(ratio=2.0), "re:fc.*": None,
                                                        "conv2": LayerConfig(pool_shape=(4, 4, 3, 3))}),
], ids=["default", "fields", "budget-and-overrides"])
def test_a_config_comes_back_equal(config) -> None:
    doc = json.loads(json.dumps(meta.encode_config(config)))  # through JSON, as the file holds it
    assert meta.decode_config(doc) == config


def test_a_config_with_a_type_keyed_rule_is_left_out() -> None:
    """A rule keyed by a module type has no JSON form: the file keeps no config (extra keeps its repr)."""
    assert meta.encode_config(NESConfig(overrides={torch.nn.Linear: None})) is None


def test_a_model_split_into_blocks_is_refused_naming_merge_blocks(tmp_path) -> None:
    """Its samplers run inside the blocks' graphs, which export would trace into plain ops: refused before
    any export; merged back, it saves and loads with the flat model's samplers."""
    from nesc.distributed import merge_blocks, split_blocks

    split = split_blocks(trainable_model())
    with pytest.raises(ArtifactError, match=r"merge_blocks") as info:
        nesc.save(split, tmp_path / "split.nesc")
    assert "conv.nesc_samplers.conv_weight" in str(info.value) and not (tmp_path / "split.nesc").exists()
    nesc.save(merge_blocks(split), tmp_path / "merged.nesc")
    assert _samplers(nesc.load(tmp_path / "merged.nesc")).keys() == _samplers(trainable_model()).keys()
