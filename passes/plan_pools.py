"""plan_pools (analysis): decide which weights are sampled, from which pool, and how large each pool is.

Reads the ``WeightInfo``s of find_weights and a ``NESConfig``; builds the plan as a networkx graph of
layers and pools (an edge = "this layer samples from that pool") and sizes the pools so that the
whole model — pools + routing maps + everything left dense — meets the budget within 2%.

Which layers share a pool (the config's policy): ``per_layer`` each its own; ``per_type`` one per op
kind and kernel size; ``per_stage`` one per input resolution (so 3x3, 1x1 and depthwise convs of a
stage share); ``global`` one pool for all. A pool serves layers of different types: its spatial size
is the largest kernel among its members, and channel axes wrap.

Sizing lives in ``plan_sizes`` (pools + routing maps to the budget) and its block-grid search in
``plan_grid`` (shapes whose routing stays small where an even split would let it dominate); an
unreachable budget is an error that says how far the model can go and what stays dense, and why.

Requires: find_weights (``gm.meta[names.DENSE_PARAMS]``). Ensures: ``gm.meta[names.PLAN]`` (a
``PoolPlan``) whose pools are named by ``names.pool_name``; the graph is untouched. Raises
``PlanError`` when the budget cannot be met, naming what to change.

    before:  meta[names.WEIGHT] on every weight op
    after:   gm.meta[names.PLAN] = PoolPlan(pools={pool_name(0): (32, 32, 3, 3), ...},
                                            layers={"layer1.0.conv1.weight": Geometry(...)}, ...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
from torch import fx

from nesc.core import names
from nesc.core.config import Candidate, LayerConfig, NESConfig, resolve_overrides
from nesc.core.errors import PlanError
from nesc.core.modules import tensor_roles
from nesc.core.sampling import Geometry

from .find_weights import WeightInfo, weight_infos
from .infra import NescPass, PassResult, broken_promise, require_meta
from .plan_sizes import BUDGET_TOLERANCE, GROUPED, Budget, Group, check_window, geometry, size_pools

NOT_SAMPLED = "no conv/linear/matmul nesc samples reads it"


@dataclass(frozen=True)
class PoolSpec:
    name: str  # attribute name of the pool parameter on the GraphModule
    label: str  # what the pool groups, for the report ("global", "conv2d 3x3", "stage 16x16", a layer)
    shape: tuple[int, int, int, int]  # (Op, Ip, Kh, Kw)
    members: tuple[str, ...]  # weight names, in graph order

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class PoolPlan:
    pools: dict[str, PoolSpec]
    layers: dict[str, tuple[str, Geometry]]  # weight name -> (pool name, geometry)
    dense: dict[str, str]  # compressible weight left dense -> reason
    graph: nx.Graph = field(repr=False)
    dense_total: int = 0  # parameters of the dense model
    target: int = 0  # the budget, in parameters
    planned: int = 0  # what the plan stores: pools + routing maps + dense parameters
    notes: list[str] = field(default_factory=list)  # decisions the budget forced, for the report
    folded: frozenset[str] = frozenset()  # layers whose routing freeze + reuse shrinks (NESConfig.reuse)
    shared: frozenset[str] = frozenset()  # ... and whose products it shares (NESConfig(reuse="outputs"))

    @property
    def ratio(self) -> float:
        return self.dense_total / max(self.planned, 1)

    def routing_scalars(self) -> int:
        return sum(g.frozen_routing(n in self.folded, n in self.shared) for n, (_, g) in self.layers.items())

    def sharing(self, pool: str) -> list[str]:
        return [n[1] for n in self.graph.neighbors(("pool", pool))]


class PlanPools(NescPass):
    name = "plan_pools"
    needs_config = True

    def __init__(self, config: NESConfig) -> None:
        self.config = config

    def requires(self, gm: fx.GraphModule) -> None:
        require_meta(gm, names.DENSE_PARAMS, self.name, "passes.find_weights")

    def call(self, gm: fx.GraphModule) -> PassResult:
        gm.meta[names.PLAN] = _plan(gm, self.config)
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        if not isinstance(gm.meta.get(names.PLAN), PoolPlan):
            raise broken_promise(self.name, f"gm.meta[{names.PLAN!r}] is not a PoolPlan")


def plan_pools(gm: fx.GraphModule, config: NESConfig) -> PassResult:
    """``PlanPools(config)(gm)``: the pass as a plain function."""
    return PlanPools(config)(gm)


def _plan(gm: fx.GraphModule, config: NESConfig) -> PoolPlan:
    every = weight_infos(gm)
    infos = _first_per_weight(every)
    own = tensor_roles(gm)  # a second run on a transformed graph: its pools are not the dense model's
    dense_total = sum(p.numel() for n, p in gm.named_parameters() if n not in own)
    target = _target(config, dense_total)
    compress, dense, notes = _select(gm, infos, config, target, dense_total, _classifier(every))
    groups = _group(compress, config)
    fixed = dense_total - sum(i.numel for i, _ in compress)
    sampled = {i.weight_name for i, _ in compress}
    why = {p.name: p.reason for p in gm.meta[names.DENSE_PARAMS]}  # find_weights: biases, norms, max_norm tables
    parts = tuple((n, p.numel(), dense.get(n) or why.get(n, NOT_SAMPLED)) for n, p in gm.named_parameters()
                  if n not in own and n not in sampled)
    budget = Budget(target, fixed, dense_total, _asked(config, dense_total, target), parts, config.policy)
    shapes = size_pools(groups, budget)
    plan = _build(groups, shapes, dense, dense_total, target, fixed)
    plan.notes = notes + [f"pool for {g.label} kept kernel-sized despite pool_extent={g.extent}: {g.note}"
                          for g in groups if g.note]
    _check_budget(plan, config)
    return plan


def _target(config: NESConfig, dense_total: int) -> int:
    """The budget in parameters: at least one, at most the dense size (the config cannot check
    either: it does not know the model)."""
    if config.param_budget is not None:
        if config.param_budget > dense_total:
            raise PlanError(
                f"param_budget={config.param_budget:,} exceeds the dense model's {dense_total:,} "
                f"parameters, so there is nothing to compress; pass a smaller budget (or ratio > 1)"
            )
        return config.param_budget
    target = round(dense_total / config.ratio)
    if target < 1:
        raise PlanError(
            f"ratio={config.ratio:g} leaves a budget of {dense_total / config.ratio:.3g} parameters for the dense "
            f"model's {dense_total:,} (budget {target}): less than one parameter. Pass a ratio of at most "
            f"{dense_total:,} (one that leaves room for what stays dense), or param_budget=<int>."
        )
    return target


def _asked(config: NESConfig, dense_total: int, target: int) -> str:
    """What the caller asked for, for messages: ``ratio=100 (a budget of 2,000 of the dense model's
    200,000 parameters)``."""
    asked = f"ratio={config.ratio:g}" if config.param_budget is None else f"param_budget={config.param_budget:,}"
    return f"{asked} (a budget of {target:,} of the dense model's {dense_total:,} parameters)"


# keep_first / keep_classifier are preferences: a layer they keep dense is compressed after all (with a
# note) when what stays dense would take more than this share of the budget (a 1000-class head).
KEEP_DENSE_MAX_SHARE = 0.5


def _first_per_weight(infos: list[WeightInfo]) -> list[WeightInfo]:
    """A tied weight read by several ops is one weight to plan: keep its first op."""
    seen: dict[str, WeightInfo] = {}
    for info in infos:
        seen.setdefault(info.weight_name, info)
    return list(seen.values())


def _classifier(infos: list[WeightInfo]) -> str | None:
    """The weight the last weight-bearing op reads, over every read: a tied output head (GPT-2's
    ``lm_head`` reading the token embedding) makes the embedding the classifier, not the last weight
    read first."""
    return max(infos, key=lambda i: i.order).weight_name if infos else None


def _select(gm, infos: list[WeightInfo], config: NESConfig, target: int, dense_total: int,
            classifier: str | None):
    """Split weights into (info, LayerConfig | None) to compress and {name: reason} to keep dense;
    plus notes on preferences the budget overrode."""
    types = gm.meta.get(names.MODULE_TYPES, {})
    candidates = [Candidate(i.weight_name, i.module_name, types.get(i.module_name)) for i in infos]
    rules = resolve_overrides(config.overrides, candidates, types)
    first_conv = next((i.order for i in infos if i.op.startswith("conv")), None)
    compress, dense, preferred = [], {}, []
    for info in infos:
        rule = rules.get(info.weight_name)
        if rule is not None:
            key, layer_config = rule
            label = key.__name__ if isinstance(key, type) else repr(key)
            if layer_config is None:
                dense[info.weight_name] = f"override {label} -> None"
            else:
                compress.append((info, layer_config))
        elif info.numel < config.min_params:
            dense[info.weight_name] = f"small: {info.numel} < min_params={config.min_params}"
        elif config.keep_classifier and info.weight_name == classifier:
            preferred.append((info, "classifier (keep_classifier=True)"))
        elif config.keep_first and info.order == first_conv:
            preferred.append((info, "first conv (keep_first=True)"))
        else:
            compress.append((info, None))
    notes = []
    fixed = dense_total - sum(i.numel for i, _ in compress)
    for info, reason in preferred:  # classifier first: it is usually the larger of the two
        if fixed > KEEP_DENSE_MAX_SHARE * target:
            compress.append((info, None))
            fixed -= info.numel
            notes.append(
                f"{info.weight_name} compressed despite {reason.split(' (')[1][:-1]}: kept dense, what stays "
                f"dense would take {fixed + info.numel:,} of the {target:,}-parameter budget"
            )
        else:
            dense[info.weight_name] = reason
    compress.sort(key=lambda c: c[0].order)
    return compress, dense, notes


def _group_key(info: WeightInfo, layer_config: LayerConfig | None, policy: str) -> tuple[str, str]:
    """(group key, label) of the pool a layer joins."""
    if layer_config is not None and layer_config.pool is not None:
        return f"named:{layer_config.pool}", layer_config.pool
    if layer_config is not None and (layer_config.ratio or layer_config.pool_shape):
        return f"layer:{info.weight_name}", info.module_name or info.weight_name
    if policy == "per_layer":
        return f"layer:{info.weight_name}", info.module_name or info.weight_name
    if policy == "per_type":
        return f"type:{info.op}:{info.kernel}", f"{info.op} {info.kernel}"
    if policy == "per_stage":
        spatial = info.in_shape[1:] if info.channel_dim == 1 else info.in_shape[:-1]
        res = "x".join(map(str, spatial)) or "vector"
        return f"stage:{res}", f"stage {res}"
    return "global", "global"


def _group(compress, config: NESConfig) -> list[Group]:
    groups: dict[str, Group] = {}
    for info, layer_config in compress:
        key, label = _group_key(info, layer_config, config.policy)
        g = groups.setdefault(key, Group(key, label, [], extent=config.pool_extent, reuse=config.reuse))
        g.members.append((info, layer_config))
        if layer_config is not None and layer_config.pool_shape is not None:
            g.fixed_shape = layer_config.pool_shape
        elif layer_config is not None and layer_config.ratio is not None and key.startswith("layer:"):
            g.fixed_numel = max(1, round(info.numel / layer_config.ratio))
    for g in groups.values():
        if g.fixed_shape is not None:
            check_window(g, g.fixed_shape)
    return list(groups.values())


def _build(groups, shapes, dense, dense_total, target, fixed) -> PoolPlan:
    graph = nx.Graph()
    pools, layers = {}, {}
    for idx, g in enumerate(sorted(groups, key=lambda g: g.members[0][0].order)):
        name = names.pool_name(idx)
        shape = tuple(int(d) for d in shapes[g.key])
        pools[name] = PoolSpec(name, g.label, shape, tuple(i.weight_name for i, _ in g.members))
        graph.add_node(("pool", name), shape=shape, label=g.label)
        for info, _ in g.members:
            layers[info.weight_name] = (name, geometry(info, shape))
            graph.add_node(("layer", info.weight_name), op=info.op, shape=info.shape)
            graph.add_edge(("layer", info.weight_name), ("pool", name))
    for name in dense:
        graph.add_node(("layer", name), dense=dense[name])
    folded, shared = (frozenset(i.weight_name for g in groups if want(g) for i, _ in g.members if i.op not in GROUPED)
                      for want in (lambda g: bool(g.reuse), lambda g: g.reuse == "outputs"))
    plan = PoolPlan(pools, layers, dict(dense), graph, dense_total, target, folded=folded, shared=shared)
    plan.planned = fixed + sum(p.numel for p in pools.values()) + plan.routing_scalars()
    return plan


def _check_budget(plan: PoolPlan, config: NESConfig) -> None:
    if not plan.layers:
        return  # nothing to compress: the report says why for every layer
    miss = (plan.planned - plan.target) / plan.target
    if abs(miss) > BUDGET_TOLERANCE:
        pools, routing = sum(p.numel for p in plan.pools.values()), plan.routing_scalars()
        raise PlanError(
            f"the plan stores {plan.planned:,} parameters but the budget is {plan.target:,} ({miss:+.1%}, "
            f"tolerance {BUDGET_TOLERANCE:.0%}): {plan.planned - pools - routing:,} stay dense, {pools:,} are pool "
            f"elements ({len(plan.pools)} pools) and {routing:,} routing scalars; integer pool shapes (and fixed "
            f"pool_shape / per-layer ratios) cannot land closer. Adjust the ratio or the per-layer overrides.")
