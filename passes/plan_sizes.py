"""Pool sizing for plan_pools: pool shapes that meet the budget, routing maps counted.

``size_pools`` gives every group of layers that shares a pool a shape so that what stays dense + the
pools + their frozen routing maps meet the budget. By default the channel budget is split evenly
between Op and Ip (both shrink by about sqrt of the group's ratio); where that leaves a pool's routing
heavier than ``ROUTED_SHARE`` of its elements, or nothing for the pools at all, the block-grid search
(``plan_grid``) picks shapes that keep routing small. When even its smallest shapes do not fit, the
``PlanError`` says how far the model can go and what the budget went to (what stays dense, and why;
routing scalars). A group's extra spatial extent (``pool_extent``) is kept only while its routing stays
light.

    before:  groups of layers and a budget of 21,120 parameters (3,584 stay dense)
    after:   {group key: (Op, Ip, Kh, Kw)}, planned = 21,114 (pools 20,106 + routing 1,008 + dense)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nesc.core.config import LayerConfig
from nesc.core.errors import PlanError
from nesc.core.sampling import ROUTING_SCALARS_PER_BLOCK, Geometry

from . import plan_grid
from .find_weights import WeightInfo

# The plan must land within this fraction of the requested budget.
BUDGET_TOLERANCE = 0.02
GROUPED = ("conv2d_dw", "conv2d_group")  # ops whose channels passes.reuse cannot fold or share
# pool_extent lengthens a pool only while its routing stays below this share of its parameters (a
# longer pool has fewer channels, so more and smaller blocks).
EXTENT_MAX_ROUTING = 0.25


@dataclass
class Group:
    key: str
    label: str
    members: list[tuple[WeightInfo, LayerConfig | None]]
    fixed_shape: tuple[int, int, int, int] | None = None
    fixed_numel: int | None = None  # size set by a per-layer ratio
    extent: int = 0  # extra pool cells along every spatial axis whose kernel is wider than 1
    note: str = ""  # why the pool is kernel-sized although an extent was asked for
    reuse: bool | str = False  # NESConfig.reuse: folded (and shared) layers store less routing once frozen

    @property
    def weight_numel(self) -> int:
        return sum(i.numel for i, _ in self.members)

    @property
    def kernel(self) -> tuple[int, int]:
        return max(i.shape[2] for i, _ in self.members), max(i.shape[3] for i, _ in self.members)

    @property
    def window(self) -> tuple[int, int]:
        """The pool's spatial size: the largest kernel, plus ``extent`` along each axis wider than 1
        (WSNet's condensed filter: windows at different spatial starts overlap and share)."""
        return tuple(k + self.extent if k > 1 else k for k in self.kernel)

    @property
    def max_in(self) -> int:
        return max(i.shape[1] for i, _ in self.members)


def shape_for(g: Group, numel: float) -> tuple[int, int, int, int]:
    """A pool shape of about ``numel`` elements: spatial = ``g.window`` (the kernel itself when the
    budget cannot afford the extent); the channel budget is split between Op and Ip so both shrink
    by about sqrt of the group's channel ratio."""
    Kh, Kw = g.kernel
    if g.window != g.kernel:
        longer = _channel_split(g, numel, g.window)
        if numel < math.prod(g.window):
            g.note = "the budget cannot afford one window of the longer pool"
        elif routing_of(g, longer) > EXTENT_MAX_ROUTING * numel:
            g.note = (f"the longer pool {longer} would need {routing_of(g, longer):,} routing scalars for its "
                      f"{math.prod(longer):,} parameters")
        else:
            g.note = ""
            return longer
    if numel < Kh * Kw:
        raise PlanError(
            f"the pool for {g.label} ({', '.join(i.weight_name for i, _ in g.members[:3])}"
            f"{', ...' if len(g.members) > 3 else ''}) would hold {numel:.0f} parameters, less than one "
            f"{Kh}x{Kw} kernel window ({Kh * Kw}); lower the ratio, raise the budget, or keep these "
            f"layers dense (override -> None)")
    return _channel_split(g, numel, (Kh, Kw))


def _channel_split(g: Group, numel: float, window: tuple[int, int]) -> tuple[int, int, int, int]:
    """(Op, Ip, *window) of about ``numel`` elements, Op and Ip shrunk by ~sqrt of the channel ratio."""
    kh, kw = g.kernel
    size = math.prod(window)
    r = max(g.weight_numel * size / (kh * kw * numel), 1.0)
    Ip = min(g.max_in, max(1, round(g.max_in / math.sqrt(r))))
    Op = max(1, round(numel / (Ip * size)))
    return Op, Ip, *window


def check_window(g: Group, shape: tuple[int, int, int, int]) -> None:
    Kh, Kw = g.kernel
    if shape[2] < Kh or shape[3] < Kw:
        raise PlanError(
            f"pool_shape {shape} for {g.label} is smaller than one kernel window: its members need "
            f"at least {Kh}x{Kw} spatially; use pool_shape=(Op, Ip, {Kh}, {Kw}) or larger"
        )


def geometry(info: WeightInfo, pool_shape) -> Geometry:
    """Blocks as wide as the pool allows, then evened out: as many blocks as pool-wide ones would
    need, but equal in size, so the last block does not overhang the weight (wasted regeneration)."""
    O, I = info.shape[:2]
    nbo, nbi = -(-O // min(O, pool_shape[0])), -(-I // min(I, pool_shape[1]))
    return Geometry(info.shape, tuple(pool_shape), (-(-O // nbo), -(-I // nbi)), info.layout)


def routing_of(g: Group, shape) -> int:
    return sum(geometry(i, shape).frozen_routing(bool(g.reuse) and i.op not in GROUPED,
                                                 g.reuse == "outputs" and i.op not in GROUPED)
               for i, _ in g.members)


@dataclass(frozen=True)
class Budget:
    """What sizing needs to know about the whole model, and to say when the budget cannot be met."""
    target: int
    fixed: int  # parameters that stay dense
    dense_total: int
    asked: str  # what the caller asked for (``_asked``)
    dense_parts: tuple  # (name, parameters, reason) of everything that stays dense
    policy: str


def size_pools(groups: list[Group], b: Budget) -> dict[str, tuple]:
    """Pool shapes meeting ``b.target`` = fixed + pools + routing, as closely as integer shapes allow:
    Op and Ip shrunk evenly, or by the block-grid search (``plan_grid``) where routing would weigh."""
    shapes: dict[str, tuple] = {}
    free = []
    for g in groups:
        if g.fixed_shape is not None:
            shapes[g.key] = g.fixed_shape
        elif g.fixed_numel is not None:
            shapes[g.key] = shape_for(g, g.fixed_numel)
        else:
            free.append(g)
    if not free:
        return shapes
    taken = sum(math.prod(shapes[g.key]) + routing_of(g, shapes[g.key]) for g in groups if g.key in shapes)
    avail = b.target - b.fixed - taken  # for the free pools and their routing maps
    even = _even(free, avail) if avail > 0 else None
    heavy = [] if even is None else [g for g, s in zip(free, even) if routing_of(g, s) > ROUTED_SHARE * math.prod(s)]
    if even is not None:
        shapes.update({g.key: s for g, s in zip(free, even)})
    if heavy:  # search those pools only, within what the light ones leave
        light = sum(math.prod(shapes[g.key]) + routing_of(g, shapes[g.key]) for g in free if g not in heavy)
        try:
            shapes.update({g.key: s for g, s in zip(heavy, _searched(heavy, avail - light, taken, b))})
        except PlanError:  # not within what the light pools leave: search them all
            even = None
    if even is None:
        shapes.update({g.key: s for g, s in zip(free, _searched(free, avail, taken, b))})
    _settle(groups, free, shapes, b)
    planned = b.fixed + sum(math.prod(shapes[g.key]) + routing_of(g, shapes[g.key]) for g in groups)
    if even is not None and abs(planned - b.target) > BUDGET_TOLERANCE * b.target:
        # the even shapes cannot land (one pool at its smallest block grid): the search may
        shapes.update({g.key: s for g, s in zip(free, _searched(free, avail, taken, b))})
        _settle(groups, free, shapes, b)
    return shapes


def _settle(groups: list[Group], free: list[Group], shapes: dict, b: Budget) -> None:
    """Integer shapes miss the target a little: move the largest pools' Op one step at a time."""
    for _ in range(64):
        planned = b.fixed + sum(math.prod(shapes[g.key]) + routing_of(g, shapes[g.key]) for g in groups)
        err = b.target - planned
        if abs(err) <= 0.002 * b.target:
            break
        g = max(free, key=lambda g: math.prod(shapes[g.key]))
        Op, Ip, Kh, Kw = shapes[g.key]
        step = round(err / (Ip * Kh * Kw)) or (1 if err > 0 else -1)
        new = (max(1, Op + step), Ip, Kh, Kw)
        if new == shapes[g.key]:
            break
        shapes[g.key] = new


# Where the even split leaves a pool's routing above this share of its elements, the grid search sizes:
# pool + routing ~ N + 8 W / N is smallest where the two are equal, so a pool whose routing outweighs it
# is smaller than the cheapest one.
ROUTED_SHARE = 1.0


def _even(free: list[Group], avail: int) -> list[tuple] | None:
    """Shapes from ``avail`` shared by weight size, Op and Ip shrunk alike; routing depends on the shapes,
    so a few rounds settle it. None when the routing leaves nothing for the pools."""
    weights, routing = sum(g.weight_numel for g in free), 0
    for _ in range(3):
        if avail - routing <= 0:
            return None
        shapes = [shape_for(g, (avail - routing) * g.weight_numel / weights) for g in free]
        routing = sum(routing_of(g, s) for g, s in zip(free, shapes))
    return shapes


def _members(g: Group) -> list[tuple[int, int, bool, bool]]:
    return [(i.shape[0], i.shape[1], bool(g.reuse) and i.op not in GROUPED, g.reuse == "outputs" and i.op not in GROUPED)
            for i, _ in g.members]


def _searched(free: list[Group], avail: int, taken: int, b: Budget) -> list[tuple]:
    """Shapes whose pools + routing fit ``avail``, each pool the largest its share allows (``plan_grid``);
    raises ``PlanError`` saying what consumed the budget where even the smallest do not fit."""
    mins = [plan_grid.min_cost(_members(g), g.kernel) for g in free]
    need = sum(pool + route for pool, route, _ in mins)
    if need > avail:
        raise _spent(b, taken, need, sum(route for _, route, _ in mins))
    weights = sum(g.weight_numel for g in free)
    floor = [pool + route if pool + route > avail * g.weight_numel / weights else 0 for g, (pool, route, _) in zip(free, mins)]
    rest, rest_weights = avail - sum(floor), sum(g.weight_numel for g, f in zip(free, floor) if not f)
    shapes = []
    for g, f, (_, _, smallest) in zip(free, floor, mins):
        found = None if f else plan_grid.best_shape(_members(g), g.kernel, rest * g.weight_numel / rest_weights)
        shapes.append((*(found or smallest), *g.kernel))
        if g.window != g.kernel:
            g.note = "the block-grid search sized it: at this budget routing maps outweigh a longer pool"
    return shapes


def _spent(b: Budget, taken: int, need: int, routing: int) -> PlanError:
    """The budget cannot be met: how far the model can go, and what the budget went to."""
    best = b.dense_total / (b.fixed + taken + need)
    dense = (f"{b.fixed:,} of the {b.dense_total:,} parameters stay dense: "
             f"{plan_grid.describe_dense(list(b.dense_parts))}")
    if b.fixed + taken >= b.target:
        return PlanError(
            f"{b.asked} is already spent by what stays dense ({b.fixed:,}) and fixed pools ({taken:,}): nothing is "
            f"left for the pools; lower the ratio (raise the budget), or compress more layers (min_params, "
            f"keep_first=False, keep_classifier=False, or overrides). At most {best:.2f}x is reachable: {dense}")
    share = "" if b.policy == "global" else " share pools (policy='global': fewer, larger pools cut weights into fewer blocks),"
    return PlanError(
        f"{b.asked} cannot be met: after what stays dense ({b.fixed:,}) and fixed pools ({taken:,}), "
        f"{b.target - b.fixed - taken:,} are left, but the smallest pools with their routing maps need {need:,}, of "
        f"which {routing:,} are routing scalars ({ROUTING_SCALARS_PER_BLOCK} per block: a smaller pool cuts every weight "
        f"into more blocks), so at most {best:.2f}x is reachable. {dense}. Lower the ratio to at most {best:.2f},"
        f"{share} or keep small layers dense (min_params)")
