"""epitomize (rewrite): replace each planned weight by a sampler node reading its epitome pool.

For every weight the plan compresses, the ``get_attr`` of the dense parameter becomes a
``call_module`` of an ``EpitomeSampler`` (which owns that weight's learnable start indices, and the
transformation learner if configured) taking the pool — a parameter registered on the GraphModule —
as input. The dense parameter is deleted: from here on the weight only exists as a function of the
pool. Pools start as N(0, 1); each sampler carries a fixed gain (the dense weight's std), so pools
shared by layers of different fan-in stay well scaled. ``nesc.fitting.fit_pools`` then fits the
pools to the dense weights. Pools and samplers stay on the root, where every later stage reads
them; ``nesc.distributed.split_blocks`` moves each to the block that uses it for sharded training.

All reads of one parameter (a tied embedding and lm_head, the slices of a packed attention
projection, a weight computed from it) get one sampler call before their first use; whatever the graph
computed from the parameter (slices, weight norm, standardisation) stays after it, and a view that
merges axes (a 5-D conv3d weight sampled as 4-D) is reshaped back.

Requires: find_weights and plan_pools (``gm.meta[names.PLAN]``).
Ensures: no planned weight is left as a parameter or read through ``get_attr``; every pool of the plan
is a parameter; the graph lints; outputs are now a function of pools and start indices,
differentiable in both.

    before:  %w = get_attr[layer1.0.conv1.weight]
             %y = call_function[F.conv2d](%x, %w, None, ...)
    after:   %p = get_attr[<pool 0>]
             %w = call_module[<samplers>.layer1_0_conv1_weight](%p)      # (%p, %x) with a learner
             %y = call_function[F.conv2d](%x, %w, None, ...)
"""

from __future__ import annotations

import torch
from torch import fx, nn

from nesc.core import names
from nesc.core.config import NESConfig
from nesc.core.errors import PassOrderError, PlanError
from nesc.core.modules import EpitomeSampler, TransformationLearner
from nesc.core.sampling import Geometry

from .find_weights import WeightInfo, aliases, canonical_names, weight_nodes
from .weight_ops import lookup
from .infra import NescPass, PassResult, broken_promise, require_meta

SAMPLERS = names.SAMPLERS


class Epitomize(NescPass):
    name = "epitomize"
    needs_config = True

    def __init__(self, config: NESConfig) -> None:
        self.config = config

    def requires(self, gm: fx.GraphModule) -> None:
        require_meta(gm, names.PLAN, self.name, "passes.plan_pools")

    def call(self, gm: fx.GraphModule) -> PassResult:
        return _epitomize(gm, self.config)

    def ensures(self, gm: fx.GraphModule) -> None:
        plan = gm.meta[names.PLAN]
        params = dict(gm.named_parameters(remove_duplicate=False))
        left = [n for n in plan.layers if n in params]
        reads = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in plan.layers]
        missing = [p for p in plan.pools if p not in params]
        if left or reads or missing:
            raise broken_promise(self.name, f"planned weights still stored {left[:3]} or read {reads[:3]}, "
                                            f"pools missing {missing[:3]}")


def epitomize(gm: fx.GraphModule, config: NESConfig) -> PassResult:
    """``Epitomize(config)(gm)``: the pass as a plain function."""
    return Epitomize(config)(gm)


def _epitomize(gm: fx.GraphModule, config: NESConfig) -> PassResult:
    plan = gm.meta[names.PLAN]
    gen = torch.Generator().manual_seed(config.seed)
    for name, spec in plan.pools.items():
        if not hasattr(gm, name):
            # A pool takes the dtype and device of the weights it replaces (all members must agree).
            like = {(p.dtype, p.device) for p in (gm.get_parameter(m) for m in spec.members)}
            if len(like) != 1:
                raise PlanError(
                    f"pool {name} ({spec.label}) would serve weights of different dtypes/devices {sorted(map(str, like))}: "
                    f"{', '.join(spec.members)}; convert the model to one dtype and device, or give these layers "
                    f"separate pools (policy='per_layer' or LayerConfig(pool=...))"
                )
            dtype, device = like.pop()
            pool = torch.randn(spec.shape, generator=gen).to(dtype=dtype, device=device)
            gm.register_parameter(name, nn.Parameter(pool))
    if not hasattr(gm, SAMPLERS):
        gm.add_module(SAMPLERS, nn.Module())
    # Every read of a planned parameter is replaced by one sampler call — reads under another name of a
    # tied parameter included, so tied weights stay tied (one sampled weight, one pool).
    canonical = canonical_names(gm)
    infos = {}  # weight name -> its first WeightInfo (an op that can feed a learner first)
    op_of = {}  # get_attr node name -> the weight-bearing op it feeds (one that can feed a learner)
    for op_node in weight_nodes(gm):
        info: WeightInfo = op_node.meta[names.WEIGHT]
        feeds_learner = _learner_input(op_node) is not None
        if info.weight_name not in infos or (feeds_learner and infos[info.weight_name].op in NO_LEARNER):
            infos[info.weight_name] = info
        if info.weight_node not in op_of or (feeds_learner and _learner_input(op_of[info.weight_node]) is None):
            op_of[info.weight_node] = op_node
    reads: dict[str, list[fx.Node]] = {}  # planned weight -> its get_attr reads (several when tied)
    for node in list(gm.graph.nodes):
        name = canonical.get(node.target) if node.op == "get_attr" else None
        if name is None or name not in plan.layers:
            continue
        if not node.users:  # a read nothing uses
            gm.graph.erase_node(node)
            continue
        reads.setdefault(name, []).append(node)
    for name, nodes in reads.items():
        pool_name, geometry = plan.layers[name]
        key = _sampler_key(name)
        if not hasattr(getattr(gm, SAMPLERS), key):
            getattr(gm, SAMPLERS).add_module(key, _make_sampler(gm, infos[name], geometry, config, gen))
        # The learner reads the input of an op a read feeds; a weight no such op reads (an embedding
        # lookup), or a tied one first used before any such input exists, uses its running average.
        xs = [_learner_input(op_of[n.name]) for n in nodes if n.name in op_of] if config.learner else []
        xs = [x for x in xs if x is not None]
        _rewire(gm, nodes, pool_name, f"{SAMPLERS}.{key}", name, xs, tuple(gm.get_parameter(name).shape))
    modified = bool(reads)
    names_of = aliases(canonical)
    for name in plan.layers:
        for alias in names_of.get(name, ()):  # absent once deleted (a second run)
            _delete_param(gm, alias)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified)


def _sampler_key(weight_name: str) -> str:
    return weight_name.replace(".", "_")


def _make_sampler(gm, info: WeightInfo, geometry: Geometry, config: NESConfig, gen) -> EpitomeSampler:
    dense = gm.get_parameter(info.weight_name).detach()
    std = float(dense.float().std()) if dense.numel() > 1 else 0.0
    scale = std if std > 0 else 1.0
    learner = None
    if config.learner and info.op not in NO_LEARNER:
        in_channels = info.in_shape[0] if info.channel_dim == 1 else info.in_shape[-1]
        learner = TransformationLearner(in_channels, geometry.grid, info.channel_dim)
    return EpitomeSampler(geometry, _initial_starts(geometry, gen), scale, info.weight_name, learner,
                          tied=config.reuse)


# Ops whose input is not a feature map a transformation learner can read (indices; an einsum operand).
NO_LEARNER = ("embedding", "einsum")


def _learner_input(op_node: fx.Node) -> fx.Node | None:
    """The activation a transformation learner of ``op_node``'s weight reads, or None."""
    info: WeightInfo = op_node.meta[names.WEIGHT]
    spec = lookup(op_node)
    if info.op in NO_LEARNER or spec is None:
        return None
    x = op_node.args[spec.input] if len(op_node.args) > spec.input else None
    return x if isinstance(x, fx.Node) else None


def _initial_starts(geometry: Geometry, gen: torch.Generator) -> torch.Tensor:
    """Integer starts drawn uniformly over every valid start (``Geometry.start_max``), so blocks, and
    layers sharing a pool, begin at different windows, along channels and space alike."""
    nbo, nbi = geometry.grid
    o, i, y, x = (torch.randint(0, m + 1, (nbo, nbi), generator=gen) for m in geometry.start_max)
    return torch.stack([o, i, y, x], dim=-1).float()


def _rewire(gm, reads: list[fx.Node], pool_name: str, target: str, weight_name: str, xs: list[fx.Node],
            param_shape: tuple[int, ...]) -> None:
    """Replace the reads of one weight by one ``target(pool[, x])`` node placed before their first use
    (tied parameters: one sampled weight feeds every consumer), reshaped to ``param_shape`` where the
    sampled view merges axes (a 5-D conv3d weight). ``xs``: the inputs a learner may read."""
    graph = gm.graph
    position = _position(graph)
    first_use = min((u for r in reads for u in r.users), key=position)
    x = next((x for x in xs if position(x) < position(first_use)), None)
    if xs and x is None and len(reads) == 1:
        raise PassOrderError(
            f"cannot wire the transformation learner of {weight_name}: its input {xs[0].name} is computed "
            f"after the weight is first used ({first_use.name}); use learner=False for this model"
        )
    with graph.inserting_before(first_use):
        pool = graph.get_attr(pool_name)
        sampled = graph.call_module(target, (pool,) if x is None else (pool, x))
    sampled.meta[names.SAMPLED_WEIGHT] = weight_name
    out = sampled
    if param_shape != tuple(gm.get_submodule(target).geometry.param_shape):
        with graph.inserting_after(sampled):
            out = graph.call_function(torch.reshape, (sampled, list(param_shape)))
    for read in reads:
        read.replace_all_uses_with(out)
        graph.erase_node(read)


def _position(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index.get(n, -1)


def _delete_param(gm: fx.GraphModule, name: str) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if isinstance(getattr(owner, attr, None), nn.Parameter):
        delattr(owner, attr)
