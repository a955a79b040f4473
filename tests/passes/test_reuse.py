"""passes.reuse: input-channel folding of frozen weights whose input columns repeat, and product maps
(outputs as copies or interpolations of one op run with the pool's rows).

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
from nesc.core.modules import EpitomeSampler, gather_products_op, product_index
from nesc.passes import pipeline
from nesc.passes.reuse import fold_channels
from nesc.report import build_report

# Registry models small enough for the fast suite, and the conv/linear families they cover.
MODELS = ["cnn1d", "mlp", "resnet_fmnist", "mobilenetv2_fmnist", "vit_tiny"]
ATTENTION = {"vit_tiny"}


def _transformed(name: str, reuse: bool | str, ratio: float = 4):
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


class WeightForms(torch.nn.Module):
    """A padding="same" conv (folds like any conv), a weight computed after its sampler, a transposed
    conv, a tied embedding + head (read by two ops) and an einsum: the last four are kept, each with
    its reason."""

    def __init__(self) -> None:
        super().__init__()
        self.same = torch.nn.Conv2d(48, 32, 3, padding="same")
        self.std = torch.nn.Parameter(torch.randn(32, 32, 1, 1))
        self.up = torch.nn.ConvTranspose2d(32, 32, 2, stride=2)
        self.embed = torch.nn.Embedding(40, 32)
        self.head = torch.nn.Linear(32, 40, bias=False)
        self.head.weight = self.embed.weight
        self.mix = torch.nn.Parameter(torch.randn(32, 32) * 0.2)

    def forward(self, x, ids):
        h = self.same(x)
        h = torch.nn.functional.conv2d(h, self.std - self.std.mean((1, 2, 3), keepdim=True))
        h = self.up(h).mean((2, 3))  # (B, 32)
        h = torch.einsum("bi,io->bo", h + self.embed(ids).mean(1), self.mix)
        return self.head(h)


def test_weight_forms_fold_where_exact_and_say_why_they_are_kept() -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 48, 6, 6), torch.randint(0, 40, (2, 5)))
    gm = nesc.transform(WeightForms().eval(), x, NESConfig(ratio=2, min_params=0, keep_first=False,
                                                           keep_classifier=False, reuse=True, init="random"))
    frozen = nesc.freeze(gm)
    decisions = frozen.meta[names.REUSE]
    assert decisions["same.weight"].startswith("folded"), decisions
    assert decisions["std"] == "kept: the weight reaches the op through another op"
    assert decisions["up.weight"] == "kept: conv_transpose2d is not a conv, linear or matmul"
    assert decisions["embed.weight"] == "kept: the weight is read by several ops"  # the lookup and the head
    assert decisions["mix"] == "kept: einsum is not a conv, linear or matmul"
    assert_close(frozen(*x), _frozen_without_reuse(gm)(*x), CLOSE, "folded vs unfolded frozen model")
    assert_close(frozen(*x), gm.eval()(*x), CLOSE, "folded frozen vs trained model in eval mode")


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


@pytest.mark.parametrize("name, reuse", [("cnn1d", True), ("resnet_fmnist", "outputs")], ids=["folded", "shared"])
def test_rewritten_model_saves_and_loads_with_the_same_outputs_and_counts(tmp_path, name: str, reuse) -> None:
    _, gm = _trained(name, reuse) if reuse == "outputs" else _transformed(name, reuse)
    frozen = nesc.freeze(gm)
    nesc.save(frozen, tmp_path / "m.nesc")
    loaded = nesc.load(tmp_path / "m.nesc")
    x = registry_inputs(name, 4)
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


def _trained(name: str, reuse: bool | str, steps: int = 3):
    """A transformed model after a few optimizer steps: its output-channel starts are fractional."""
    model, gm = _transformed(name, reuse)
    opt = torch.optim.Adam(gm.parameters(), lr=0.05)
    x = registry_inputs(name, 8)
    gm.train()
    for _ in range(steps):
        opt.zero_grad()
        gm(*x).square().mean().backward()
        opt.step()
    return model, gm.eval()


@pytest.mark.parametrize("name", MODELS)
def test_shared_products_are_exact_and_the_counts_match_the_flop_counter(name: str) -> None:
    model, gm = _trained(name, reuse="outputs")
    reference = _frozen_without_reuse(gm)
    frozen = nesc.freeze(gm)
    x = registry_inputs(name, 4)
    assert_close(frozen(*x), reference(*x), CLOSE, f"{name}: product maps vs the unrewritten frozen model")
    decisions = frozen.meta[names.REUSE]
    assert any("shared:" in d for d in decisions.values()), decisions
    maps = {k: m for k, m in frozen.nesc_routes.named_children() if k.endswith("_products")}
    assert maps and any(bool((m.fracs != 0).any()) for m in maps.values()), "trained rows interpolate products"
    one = tuple(t[:1] for t in x)
    report = build_report(frozen)
    if name not in ATTENTION:
        assert report.madd == _flop_madd(frozen, one), name
    assert report.madd < build_report(_frozen_without_reuse(_transformed(name, reuse="inputs")[1])).madd
    assert report.dense_params == build_report(reference).dense_params
    assert report.adds > 0 and report.stored_params == nesc.stored_params(frozen)


def test_four_x_with_shared_products_cuts_more_than_half_of_the_dense_multiply_adds() -> None:
    for name in ("resnet_fmnist", "mobilenetv2_fmnist"):
        model, gm = _transformed(name, reuse="outputs")
        one = registry_inputs(name, 1)
        dense, shared = _flop_madd(model, one), _flop_madd(nesc.freeze(gm), one)
        assert shared <= 0.5 * dense, f"{name}: {shared:,} vs dense {dense:,}"


def test_tied_outputs_share_one_input_routing_across_rows_while_output_starts_learn() -> None:
    _, gm = _trained("cnn1d", reuse="outputs")
    for s in (m for m in gm.modules() if isinstance(m, EpitomeSampler)):
        eff = s.effective_starts().detach()
        assert torch.equal(eff[..., 1:], eff[:1, :, 1:].expand_as(eff[..., 1:])), s.weight_name
        assert bool((s.starts[:, 0, 0] != s.origin[:, 0, 0]).any()), f"{s.weight_name}: output starts learn"
    decisions = nesc.freeze(gm).meta[names.REUSE]
    assert all("shared: " in d for d in decisions.values()), decisions


def test_rows_with_their_own_input_routing_keep_their_outputs_and_say_why() -> None:
    _, gm = _trained("resnet_fmnist", reuse=False)
    decisions = nesc.freeze(gm).meta[names.REUSE]
    assert not any("shared:" in d for d in decisions.values())
    assert any("pool rows" in d for d in decisions.values()), decisions


def test_a_frozen_model_with_shared_products_fine_tunes_like_the_unrewritten_one() -> None:
    _, gm = _trained("cnn1d", reuse="outputs")
    frozen, reference = nesc.freeze(gm).train(), _frozen_without_reuse(gm).train()
    x = registry_inputs("cnn1d", 4)
    for model in (frozen, reference):
        torch.manual_seed(0)  # the same dropout masks in both
        model(*x).square().mean().backward()
    got, want = dict(frozen.named_parameters()), dict(reference.named_parameters())
    for name, p in want.items():  # pools and dense weights: the same gradients through either graph
        assert_close(got[name].grad, p.grad, CLOSE, name)


def _gather_reference(products, starts, fracs, bias, dim, channels, block, rows):
    """``nesc.gather_products`` channel by channel, as its docstring states it."""
    outs = []
    for c in range(channels):
        g, o = (int(v) for v in starts[c // block])
        step = 1 if rows > 1 else 0
        lo, hi = g * rows + (o + c % block) % rows, g * rows + (o + c % block + step) % rows
        f = float(fracs[c // block])
        y = (1 - f) * products.select(dim, lo) + f * products.select(dim, hi)
        outs.append(y + (0 if bias is None else bias[c]))
    return torch.stack(outs, dim)


@pytest.mark.parametrize("shape,dim,channels,block,rows", [((2, 6, 3, 3), 1, 10, 3, 3), ((4, 8), -1, 16, 4, 4),
                                                           ((2, 4, 5), 1, 7, 1, 1), ((3, 5, 6), -1, 9, 2, 3)])
def test_gather_products_matches_its_definition_and_its_gradients_check(shape, dim, channels, block, rows) -> None:
    torch.manual_seed(0)
    groups = shape[dim] // rows
    nrows = -(-channels // block)
    starts = torch.stack([torch.randint(0, groups, (nrows,)), torch.randint(0, rows, (nrows,))], 1).int()
    fracs = torch.rand(nrows, dtype=torch.float64)
    products = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    fr = fracs.clone().requires_grad_(True)
    out = gather_products_op(products, starts, fr, bias, dim, channels, block, rows)
    assert_close(out, _gather_reference(products, starts, fracs, bias, dim % len(shape), channels, block, rows),
                 CLOSE, "definition")
    assert product_index(starts, channels, block, rows).max() < shape[dim]
    assert torch.autograd.gradcheck(lambda p, f, b: gather_products_op(p, starts, f, b, dim, channels, block, rows),
                                    (products, fr, bias))


@pytest.mark.parametrize("ratio", [4, 8])
@pytest.mark.parametrize("name", ["cnn1d", "resnet_fmnist", "mobilenetv2_fmnist"])
def test_the_plan_counts_the_product_maps_so_the_frozen_model_meets_the_budget(name: str, ratio: int) -> None:
    model = registry_model(name)
    gm = nesc.transform(model, registry_inputs(name), NESConfig(ratio=ratio, min_params=128, reuse="outputs",
                                                                 keep_classifier=False, policy="per_type", init="random"))
    stored = nesc.stored_params(nesc.freeze(gm))
    target = sum(p.numel() for p in model.parameters()) / ratio
    assert abs(stored - target) <= BUDGET_RTOL * target, f"{name} {ratio}x: {stored:,} vs {target:,.0f}"
