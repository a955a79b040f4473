"""passes.reuse: input-channel folding of frozen weights whose input columns repeat.

References are independent of the pass: the same frozen model without it (freeze + find_weights
only), eager PyTorch, ``torch.utils.flop_counter.FlopCounterMode`` for the multiply-adds the
rewritten graph executes, and an explicit loop for the fold.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nesc
from helpers import BUDGET_RTOL, CLOSE, assert_close, registry_inputs, registry_model
from nesc import NESConfig
from nesc.core import names
from nesc.core.modules import EpitomeSampler
from nesc.passes import pipeline
from nesc.passes.reuse import fold_channels
from nesc.report import build_report

# Registry models small enough for the fast suite, and the conv/linear families they cover.
MODELS = ["cnn1d", "mlp", "resnet_fmnist", "mobilenetv2_fmnist", "vit_tiny"]
ATTENTION = {"vit_tiny"}


def _transformed(name: str, reuse: bool, ratio: float = 4):
    model = registry_model(name).eval()
    return model, nesc.transform(model, registry_inputs(name), NESConfig(ratio=ratio, min_params=128, reuse=reuse,
                                                                           init="random"))


def _frozen_without_reuse(gm):
    frozen = copy.deepcopy(gm).eval()
    frozen.meta = copy.copy(gm.meta)
    return pipeline.run(frozen, ["freeze", "find_weights"])


def _flop_madd(model, inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2  # a multiply-add is two flops


@pytest.mark.parametrize("name", MODELS)
def test_reuse_is_exact_and_cuts_the_multiply_adds_flop_counter_counts(name: str) -> None:
    _, gm = _transformed(name, reuse=True)
    reference = _frozen_without_reuse(gm)
    frozen = nesc.freeze(gm)
    x = registry_inputs(name, 4)
    assert_close(frozen(*x), reference(*x), CLOSE, f"{name}: folded vs unfolded frozen model")
    assert_close(frozen(*x), gm.eval()(*x), CLOSE, f"{name}: folded frozen vs trained model in eval mode")
    decisions = frozen.meta[names.REUSE]
    assert any(d.startswith("folded") for d in decisions.values()), decisions
    # The report counts what the rewritten graph runs, as torch's own counter does (per example); the
    # counter also counts attention's activation-by-activation matmuls, which hold no weight: there,
    # the saving must agree.
    one = tuple(t[:1] for t in x)
    saved = _flop_madd(reference, one) - _flop_madd(frozen, one)
    assert saved > 0 and saved == build_report(reference).madd - build_report(frozen).madd, name
    if name not in ATTENTION:
        assert build_report(frozen).madd == _flop_madd(frozen, one), name
    # The report still counts the dense model's parameters (a folded weight had I, not Ip, inputs).
    assert build_report(frozen).dense_params == build_report(reference).dense_params


def test_four_x_cuts_a_quarter_of_the_dense_multiply_adds_on_resnet_and_mobilenet() -> None:
    for name in ("resnet_fmnist", "mobilenetv2_fmnist"):
        model, gm = _transformed(name, reuse=True)
        frozen = nesc.freeze(gm)
        one = registry_inputs(name, 1)
        dense, folded = _flop_madd(model, one), _flop_madd(frozen, one)
        assert folded <= 0.75 * dense, f"{name}: {folded:,} vs dense {dense:,}"


def test_without_the_option_nothing_folds_and_every_layer_says_why() -> None:
    _, gm = _transformed("resnet_fmnist", reuse=False)
    frozen = nesc.freeze(gm)
    decisions = frozen.meta[names.REUSE]
    assert decisions and not any(d.startswith("folded") for d in decisions.values())
    assert all(d.startswith("kept: ") for d in decisions.values())
    assert any("do not repeat" in d for d in decisions.values())
    x = registry_inputs("resnet_fmnist", 4)
    assert torch.equal(frozen(*x), _frozen_without_reuse(gm)(*x))


def test_grouped_convs_are_left_alone_with_their_reason() -> None:
    _, gm = _transformed("mobilenetv2_fmnist", reuse=True)
    decisions = nesc.freeze(gm).meta[names.REUSE]
    grouped = [d for d in decisions.values() if "grouped" in d]
    assert grouped, decisions


def test_folding_holds_for_any_pool_values() -> None:
    # The condition is structural (the routing map), so fine-tuned pools keep the folded graph exact.
    _, gm = _transformed("cnn1d", reuse=True)
    frozen = nesc.freeze(gm)
    reference = _frozen_without_reuse(gm)
    with torch.no_grad():
        for (name, p), (_, q) in zip(sorted(frozen.named_parameters()), sorted(reference.named_parameters())):
            if name.startswith(names.POOL_PREFIX):
                p.copy_(torch.randn_like(p))
                q.copy_(p)
    x = registry_inputs("cnn1d", 4)
    assert_close(frozen(*x), reference(*x), CLOSE, "after changing the pools")


def test_folded_model_saves_and_loads_with_the_same_outputs_and_counts(tmp_path) -> None:
    _, gm = _transformed("cnn1d", reuse=True)
    frozen = nesc.freeze(gm)
    nesc.save(frozen, tmp_path / "m.nesc")
    loaded = nesc.load(tmp_path / "m.nesc")
    x = registry_inputs("cnn1d", 4)
    assert_close(loaded(*x), frozen(*x), CLOSE, "loaded")
    a, b = build_report(frozen), build_report(loaded)
    assert (a.madd, a.adds, a.dense_params, a.stored_params) == (b.madd, b.adds, b.dense_params, b.stored_params)
    assert a.adds > 0 and [r.reason for r in a.rows] == [r.reason for r in b.rows]


def test_tied_starts_train_but_keep_the_rows_periodic() -> None:
    _, gm = _transformed("cnn1d", reuse=True)
    opt = torch.optim.Adam(gm.parameters(), lr=0.05)
    x = registry_inputs("cnn1d", 8)
    gm.train()
    for _ in range(3):
        opt.zero_grad()
        gm(*x).square().mean().backward()
        opt.step()
    samplers = [m for m in gm.modules() if isinstance(m, EpitomeSampler)]
    moved = False
    for s in samplers:
        eff = s.effective_starts().detach()
        assert torch.equal(eff[..., 1], eff[..., 1].round()), "input starts stay integers"
        assert torch.equal(eff[..., [0, 2, 3]], eff[:, :1, [0, 2, 3]].expand_as(eff[..., [0, 2, 3]]))
        moved |= bool((s.starts[:, 0, 0] != s.origin[:, 0, 0]).any())
    assert moved, "the output-channel starts learn"
    assert all(d.startswith("folded") for d in nesc.freeze(gm).meta[names.REUSE].values())


@pytest.mark.parametrize("shape,dim,period", [((2, 7, 5), 1, 3), ((2, 8, 3, 3), 1, 4), ((3, 10), -1, 4), ((2, 4, 9), -1, 9)])
def test_fold_channels_sums_channels_equal_modulo_the_period(shape, dim, period) -> None:
    x = torch.randn(shape)
    out = fold_channels(x, period, dim)
    d = dim % x.dim()
    expected = torch.stack([sum(x.select(d, i) for i in range(c, x.shape[d], period)) for c in range(period)], d)
    assert_close(out, expected, CLOSE, f"{shape} period {period}")


@pytest.mark.parametrize("ratio", [4, 8])
@pytest.mark.parametrize("name", ["cnn1d", "resnet_fmnist", "mobilenetv2_fmnist"])
def test_the_plan_counts_the_routing_reuse_keeps_so_the_frozen_model_meets_the_budget(name: str, ratio: int) -> None:
    model = registry_model(name)
    gm = nesc.transform(model, registry_inputs(name), NESConfig(ratio=ratio, min_params=128, reuse=True,
                                                                 keep_classifier=False, policy="per_type", init="random"))
    stored = nesc.stored_params(nesc.freeze(gm))
    target = sum(p.numel() for p in model.parameters()) / ratio
    assert abs(stored - target) <= BUDGET_RTOL * target, f"{name} {ratio}x: {stored:,} vs {target:,.0f}"
