"""Baselines at equal parameter count: each is a real method, meets its budget, and counts by its rule."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import EXACT, assert_close
from torch import nn
from torch.nn import functional as F

import nesc
from nesc.baselines import (
    INDEX_OVERHEAD,
    WSNET_PLAN,
    BuildContext,
    HashedWeight,
    build,
    check_budget,
    get_method,
    list_methods,
    num_params,
    samplers,
    wsnet_layer,
)
from nesc.core import names
from nesc.core.config import NESConfig
from nesc.core.errors import ConfigError, PlanError
from nesc.core.modules import samplers_by_pool
from nesc.models import get_spec

MODEL = "cnn1d"  # 32.6K parameters, 1x40 inputs: every method builds in milliseconds
COMPRESSED = ("thinner", "wsnet", "hashed", "prune", "nesc_fixed", "nesc")


def ctx(ratio: float, **kw) -> BuildContext:
    x = get_spec(MODEL).example_inputs(2)[0]
    torch.manual_seed(0)
    dense = get_spec(MODEL).create().state_dict()
    return BuildContext(MODEL, ratio, 0, x, NESConfig(min_params=128, keep_classifier=False),
                        dense_state=dense, **kw)


def test_registry() -> None:
    assert list_methods() == sorted(["dense", *COMPRESSED])
    with pytest.raises(ConfigError, match="unknown baseline method 'magic'.*hashed"):
        get_method("magic")


@pytest.mark.parametrize("ratio", [2, 8])
@pytest.mark.parametrize("method", COMPRESSED)
def test_every_method_meets_the_budget_and_runs(method: str, ratio: float) -> None:
    c = ctx(ratio)
    model = build(method, c)
    stored = get_method(method).count(model)
    assert abs(stored - c.budget) <= get_method(method).tolerance * c.budget, (stored, c.budget)
    assert stored < c.dense_params / ratio * 1.11
    out = model(c.example)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 2])).backward()  # every method trains


def test_dense_is_the_model_at_ratio_one_only() -> None:
    model = build("dense", ctx(1))
    assert num_params(model) == ctx(1).dense_params
    with pytest.raises(ConfigError, match="ratio must be 1"):
        build("dense", ctx(2))


def test_check_budget_rejects_a_miss() -> None:
    c = ctx(4)
    with pytest.raises(PlanError, match="stores 32,618 parameters, budget 8,154"):
        check_budget(get_method("dense"), get_spec(MODEL).create(), c)


# ------------------------------------------------------------------------------------------ thinner


def test_thinner_scales_every_width() -> None:
    model = build("thinner", ctx(4))
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert all(w < d for w, d in zip(widths, (32, 64, 128)))
    assert widths[1] == pytest.approx(2 * widths[0], abs=1)


def test_thinner_needs_a_width_multiplier() -> None:
    x = get_spec("mlp").example_inputs(2)[0]
    with pytest.raises(ConfigError, match="needs a model with a width_mult"):
        build("thinner", BuildContext("mlp", 2, 0, x))


# ------------------------------------------------------------------------------------------- hashed


def test_hashed_weight_is_buckets_times_signs() -> None:
    h = HashedWeight(torch.Size([6, 5]), buckets=7, seed=3)
    buckets = torch.randn(7, requires_grad=True)
    w = h(buckets)
    expected = torch.stack([buckets[h.index[e]] * h.sign[e] for e in range(30)]).view(6, 5)
    assert_close(w, expected, EXACT, "hashed weight")
    assert set(h.sign.tolist()) == {-1.0, 1.0} and int(h.index.max()) < 7
    # Gradient of a bucket = sum of the signed gradients of the elements hashed to it.
    g = torch.randn(6, 5)
    w.backward(g)
    manual = torch.zeros(7).index_add_(0, h.index, g.flatten() * h.sign)
    torch.testing.assert_close(buckets.grad, manual)
    # Rebuilt from the seed alone: nothing about the hash is stored.
    assert torch.equal(HashedWeight(torch.Size([6, 5]), 7, 3).index, h.index)
    assert "index" not in h.state_dict()


def test_hashed_stores_only_buckets_for_hashed_layers() -> None:
    c = ctx(8)
    model = build("hashed", c)
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)) and hasattr(m, "parametrizations"):
            original = m.parametrizations.weight.original
            assert original.numel() < m.weight.numel()
            assert m.weight.shape == m.parametrizations.weight[0].shape
    assert num_params(model) == get_method("hashed").count(model)


# ------------------------------------------------------------------------------------------ pruning


def test_prune_counts_nonzeros_with_index_overhead() -> None:
    c = ctx(4)
    model = build("prune", c)
    pruned = [m for m in model.modules() if hasattr(m, "weight_mask")]
    assert pruned
    nonzero = sum(int(torch.count_nonzero(m.weight)) for m in pruned)
    other = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("weight_orig"))
    assert get_method("prune").count(model) == round(nonzero * (1 + INDEX_OVERHEAD) + other)
    # Layer-wise magnitude pruning: in every layer, the same kept fraction (to rounding), and every kept
    # weight at least as large as every pruned one.
    fractions = [m.weight_mask.mean().item() for m in pruned]
    assert max(fractions) - min(fractions) < 0.01
    for m in pruned:
        kept, dropped = m.weight_orig[m.weight_mask.bool()].abs(), m.weight_orig[~m.weight_mask.bool()].abs()
        assert kept.min() >= dropped.max()
    # Starts from the trained dense weights.
    assert torch.equal(pruned[0].weight_orig, c.dense_state[_name(model, pruned[0]) + ".weight"])


def test_prune_mask_survives_fine_tuning() -> None:
    model = build("prune", ctx(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = ctx(4).example
    before = get_method("prune").count(model)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.step()
    assert get_method("prune").count(model) <= before  # masked weights stay zero


def test_prune_needs_the_trained_dense_model() -> None:
    c = BuildContext(MODEL, 4, 0, ctx(4).example)
    with pytest.raises(ConfigError, match="starts from a trained dense model"):
        build("prune", c)


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


# --------------------------------------------------------------------------------- nesc-based methods


def test_wsnet_layer_takes_the_smallest_stride_within_the_ratio_then_the_closest_channels() -> None:
    # conv (64, 32, 3) at 4x: stride 1 already shares 3*64/66 = 2.9x; 23 of 32 channels make up the rest
    # (6144 / (4 * 66) = 23.3). At 2x stride 1 shares too much (2.9 > 2): stride 2 (1.49x), 24 channels.
    assert wsnet_layer((64, 32, 1, 3), 4.0) == (3, 1, (1, 23, 1, 66))
    assert wsnet_layer((64, 32, 1, 3), 2.0) == (3, 2, (1, 24, 1, 129))
    # linear (10, 128): the input axis is the filter axis; 1280 / (128 + 9 S) <= 4 from S = 22 on.
    assert wsnet_layer((10, 128, 1, 1), 4.0) == (1, 22, (1, 326, 1, 1))
    # conv2d 3x3 strides along kw; 1x1 along its input axis.
    assert wsnet_layer((64, 32, 3, 3), 4.0)[:2] == (3, 1) and wsnet_layer((64, 32, 3, 3), 4.0)[2][2:] == (3, 66)
    assert wsnet_layer((64, 32, 1, 1), 4.0)[0] == 1
    # Ratio 1 shares nothing: stride L, every channel, the pool as large as the weight.
    for shape in ((64, 32, 1, 3), (10, 128, 1, 1), (16, 16, 3, 3)):
        assert math.prod(wsnet_layer(shape, 1.0)[2]) == math.prod(shape)


def _wsnet_reference(pool: torch.Tensor, shape: tuple, axis: int, stride: int) -> torch.Tensor:
    """WSNet's weight, sliced straight from the pool: filter ``n`` is the window at ``n * S``, input channel
    ``c`` is pool channel ``c mod Ip`` (in the 4-D view ``(O, I, kh, kw)``)."""
    O, I, kh, kw = shape
    if axis == 1:  # linear: row n is the pool's channels n*S .. n*S + I
        return torch.stack([pool[0, n * stride : n * stride + I, 0, 0] for n in range(O)])[:, :, None, None]
    Ip = pool.shape[1]
    return torch.stack([torch.stack([pool[0, c % Ip, :kh, n * stride : n * stride + kw] for c in range(I)])
                        for n in range(O)])


@pytest.mark.parametrize("ratio", [4, 8])
def test_wsnet_samples_each_layer_from_its_own_condensed_filter(ratio: float) -> None:
    c = ctx(ratio)
    gm = build("wsnet", c)
    method = get_method("wsnet")
    assert abs(method.count(gm) - c.budget) <= method.tolerance * c.budget
    r, layers = gm.meta[WSNET_PLAN]
    assert sorted(layers) == ["conv2.0.weight", "conv3.0.weight", "fc.weight"]  # conv1: keep_first, as nesc
    for pool_name, members in samplers_by_pool(gm).items():
        assert len(members) == 1  # a pool per layer
        s, pool = members[0], gm.get_parameter(pool_name).detach()
        O, I, kh, L = s.geometry.shape
        axis, S, pool_shape = layers[s.weight_name]
        assert pool.shape == pool_shape and s.geometry.block[0] == 1  # one block per output filter
        if s.geometry.layout == "conv1d":
            Ip, K = pool.shape[1], pool.shape[3]
            assert (axis, pool.shape[0], pool.shape[2], K) == (3, 1, 1, L + (O - 1) * S)
            # The smallest stride whose filter-axis ratio is within r; Ip the closest pool to numel / r.
            assert L * O / K <= r and (S == 1 or L * O / (L + (O - 1) * (S - 1)) > r)
            assert abs(Ip * K - O * I * L / r) <= K / 2 or Ip == 1
        else:  # the classifier: the input axis as filter axis
            assert s.geometry.layout == "linear" and pool.shape == (1, I + (O - 1) * S, 1, 1) and axis == 1
        w = s(gm.get_parameter(pool_name)).detach().reshape(s.geometry.shape)
        assert_close(w, _wsnet_reference(pool, s.geometry.shape, axis, S) * s.scale, EXACT, s.weight_name)
        if axis == 3 and Ip < I:
            assert torch.equal(w[:, Ip:], w[:, : I - Ip])  # input channels repeat with period Ip
        assert not s.starts.requires_grad
    # Fitted to the trained dense weights (ctx's init is "dense"): least squares beats the zero pool.
    assert all(0 < e < 1 for e in gm.meta[names.FIT_ERRORS].values())


def test_wsnet_counts_pools_and_dense_parameters_not_starts() -> None:
    gm = build("wsnet", ctx(4))
    pools = sum(gm.get_parameter(p).numel() for p in samplers_by_pool(gm))
    sampled = sum(math.prod(s.geometry.shape) for s in samplers(gm))
    assert get_method("wsnet").count(gm) == pools + ctx(4).dense_params - sampled
    assert get_method("wsnet").count(gm) < nesc.stored_params(nesc.freeze(gm))  # nesc would add routing maps


def test_wsnet_on_a_conv2d_model_meets_the_budget() -> None:
    spec = get_spec("resnet_fmnist")
    nes = NESConfig(min_params=128, keep_classifier=False, init="random")
    c = BuildContext("resnet_fmnist", 4, 0, spec.example_inputs(2)[0], nes)
    gm = build("wsnet", c)
    assert abs(get_method("wsnet").count(gm) - c.budget) <= get_method("wsnet").tolerance * c.budget
    _, layers = gm.meta[WSNET_PLAN]
    assert len(layers) == 9  # every conv but the stem (keep_first), the downsampling 1x1s and fc
    for pool_name, (s,) in samplers_by_pool(gm).items():
        O, I, kh, kw = s.geometry.shape
        axis, S, pool_shape = layers[s.weight_name]
        assert axis == (3 if kw > 1 else 1)  # 3x3 convs stride along kw; 1x1 convs and fc along their inputs
        if axis == 3:
            assert pool_shape[2:] == (kh, kw + (O - 1) * S)
        pool = gm.get_parameter(pool_name)
        w = s(pool).detach().reshape(s.geometry.shape)
        assert_close(w, _wsnet_reference(pool.detach(), s.geometry.shape, axis, S) * s.scale, EXACT, s.weight_name)
    F.cross_entropy(gm(c.example), torch.tensor([1, 2])).backward()


def test_fixed_starts_stay_and_learned_starts_move() -> None:
    fixed, wsnet, learned = build("nesc_fixed", ctx(4)), build("wsnet", ctx(4)), build("nesc", ctx(4))
    x, y = ctx(4).example, torch.tensor([3, 4])
    for model in (fixed, wsnet, learned):
        before = [s.starts.detach().clone() for s in samplers(model)]
        opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)  # starts included
        F.cross_entropy(model(x), y).backward()
        opt.step()
        moved = [not torch.equal(b, s.starts) for b, s in zip(before, samplers(model))]
        assert all(moved) if model is learned else not any(moved)
        assert all((s.starts.grad is None) != (model is learned) for s in samplers(model))


def test_nesc_count_is_the_frozen_models() -> None:
    gm = build("nesc", ctx(4))
    assert get_method("nesc").count(gm) == nesc.stored_params(nesc.freeze(gm))


def test_nesc_from_a_trained_dense_model_fits_its_weights() -> None:
    torch.manual_seed(1)  # "trained" weights: any weights other than the seed-0 initial ones
    c = BuildContext(MODEL, 2, 0, ctx(2).example, ctx(2).nes, dense_state=get_spec(MODEL).create().state_dict())
    gm = build("nesc", c)
    scratch = build("nesc", BuildContext(MODEL, 2, 0, c.example, c.nes))
    errors = gm.meta["nesc_fit_errors"]
    assert errors and all(math.isfinite(e) for e in errors.values())
    # Pools fitted to different dense weights differ.
    assert not torch.equal(gm.nesc_pool_0, scratch.nesc_pool_0)


def test_ratio_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="ratio must be >= 1"):
        ctx(0.5)
