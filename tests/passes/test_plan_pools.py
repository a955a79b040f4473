"""passes.plan_pools (analysis): which weights are sampled from which pool, and how large each pool is.

Budgets are checked against an independent count (dense parameters left + pool elements + 8 routing
scalars per block), on every registry model and policy. Policies, thresholds, keep-dense preferences,
overrides and every error path are checked on a small model whose layers are known by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nesc
from helpers import (
    BUDGET_RTOL,
    COMPRESS_ALL,
    StageNet,
    analysed_registry,
    check_pass,
    graph_signature,
    num_params,
    stage_net_inputs,
)
from nesc import LayerConfig, NESConfig
from nesc.core import names
from nesc.core.config import POLICIES
from nesc.core.errors import ConfigError, PlanError
from nesc.models import list_models
from nesc.passes.find_weights import find_weights, weight_infos
from nesc.passes.functionalize import functionalize
from nesc.passes.plan_pools import PoolPlan, plan_pools

ROUTING_SCALARS_PER_BLOCK = 8  # int32 (o, i, y, x) + float fractions, per block, once frozen


def _stage_net_graph(model: nn.Module | None = None):
    torch.manual_seed(0)
    gm = nesc.capture(model or StageNet(), stage_net_inputs())
    functionalize(gm)
    find_weights(gm)
    return gm


def _plan(gm, **config) -> PoolPlan:
    before = graph_signature(gm)
    check_pass(plan_pools(gm, NESConfig(**config)), modified=False)
    assert graph_signature(gm) == before, "an analysis pass changed the graph"
    return gm.meta[names.PLAN]


def _independent_stored(gm, plan: PoolPlan) -> int:
    """What the plan stores, counted from the graph and the pool shapes alone."""
    dense_total = sum(p.numel() for _, p in gm.named_parameters())
    infos = {i.weight_name: i for i in weight_infos(gm)}
    compressed = sum(infos[name].numel for name in plan.layers)
    pools = sum(math.prod(spec.shape) for spec in plan.pools.values())
    blocks = 0
    for name, (pool_name, geometry) in plan.layers.items():
        O, I = infos[name].shape[:2]
        Op, Ip = plan.pools[pool_name].shape[:2]
        bo, bi = geometry.block
        assert geometry.shape == infos[name].shape and geometry.pool == plan.pools[pool_name].shape, name
        # blocks fit both the weight and the pool, and there are no more of them than pool-wide
        # blocks would need
        assert 1 <= bo <= min(O, Op) and 1 <= bi <= min(I, Ip), (name, geometry.block)
        assert math.ceil(O / bo) == math.ceil(O / min(O, Op)) and math.ceil(I / bi) == math.ceil(I / min(I, Ip)), name
        blocks += math.ceil(O / bo) * math.ceil(I / bi)
    return dense_total - compressed + pools + ROUTING_SCALARS_PER_BLOCK * blocks


def _check_plan_is_consistent(gm, plan: PoolPlan) -> None:
    infos = {i.weight_name: i for i in weight_infos(gm)}
    assert set(plan.layers) | set(plan.dense) == set(infos), "every weight is either sampled or dense"
    assert not set(plan.layers) & set(plan.dense)
    for pool_name, spec in plan.pools.items():
        assert spec.members, pool_name
        for member in spec.members:
            assert plan.layers[member][0] == pool_name
            kh, kw = infos[member].shape[2:]
            assert spec.shape[2] >= kh and spec.shape[3] >= kw, f"{pool_name} smaller than {member}'s kernel"
        assert sorted(plan.sharing(pool_name)) == sorted(spec.members), "plan graph disagrees with the pools"


# -------------------------------------------------------------------------- budgets, registry-wide


# Known planner misses, by (model, policy): the test runs and must fail (strict xfail) until fixed.
KNOWN_RATIO_4_MISSES: dict[tuple[str, str], str] = {}  # mobilenetv2_fmnist/global lands since the grid search


@pytest.mark.parametrize("name,policy", [
    pytest.param(n, p, marks=pytest.mark.xfail(raises=PlanError, strict=True, reason=KNOWN_RATIO_4_MISSES[n, p])
                 if (n, p) in KNOWN_RATIO_4_MISSES else ())
    for n in list_models() for p in POLICIES])
def test_ratio_4_met_within_2_percent(name: str, policy: str) -> None:
    gm = analysed_registry(name)
    plan = _plan(gm, ratio=4, policy=policy)
    _check_plan_is_consistent(gm, plan)
    stored = _independent_stored(gm, plan)
    target = num_params(gm) / 4
    assert plan.planned == stored
    assert abs(stored - target) <= BUDGET_RTOL * target, f"{name}/{policy}: {stored:,} vs {target:,.0f}"
    assert plan.layers, "nothing compressed"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list_models())
def test_param_budget_met_within_2_percent(name: str, policy: str) -> None:
    gm = analysed_registry(name)
    budget = num_params(gm) // 3
    plan = _plan(gm, ratio=None, param_budget=budget, policy=policy)
    stored = _independent_stored(gm, plan)
    assert plan.target == budget
    assert abs(stored - budget) <= BUDGET_RTOL * budget, f"{name}/{policy}: {stored:,} vs {budget:,}"


# ----------------------------------------------------------------------------------- policies


def _pool_members(plan: PoolPlan) -> dict[str, tuple[str, ...]]:
    return {spec.label: spec.members for spec in plan.pools.values()}


def test_per_layer_gives_every_layer_its_own_pool() -> None:
    plan = _plan(_stage_net_graph(), **COMPRESS_ALL, policy="per_layer")
    assert _pool_members(plan) == {
        "stem": ("stem.weight",),
        "conv3": ("conv3.weight",),
        "conv1": ("conv1.weight",),
        "mix": ("mix.weight",),
        "head": ("head.weight",),
    }


def test_per_type_groups_by_op_and_kernel() -> None:
    plan = _plan(_stage_net_graph(), **COMPRESS_ALL, policy="per_type")
    assert _pool_members(plan) == {
        "conv2d 3x3": ("stem.weight", "conv3.weight"),
        "conv2d 1x1": ("conv1.weight",),
        "linear 1x1": ("mix.weight", "head.weight"),
    }


@pytest.mark.parametrize("policy", ["per_stage", "global"])
def test_per_stage_and_global_share_one_pool_across_layer_types(policy: str) -> None:
    gm = _stage_net_graph()
    plan = _plan(gm, **COMPRESS_ALL, policy=policy)
    _check_plan_is_consistent(gm, plan)
    infos = {i.weight_name: i for i in weight_infos(gm)}
    shared = next(spec for spec in plan.pools.values() if "conv1.weight" in spec.members)
    kinds = {(infos[m].op, infos[m].kernel) for m in shared.members}
    assert {("conv2d", "3x3"), ("conv2d", "1x1"), ("linear", "1x1")} <= kinds, kinds
    assert shared.shape[2:] == (3, 3), "the pool's window is the largest member kernel"
    if policy == "per_stage":  # the 8x8 stage; the head reads a pooled vector
        assert _pool_members(plan) == {
            "stage 8x8": ("stem.weight", "conv3.weight", "conv1.weight", "mix.weight"),
            "stage vector": ("head.weight",),
        }
    else:
        assert len(plan.pools) == 1 and len(shared.members) == 5


# --------------------------------------------------------------------- thresholds and defaults


def test_min_params_threshold() -> None:
    gm = _stage_net_graph()  # conv1 and mix have exactly 64 * 64 = 4096 elements
    at = _plan(gm, ratio=2, min_params=4096, keep_first=False, keep_classifier=False)
    assert {"conv1.weight", "mix.weight"} <= set(at.layers)
    above = _plan(gm, ratio=2, min_params=4097, keep_first=False, keep_classifier=False)
    assert above.dense["conv1.weight"] == "small: 4096 < min_params=4097"
    assert "mix.weight" in above.dense and "conv3.weight" in above.layers


def test_first_conv_and_classifier_stay_dense_by_default_with_reasons() -> None:
    plan = _plan(analysed_registry("resnet18_cifar"), ratio=4)
    assert "first conv" in plan.dense["stem.conv.weight"] and "keep_first" in plan.dense["stem.conv.weight"]
    assert "classifier" in plan.dense["fc.weight"] and "keep_classifier" in plan.dense["fc.weight"]
    released = _plan(analysed_registry("resnet18_cifar"), ratio=4, keep_first=False, keep_classifier=False)
    assert {"stem.conv.weight", "fc.weight"} <= set(released.layers)


def test_a_tied_output_head_makes_its_embedding_the_classifier() -> None:
    """The last op reads the token embedding (a tied lm_head): keep_classifier keeps that weight, not the
    last weight read for the first time (the layer before the head)."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 64)
            self.up = nn.Linear(64, 256)
            self.down = nn.Linear(256, 64)
            self.head = nn.Linear(64, 32, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.down(torch.tanh(self.up(self.embed(ids)))))

    gm = functionalize(nesc.capture(TiedLM(), (torch.randint(0, 32, (2, 6)),))).graph_module
    find_weights(gm)
    plan = _plan(gm, ratio=1.5, min_params=0, keep_first=False)
    assert "classifier" in plan.dense["embed.weight"], plan.dense
    assert {"up.weight", "down.weight"} <= set(plan.layers)


def test_a_classifier_too_large_to_keep_is_compressed_with_a_note() -> None:
    plan = _plan(analysed_registry("mobilenetv2"), ratio=4)
    assert "classifier.1.weight" in plan.layers
    assert any("classifier.1.weight" in note and "keep_classifier" in note for note in plan.notes)


# ----------------------------------------------------------------------------------- overrides


def _label_of(plan: PoolPlan, weight: str) -> str:
    return plan.pools[plan.layers[weight][0]].label


def test_override_precedence_exact_then_regex_then_type() -> None:
    plan = _plan(
        _stage_net_graph(),
        **COMPRESS_ALL,
        overrides={
            nn.Conv2d: LayerConfig(pool="by_type"),
            "re:conv.*": LayerConfig(pool="by_regex"),
            "conv1": LayerConfig(pool="by_name"),
            "mix": None,
        },
    )
    assert _label_of(plan, "stem.weight") == "by_type"
    assert _label_of(plan, "conv3.weight") == "by_regex"
    assert _label_of(plan, "conv1.weight") == "by_name"
    assert plan.dense["mix.weight"] == "override 'mix' -> None"
    assert _label_of(plan, "head.weight") == "head", "an unmatched layer follows the policy"


def test_override_by_weight_name_and_type_none() -> None:
    plan = _plan(_stage_net_graph(), **COMPRESS_ALL, ratio=2, overrides={"conv1.weight": None, nn.Linear: None})
    assert set(plan.dense) == {"conv1.weight", "mix.weight", "head.weight"}
    assert set(plan.layers) == {"stem.weight", "conv3.weight"}
    assert "Linear" in plan.dense["head.weight"]


def test_named_pool_is_shared_across_layer_types() -> None:
    shared = LayerConfig(pool="shared")
    plan = _plan(_stage_net_graph(), **COMPRESS_ALL, overrides={"conv1": shared, "mix": shared, "conv3": shared})
    assert _pool_members(plan)["shared"] == ("conv3.weight", "conv1.weight", "mix.weight")


def test_per_layer_ratio_and_pool_shape_overrides() -> None:
    gm = _stage_net_graph()
    plan = _plan(
        gm, **COMPRESS_ALL, overrides={"conv3": LayerConfig(ratio=8.0), "conv1": LayerConfig(pool_shape=(16, 8, 3, 3))}
    )
    conv3_pool = plan.pools[plan.layers["conv3.weight"][0]]
    assert abs(conv3_pool.numel - 18432 / 8) <= BUDGET_RTOL * 18432 / 8, conv3_pool.shape
    assert plan.pools[plan.layers["conv1.weight"][0]].shape == (16, 8, 3, 3)


# -------------------------------------------------------------------------------------- errors


def _error(exc: type, **config) -> str:
    with pytest.raises(exc) as info:
        nesc.transform(StageNet(), stage_net_inputs(), init="random", **config)
    return str(info.value)


def test_ratio_below_one_is_a_config_error() -> None:
    msg = _error(nesc.ConfigError, ratio=0.5)
    assert "ratio" in msg and ">= 1" in msg and "0.5" in msg


def test_override_matching_nothing_names_the_key_and_suggests_close_names() -> None:
    msg = _error(nesc.ConfigError, overrides={"conv": LayerConfig()})
    assert "'conv'" in msg and "matches no compressible weight" in msg
    assert "did you mean" in msg and "'conv1'" in msg and "'conv3'" in msg


def test_forcing_a_module_nesc_cannot_compress_is_a_config_error() -> None:
    msg = _error(nesc.ConfigError, overrides={"bn": LayerConfig()})
    assert "'bn'" in msg and "BatchNorm2d" in msg and "remove the rule" in msg


def test_pool_shape_smaller_than_a_kernel_window_is_a_plan_error() -> None:
    msg = _error(nesc.PlanError, overrides={"conv3": LayerConfig(pool_shape=(8, 8, 1, 1))})
    assert "(8, 8, 1, 1)" in msg and "conv3" in msg  # what, where
    assert "kernel window" in msg and "3x3" in msg  # expected versus got
    assert "pool_shape=(Op, Ip, 3, 3)" in msg  # how to fix


def test_layer_ratio_so_large_the_pool_is_below_a_window_is_a_plan_error() -> None:
    msg = _error(nesc.PlanError, overrides={"conv3": LayerConfig(ratio=5000.0)})
    assert "conv3.weight" in msg and "4 parameters" in msg and "3x3 kernel window (9)" in msg
    assert "lower the ratio" in msg and "override -> None" in msg


def test_model_ratio_so_large_the_pool_is_below_a_window_is_a_plan_error() -> None:
    model = nn.Conv2d(64, 64, 3, bias=False)  # 36,864 parameters, all in one compressible weight
    with pytest.raises(nesc.PlanError) as info:
        nesc.transform(model, (torch.randn(1, 64, 5, 5),), ratio=5000, init="random", **COMPRESS_ALL)
    msg = str(info.value)
    assert "weight" in msg and "less than one 3x3 kernel window" in msg and "lower the ratio" in msg


def test_budget_spent_by_what_stays_dense_is_a_plan_error() -> None:
    msg = _error(nesc.PlanError, ratio=100)
    assert "stays dense" in msg and "lower the ratio" in msg and "keep_first=False" in msg


def test_budget_spent_by_what_stays_dense_quotes_the_ratio_and_the_sizes() -> None:
    dense = num_params(StageNet())
    msg = _error(nesc.PlanError, ratio=100)
    assert "ratio=100" in msg and f"{dense:,}" in msg and f"a budget of {round(dense / 100):,}" in msg
    assert "nothing is left for the pools" in msg


@pytest.mark.parametrize("ratio", [1e9, 1e300])
def test_a_ratio_leaving_less_than_one_parameter_is_a_plan_error(ratio: float) -> None:
    dense = num_params(StageNet())
    msg = _error(nesc.PlanError, ratio=ratio)  # was a ZeroDivisionError
    assert f"ratio={ratio:g}" in msg and f"{dense:,}" in msg and "budget 0" in msg  # what, expected vs got
    assert "less than one parameter" in msg and f"at most {dense:,}" in msg and "param_budget" in msg  # how


def test_a_budget_of_one_parameter_is_a_plan_error_not_a_crash() -> None:
    msg = _error(nesc.PlanError, ratio=None, param_budget=1)
    assert "param_budget=1 " in msg and "stays dense" in msg and "nothing is left for the pools" in msg


def test_param_budget_above_the_dense_size_is_an_error() -> None:
    dense = num_params(StageNet())
    with pytest.raises(nesc.NescError, match="param_budget"):
        nesc.transform(StageNet(), stage_net_inputs(), ratio=None, param_budget=2 * dense, init="random")


def test_plan_pools_without_weights_on_an_unfunctionalized_graph_is_a_pass_order_error() -> None:
    gm = nesc.capture(StageNet(), stage_net_inputs())
    with pytest.raises(nesc.PassOrderError, match="find_weights"):
        plan_pools(gm, NESConfig())


def test_plan_pools_without_find_weights_is_a_pass_order_error() -> None:
    gm = nesc.capture(StageNet(), stage_net_inputs())
    functionalize(gm)
    with pytest.raises(nesc.PassOrderError, match="find_weights"):
        plan_pools(gm, NESConfig())


# ----------------------------------------------------------------------------- shared weights


class CalledTwice(nn.Module):
    """One Linear applied twice (weight sharing across depth): one weight, two weight-bearing ops."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.fc(torch.relu(self.fc(x))))  # (B, 4)


def test_a_weight_used_twice_is_counted_once() -> None:
    # Found double-counted during this suite's writing (the frozen model stored 6,276 parameters for a
    # 4,420-parameter dense model at ratio 2); kept as a regression test.
    torch.manual_seed(0)
    model, x = CalledTwice(), (torch.randn(2, 64),)
    gm = nesc.transform(model, x, ratio=2, init="random", **COMPRESS_ALL)
    plan = gm.meta[names.PLAN]
    assert sorted(plan.layers) == ["fc.weight", "head.weight"]
    assert [spec.members for spec in plan.pools.values()] == [("fc.weight",), ("head.weight",)]
    frozen = nesc.freeze(gm)
    target = num_params(model) / 2
    assert nesc.stored_params(frozen) == plan.planned
    assert abs(nesc.stored_params(frozen) - target) <= BUDGET_RTOL * target, (nesc.stored_params(frozen), target)


# ------------------------------------------------------------------------ sampling along space / time


@pytest.mark.parametrize("ratio", [4, 8])
def test_pool_extent_lengthens_pools_along_wide_kernels_only_and_meets_the_budget(ratio: int) -> None:
    gm = analysed_registry("cnn1d")
    plan = _plan(gm, ratio=ratio, pool_extent=4, min_params=128, keep_classifier=False, policy="per_type")
    _check_plan_is_consistent(gm, plan)
    infos = {i.weight_name: i for i in weight_infos(gm)}
    for name, (pool_name, geometry) in plan.layers.items():
        kw = infos[name].shape[3]
        assert geometry.pool[3] == (kw + 4 if kw > 1 else 1), (name, geometry.pool)
        assert geometry.active[3] == (kw > 1), name  # blocks now move along time where the kernel is wide
    stored = _independent_stored(gm, plan)
    target = num_params(gm) / ratio
    assert abs(stored - target) <= BUDGET_RTOL * target, f"{stored:,} vs {target:,.0f}"


def test_pool_extent_is_validated() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="pool_extent"):
            NESConfig(pool_extent=bad)


def test_pool_extent_is_dropped_with_a_note_where_routing_would_dominate() -> None:
    # cnn1d at 8x with its classifier dense: longer pools would need more routing than parameters.
    gm = analysed_registry("cnn1d")
    plan = _plan(gm, ratio=8, pool_extent=4, min_params=128)
    assert all(spec.shape[3] == 3 for spec in plan.pools.values()), [s.shape for s in plan.pools.values()]
    notes = [n for n in plan.notes if "pool_extent=4" in n]
    assert len(notes) == len(plan.pools) and all("routing scalars" in n for n in notes), plan.notes


# ------------------------------------------------------------------ routing-heavy budgets (plan_grid)


class AudioEncoder(nn.Module):
    """A Whisper-like encoder: two conv1d stems, then blocks of four 64x64 projections and a 64-128-64
    MLP with layer norms, and a learned positional table added to the features (stays dense)."""

    def __init__(self, blocks: int = 2, d: int = 64) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(16, d, 3, padding=1), nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.positions = nn.Parameter(torch.randn(32, d))
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d), "o": nn.Linear(d, d),
            "fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d), "norm": nn.LayerNorm(d)}) for _ in range(blocks))

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x))).transpose(1, 2) + self.positions  # (B, 32, d)
        for b in self.blocks:
            a = torch.softmax(b["q"](h) @ b["k"](h).transpose(1, 2) / 8, -1) @ b["v"](h)
            h = b["norm"](h + b["o"](a))
            h = h + b["fc2"](torch.relu(b["fc1"](h)))
        return h


def _audio_graph():
    torch.manual_seed(0)
    gm = nesc.capture(AudioEncoder(), (torch.randn(1, 16, 64),))
    functionalize(gm)
    find_weights(gm)
    return gm


def test_the_grid_search_counts_routing_exactly_as_the_geometry_does() -> None:
    from nesc.core.sampling import Geometry
    from nesc.passes import plan_grid

    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        O, I, Op, Ip = (int(v) for v in torch.randint(1, 90, (4,), generator=gen))
        folded, shared = bool(torch.randint(2, (1,), generator=gen)), bool(torch.randint(2, (1,), generator=gen))
        nbo, nbi = math.ceil(O / min(O, Op)), math.ceil(I / min(I, Ip))
        g = Geometry((O, I, 1, 1), (Op, Ip, 1, 1), (math.ceil(O / nbo), math.ceil(I / nbi)), "linear")
        assert int(plan_grid.routing([(O, I, folded, shared)], Op, Ip)) == g.frozen_routing(folded, shared)


@pytest.mark.parametrize("ratio", [8, 9])
def test_routing_heavy_budgets_are_met_with_routing_below_the_pools(ratio: int) -> None:
    """Before the grid search, even splits drove these pools to a few channels, one block per row: at
    ratio 9 the plan stored 45,030 parameters for a budget of 9,358, most of them routing."""
    gm = _audio_graph()
    plan = _plan(gm, ratio=ratio, **COMPRESS_ALL)
    _check_plan_is_consistent(gm, plan)
    stored, target = _independent_stored(gm, plan), num_params(gm) / ratio
    assert plan.planned == stored and abs(stored - target) <= BUDGET_RTOL * target, (stored, target)
    pools = sum(math.prod(spec.shape) for spec in plan.pools.values())
    assert plan.routing_scalars() <= pools, (plan.routing_scalars(), pools)


def test_an_unreachable_ratio_says_how_far_it_can_go_and_what_took_the_budget() -> None:
    gm = _audio_graph()
    with pytest.raises(PlanError) as info:
        _plan(gm, ratio=12, **COMPRESS_ALL)
    msg = str(info.value)
    best = float(msg.split("at most ")[1].split("x")[0])
    assert 8 < best < 12 and "routing scalars" in msg and "policy='global'" in msg, msg
    # the bound is real: a ratio just below it plans, one just above does not
    _plan(gm, ratio=best * 0.9, **COMPRESS_ALL)
    with pytest.raises(PlanError):
        _plan(gm, ratio=best * 1.1, **COMPRESS_ALL)


def test_a_budget_below_what_stays_dense_names_the_biggest_dense_parameters() -> None:
    gm = _audio_graph()
    with pytest.raises(PlanError) as info:
        _plan(gm, ratio=1000, **COMPRESS_ALL)
    msg = str(info.value)
    dense = num_params(gm) - sum(i.numel for i in weight_infos(gm))
    assert f"{dense:,} of the {num_params(gm):,} parameters stay dense" in msg, msg
    assert "positions (2,048: used with activations by add, not read by a conv, linear, matmul or embedding)" in msg  # the largest, first, with find_weights' reason
    assert "nothing is left for the pools" in msg and "At most" in msg


def test_the_unreachable_budget_error_quotes_why_each_part_stays_dense() -> None:
    """The reasons find_weights gives (here: an embedding with max_norm, which renormalises its table in
    place, stays a module), not a generic one, and the best reachable ratio."""

    class Renormalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(1000, 64, max_norm=1.0)
            self.proj = nn.Linear(64, 64)

        def forward(self, ids):
            return self.proj(self.embed(ids))

    with pytest.raises(PlanError, match=r"At most 1\.06x is reachable.*embed\.weight \(64,000: inside Embedding "
                                        r"modules with max_norm"):
        nesc.transform(Renormalised(), (torch.randint(0, 1000, (2, 5)),), ratio=4, min_params=0,
                       keep_classifier=False)
