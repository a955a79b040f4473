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
    BuildContext,
    HashedWeight,
    build,
    check_budget,
    get_method,
    list_methods,
    num_params,
    samplers,
    stride_starts,
)
from nesc.core.config import NESConfig
from nesc.core.errors import ConfigError, PlanError
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


def test_wsnet_starts_follow_the_fixed_stride_and_never_train() -> None:
    model = build("wsnet", ctx(4))  # per_layer: each sampler is the only (0th of 1) layer of its pool
    for s in samplers(model):
        assert not s.starts.requires_grad
        assert torch.equal(s.starts, stride_starts(s, 0, 1))
        windows = {tuple(r.tolist()) for r in s.starts.reshape(-1, 4)}
        Op, Ip = s.geometry.pool[:2]
        assert len(windows) == min(s.geometry.num_blocks, Op * Ip)  # no two blocks read the same window


def test_fixed_starts_stay_and_learned_starts_move() -> None:
    fixed, learned = build("nesc_fixed", ctx(4)), build("nesc", ctx(4))
    x, y = ctx(4).example, torch.tensor([3, 4])
    for model in (fixed, learned):
        before = [s.starts.detach().clone() for s in samplers(model)]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        moved = [not torch.equal(b, s.starts) for b, s in zip(before, samplers(model))]
        assert all(moved) if model is learned else not any(moved)


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
