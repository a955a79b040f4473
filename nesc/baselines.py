"""Compression baselines at equal parameter count, behind one registry.

    model = build("hashed", BuildContext("resnet_fmnist", ratio=8, seed=0, example=x))
    get_method("hashed").count(model)     # what the model stores, in float32-equivalent parameters

Every method turns a registry model into a trainable ``nn.Module`` that stores ``dense / ratio``
parameters (within the method's ``tolerance``), counted by its own rule:

| method | what it is | stored count |
|---|---|---|
| ``dense`` | the model itself (ratio 1 only) | its parameters |
| ``thinner`` | the same architecture with every width scaled so it fits the budget | its parameters |
| ``wsnet`` | WSNet (Jin et al., ICML 2018): each layer samples its filters from its own condensed filter, overlapping windows at a fixed stride, input channels repeated; built on nesc's pools and samplers with fixed starts | the pools + what stays dense (a stride rule stores no index) |
| ``hashed`` | HashedNets: each weight element reads a shared bucket chosen by a hash, times a sign hash, per layer | the buckets + what is not hashed |
| ``prune`` | layer-wise magnitude pruning (``torch.nn.utils.prune``, the same kept fraction in every conv and linear weight) of a trained dense model, then fine-tuning with the mask fixed | non-zeros x (1 + ``INDEX_OVERHEAD``) + what is not pruned |
| ``nesc_fixed`` | nesc with its random initial integer start indices frozen | ``nesc.stored_params`` of the frozen model |
| ``nesc`` | nesc with learned start indices | ``nesc.stored_params`` of the frozen model |

How ``wsnet`` follows WSNet: each compressed layer has its own pool, a condensed filter ``(1, Ip, kh, L + (O - 1) S)``
(``wsnet_layer``); output filter ``n`` is its window at ``n * S`` on the filter axis (overlapping filters share
weights), input channel ``c`` reads pool channel ``c mod Ip`` (repetition ``C = I / Ip``); ``S`` and ``Ip`` follow
from one target ratio for all layers (``wsnet_plan``); the starts are that rule, never learned. It differs in: 2-D
kernels stride along kw only (the paper is 1-D); linear and 1x1 layers stride along their inputs, unrepeated; nesc's
dense layers stay dense; no integral-image reuse (computation, not accuracy). Its tolerance is 5%, not 2%: pools
grow in ``kh x K`` slabs (130 parameters for cnn1d's conv3: half of one is 1.6% of cnn1d's 8x budget).

``hashed`` needs no stored index: the bucket and sign of every element come from a seeded generator,
as HashedNets' xxhash does, so they are rebuilt from the seed and cost nothing.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize, prune

from nesc.api import fit_to_model, freeze, transform
from nesc.capture import capture
from nesc.core.config import LayerConfig, NESConfig
from nesc.core.errors import ConfigError, PlanError
from nesc.core.modules import EpitomeSampler, tensor_roles
from nesc.core.registry import Registry
from nesc.core.sampling import ROUTING_SCALARS_PER_BLOCK, Geometry
from nesc.models import get_spec
from nesc.passes import pipeline
from nesc.passes.find_weights import weight_infos
from nesc.report import stored_params

# A pruned weight stores each non-zero as its value plus a 16-bit relative index (CSR with relative
# column offsets, as in Deep Compression): half a float32 on top of the value.
INDEX_OVERHEAD = 0.5
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear)
SEARCH_STEPS = 40  # bisection steps: thinner's width multiplier, wsnet's target ratio
WSNET_PLAN = "wsnet_plan"  # gm.meta: (target ratio, {weight name: (axis, stride, pool shape)}) of a wsnet model


@dataclass(frozen=True)
class BuildContext:
    """What a method needs to build its model.

    model: a registry name. ratio: dense parameters / stored parameters (>= 1).
    seed: initial weights (and hashes) come from this seed.
    example: an example input batch ``(B >= 2, *input_shape)`` for capture.
    nes: the nesc settings (policy, min_params, keep_first, keep_classifier) shared by the nesc-based
        methods; its ratio is replaced by ``ratio``. ``min_params`` is also the hashing threshold.
    dense_state: a trained dense model's state dict (``prune`` starts from it; others ignore it).
    model_kwargs: extra factory arguments (e.g. ``width_mult``).
    """

    model: str
    ratio: float
    seed: int
    example: Tensor
    nes: NESConfig = field(default_factory=NESConfig)
    dense_state: Mapping[str, Tensor] | None = None
    model_kwargs: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ratio >= 1:
            raise ConfigError(f"BuildContext.ratio must be >= 1 (dense / stored parameters); got {self.ratio!r}")

    def dense_model(self, **kwargs) -> nn.Module:
        """A fresh model with seeded initial weights."""
        torch.manual_seed(self.seed)
        return get_spec(self.model).create(**{**self.model_kwargs, **kwargs})

    def trained_model(self) -> nn.Module:
        """The dense model with ``dense_state`` loaded when given, else ``dense_model()``."""
        model = self.dense_model()
        if self.dense_state is not None:
            model.load_state_dict(self.dense_state)
        return model

    @property
    def dense_params(self) -> int:
        return num_params(self.dense_model())

    @property
    def budget(self) -> int:
        return round(self.dense_params / self.ratio)


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[BuildContext], nn.Module]
    count: Callable[[nn.Module], int]
    tolerance: float  # relative distance of ``count`` from the budget that the method guarantees
    needs_dense_state: bool = False
    description: str = ""


METHODS: Registry[Method] = Registry("baseline method")


def register_method(method: Method) -> Method:
    METHODS.add(method.name, method)
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS.get(name)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None


def list_methods() -> list[str]:
    return METHODS.names()


def build(name: str, ctx: BuildContext) -> nn.Module:
    """Build method ``name``'s model for ``ctx`` and check that it stores the budget."""
    method = get_method(name)
    if method.needs_dense_state and ctx.dense_state is None:
        raise ConfigError(f"method {name!r} starts from a trained dense model: pass BuildContext(dense_state=...)")
    model = method.build(ctx)
    check_budget(method, model, ctx)
    return model


def check_budget(method: Method, model: nn.Module, ctx: BuildContext) -> int:
    """The model's stored count; raises ``PlanError`` when it misses the budget by more than the method's
    tolerance."""
    stored, budget = method.count(model), ctx.budget
    if abs(stored - budget) > method.tolerance * budget:
        raise PlanError(
            f"{method.name} on {ctx.model} at {ctx.ratio:g}x stores {stored:,} parameters, budget {budget:,} "
            f"({(stored - budget) / budget:+.1%}, tolerance {method.tolerance:.0%}); lower the ratio or use a larger model"
        )
    return stored


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------- dense, thin


def _dense(ctx: BuildContext) -> nn.Module:
    if ctx.ratio != 1:
        raise ConfigError(f"method 'dense' is the uncompressed model: ratio must be 1, got {ctx.ratio:g}")
    return ctx.trained_model()


def _thinner(ctx: BuildContext) -> nn.Module:
    """The width multiplier whose model is closest to the budget (bisection; parameters grow with width)."""
    budget = ctx.budget
    if "width_mult" not in _factory_args(ctx.model):
        raise ConfigError(f"method 'thinner' needs a model with a width_mult argument; {ctx.model!r} has none "
                          f"(resnet_fmnist, mobilenetv2_fmnist and cnn1d do)")
    lo, hi = 1e-3, float(ctx.model_kwargs.get("width_mult", 1.0))
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if num_params(ctx.dense_model(width_mult=mid)) > budget else (mid, hi)
    # Channel counts are integers: the best of the two widths around the budget.
    best = min((lo, hi), key=lambda w: abs(num_params(ctx.dense_model(width_mult=w)) - budget))
    return ctx.dense_model(width_mult=best)


def _factory_args(model: str) -> set[str]:
    return set(inspect.signature(get_spec(model).factory).parameters)


# ------------------------------------------------------------------------------------- nesc-based


def _nesc(ctx: BuildContext, init: str | None = None) -> fx.GraphModule:
    """nesc's transform of the seeded model, or of the trained dense model when ``ctx.dense_state`` is
    given (then ``init="dense"`` fits the pools to the trained weights)."""
    model = ctx.trained_model()
    config = ctx.nes.replace(ratio=ctx.ratio, param_budget=None, seed=ctx.seed, init=init or ctx.nes.init)
    return transform(model, (ctx.example,), config)


def _nesc_fixed(ctx: BuildContext) -> fx.GraphModule:
    gm = _nesc(ctx)
    for sampler in samplers(gm):
        sampler.starts.requires_grad_(False)  # the random initial integer starts, never learned
    return gm


def samplers(gm: nn.Module) -> list[EpitomeSampler]:
    return [m for m in gm.modules() if isinstance(m, EpitomeSampler)]


def _stored_when_frozen(model: nn.Module) -> int:
    """What the deployed model stores: the frozen copy's pools, routing maps (8 scalars per block) and
    dense parameters. The trainable GraphModule holds 4 start scalars per block instead."""
    return stored_params(freeze(model))


# -------------------------------------------------------------------------------------------- wsnet


def wsnet_layer(shape: tuple[int, int, int, int], ratio: float) -> tuple[int, int, tuple[int, int, int, int]]:
    """WSNet's sampling of a weight viewed ``(O, I, kh, kw)`` at ``ratio``: ``(axis, S, pool shape)``. The
    filter axis is kw (3), else kh (2), else (a linear or 1x1 layer) the input axis (1); ``S`` is the smallest
    stride whose filter-axis ratio ``L O / (L + (O - 1) S)`` is at most ``ratio`` (``S = L`` shares nothing),
    ``Ip`` the one whose pool is closest to ``numel / ratio`` (``I`` when the input axis is the filter axis)."""
    O, I = shape[:2]
    axis = 3 if shape[3] > 1 else 2 if shape[2] > 1 else 1
    L = shape[axis]
    stride = next(s for s in range(1, L + 1) if s == L or L * O / (L + (O - 1) * s) <= ratio)
    pool = [1, 1, *shape[2:]]
    pool[axis] = L + (O - 1) * stride
    pool[1] = I + (O - 1) * stride if axis == 1 else min(I, max(1, round(math.prod(shape) / (ratio * math.prod(pool)))))
    return axis, stride, tuple(pool)


def wsnet_plan(shapes: Mapping[str, tuple[int, int, int, int]], available: int) -> tuple[float, dict[str, tuple]]:
    """The one target ratio ``r`` of all layers (and ``wsnet_layer`` at it) whose pools add up closest to ``available``:
    about ``compressed / available``, bisected as integer strides and channels round and linear layers cap at S = 1."""
    def size(r: float) -> int:
        return sum(math.prod(wsnet_layer(shape, r)[2]) for shape in shapes.values())
    lo, hi = 1.0, float(max(2, sum(map(math.prod, shapes.values()))))  # size(1): every weight
    for _ in range(SEARCH_STEPS):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if size(mid) > available else (lo, mid)
    ratio = min((lo, hi), key=lambda r: abs(size(r) - available))
    return ratio, {name: wsnet_layer(shape, ratio) for name, shape in shapes.items()}


def wsnet_starts(geometry: Geometry, axis: int, stride: int) -> Tensor:
    """The stride rule as starts ``(O, nbi, 4)`` over the planner's blocks ``(1, bi)``: block ``(n, k)`` starts
    at ``n * S`` on the filter axis and at pool channel ``k * bi mod Ip``: channel ``c`` reads ``c mod Ip``."""
    starts = torch.zeros(*geometry.grid, 4)
    starts[..., 1] = torch.arange(starts.shape[1]) * geometry.block[1] % geometry.pool[1]
    starts[..., axis] += torch.arange(starts.shape[0])[:, None] * stride
    return starts


def _wsnet(ctx: BuildContext) -> fx.GraphModule:
    model, nes = ctx.trained_model(), ctx.nes
    found = weight_infos(pipeline.run(capture(model, (ctx.example,)), ["functionalize", "find_weights"]))
    infos = list({i.weight_name: i for i in reversed(found)}.values())[::-1]  # a tied weight once: its first op
    # nesc's rules for what stays dense (without its fallback for a first conv or classifier too large to keep)
    keep = {next((i.order for i in infos if i.op.startswith("conv")), None) if nes.keep_first else None,
            infos[-1].order if nes.keep_classifier else None}
    compress = [i for i in infos if i.numel >= nes.min_params and i.order not in keep]
    fixed = ctx.dense_params - sum(i.numel for i in compress)
    ratio, layers = wsnet_plan({i.weight_name: i.shape for i in compress}, ctx.budget - fixed)
    # nesc's planner checks its count, with routing maps (8 per block (1, min(I, Ip))) WSNet does not store
    blocks = sum(i.shape[0] * -(-i.shape[1] // min(i.shape[1], layers[i.weight_name][2][1])) for i in compress)
    planned = fixed + sum(math.prod(pool) for _, _, pool in layers.values()) + blocks * ROUTING_SCALARS_PER_BLOCK
    overrides = {i.weight_name: LayerConfig(pool_shape=layers[i.weight_name][2]) if i in compress else None for i in infos}
    gm = transform(model, (ctx.example,), nes.replace(ratio=None, param_budget=planned, policy="per_layer",
                                                      learner=False, init="random", seed=ctx.seed, overrides=overrides))
    for sampler in samplers(gm):  # the stride rule, never learned
        sampler.starts = nn.Parameter(wsnet_starts(sampler.geometry, *layers[sampler.weight_name][:2]), requires_grad=False)
        sampler.origin.copy_(sampler.starts)  # where the starts began, for the displacement metrics
    gm.meta[WSNET_PLAN] = (ratio, layers)
    if nes.init == "dense":  # fit the pools along these starts, as nesc's are fitted along its own
        fit_to_model(gm, model)
    return gm


def _wsnet_count(model: nn.Module) -> int:
    """Pools + what stays dense: a stride rule (two integers per layer) stores no index, so no starts."""
    roles = tensor_roles(model) if isinstance(model, fx.GraphModule) else {}
    return sum(p.numel() for name, p in model.named_parameters() if roles.get(name) not in ("start", "learner"))


# --------------------------------------------------------------------------------------- hashednets


class HashedWeight(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: weight = buckets[h(i)] * sign(i).

    ``h`` and ``sign`` come from a generator seeded per layer (a hash of the element index, rebuilt
    from the seed, never stored). ``right_inverse`` turns the dense initial weight into the buckets:
    its first ``buckets`` elements (times their signs), a sample of the same i.i.d. initial
    distribution, so the hashed layer starts at the dense layer's scale.
    """

    def __init__(self, shape: torch.Size, buckets: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        n = math.prod(shape)
        self.shape = tuple(shape)
        self.buckets = buckets
        self.register_buffer("index", torch.randint(0, buckets, (n,), generator=gen), persistent=False)
        self.register_buffer("sign", torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1, persistent=False)

    def forward(self, buckets: Tensor) -> Tensor:
        return (buckets[self.index] * self.sign).view(self.shape)

    def right_inverse(self, weight: Tensor) -> Tensor:
        flat = weight.detach().reshape(-1)
        return (flat[: self.buckets] * self.sign[: self.buckets]).clone()


def hashable(model: nn.Module, min_params: int) -> dict[str, nn.Module]:
    """Weight modules whose weights are hashed: conv and linear weights of at least ``min_params``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, WEIGHT_MODULES) and m.weight.numel() >= min_params}


def _hashed(ctx: BuildContext) -> nn.Module:
    model = ctx.dense_model()
    layers = hashable(model, ctx.nes.min_params)
    hashed = sum(m.weight.numel() for m in layers.values())
    available = ctx.budget - (num_params(model) - hashed)
    if available < len(layers):
        raise PlanError(f"hashed: the budget {ctx.budget:,} leaves {available:,} buckets for {len(layers)} layers "
                        f"after the parameters that are not hashed; lower the ratio or min_params")
    share = available / hashed  # every layer gets the same fraction of its size as buckets
    for index, (name, m) in enumerate(layers.items()):
        buckets = max(1, round(share * m.weight.numel()))
        parametrize.register_parametrization(m, "weight", HashedWeight(m.weight.shape, buckets,
                                                                       ctx.seed * 10_007 + index))
    return model


# ------------------------------------------------------------------------------------------ pruning


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, WEIGHT_MODULES)]


def _prune(ctx: BuildContext) -> nn.Module:
    """Layer-wise magnitude pruning: every conv and linear weight keeps the same fraction of its
    largest-magnitude elements. Global pruning (one threshold for the whole model) would empty small-
    magnitude layers such as the classifier at high ratios, and the network with them."""
    model = ctx.dense_model()
    model.load_state_dict(ctx.dense_state)
    targets = prunable(model)
    weights = sum(m.weight.numel() for m, _ in targets)
    other = num_params(model) - weights
    keep = math.floor((ctx.budget - other) / (1 + INDEX_OVERHEAD))
    if keep < len(targets):
        raise PlanError(f"prune: the budget {ctx.budget:,} leaves {max(keep, 0):,} weights for {len(targets)} layers "
                        f"after the {other:,} parameters that are not pruned; lower the ratio")
    for (m, name), kept in zip(targets, _shares([m.weight.numel() for m, _ in targets], keep)):
        prune.l1_unstructured(m, name, amount=m.weight.numel() - kept)
    return model


def _shares(sizes: list[int], total: int) -> list[int]:
    """``total`` split in proportion to ``sizes`` (largest remainders), at least 1 each."""
    exact = [total * n / sum(sizes) for n in sizes]
    shares = [max(1, math.floor(e)) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True):
        if sum(shares) >= total:
            break
        shares[i] += 1
    return shares


def _prune_count(model: nn.Module) -> int:
    """Non-zeros of pruned weights with their index overhead, plus every other parameter."""
    total = 0.0
    for name, p in model.named_parameters():
        if name.endswith("weight_orig"):
            owner = model.get_submodule(name.rpartition(".")[0])
            total += int(torch.count_nonzero(owner.weight)) * (1 + INDEX_OVERHEAD)
        else:
            total += p.numel()
    return round(total)


for _method in (
    Method("dense", _dense, num_params, 0.0, description="the uncompressed model"),
    Method("thinner", _thinner, num_params, 0.10, description="every width scaled to the budget (integer channels)"),
    Method("wsnet", _wsnet, _wsnet_count, 0.05, description="WSNet: per-layer condensed filters, fixed stride, channel repetition"),
    Method("hashed", _hashed, num_params, 0.02, description="HashedNets: hashed buckets with sign hashes, per layer"),
    Method("prune", _prune, _prune_count, 0.01, needs_dense_state=True,
           description="layer-wise magnitude pruning of the trained dense model, then fine-tuning"),
    Method("nesc_fixed", _nesc_fixed, _stored_when_frozen, 0.02, description="nesc, random start indices frozen"),
    Method("nesc", _nesc, _stored_when_frozen, 0.02, description="nesc, learned start indices"),
):
    register_method(_method)
