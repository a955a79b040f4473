"""Compression baselines at equal parameter count, behind one registry.

    model = build("hashed", BuildContext("resnet_fmnist", ratio=8, seed=0, example=x))
    get_method("hashed").count(model)     # what the model stores, in float32-equivalent parameters

Every method turns a registry model into a trainable ``nn.Module`` that stores ``dense / ratio``
parameters (within the method's ``tolerance``), counted by its own rule:

| method | what it is | stored count |
|---|---|---|
| ``dense`` | the model itself (ratio 1 only) | its parameters |
| ``thinner`` | the same architecture with every width scaled so it fits the budget | its parameters |
| ``wsnet`` | WSNet-style fixed sampling: nesc's pools and sampler with start indices fixed to a hand-crafted stride pattern, never learned | ``nesc.stored_params`` of the frozen model |
| ``hashed`` | HashedNets: each weight element reads a shared bucket chosen by a hash, times a sign hash, per layer | the buckets + what is not hashed |
| ``prune`` | layer-wise magnitude pruning (``torch.nn.utils.prune``, the same kept fraction in every conv and linear weight) of a trained dense model, then fine-tuning with the mask fixed | non-zeros x (1 + ``INDEX_OVERHEAD``) + what is not pruned |
| ``nesc_fixed`` | nesc with its random initial integer start indices frozen | ``nesc.stored_params`` of the frozen model |
| ``nesc`` | nesc with learned start indices | ``nesc.stored_params`` of the frozen model |

How ``wsnet`` differs from the paper's WSNet (Jin et al., ICML 2018): WSNet samples each layer's
filters from that layer's own condensed filter, with overlapping windows at a fixed stride along the
spatial and channel axes, and adds integral-image computation reuse. Here the windows are nesc's
(channel blocks over a pool planned by ``NESConfig``, wrap-around for channel repetition) and the
stride is fixed (``stride_starts``): consecutive output blocks start a fixed number of pool rows
apart, wrapping around, and one input column apart (a diagonal stride); spatial windows centred. Only the index learning separates it from ``nesc``, so the
comparison isolates what learning the indices buys. Its frozen start indices are still counted as
parameters (4 per block), as nesc's are, although a stride rule needs none: that costs ``wsnet`` the
routing share of the budget (under 3% in our plans).

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
from nesc.core.config import NESConfig
from nesc.core.errors import ConfigError, PlanError
from nesc.core.modules import EpitomeSampler, samplers_by_pool
from nesc.core.registry import Registry
from nesc.models import get_spec
from nesc.report import stored_params

# A pruned weight stores each non-zero as its value plus a 16-bit relative index (CSR with relative
# column offsets, as in Deep Compression): half a float32 on top of the value.
INDEX_OVERHEAD = 0.5
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear)
THINNER_SEARCH_STEPS = 40


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
    model = ctx.dense_model()
    if ctx.dense_state is not None:
        model.load_state_dict(ctx.dense_state)
    return model


def _thinner(ctx: BuildContext) -> nn.Module:
    """The width multiplier whose model is closest to the budget (bisection; parameters grow with width)."""
    budget = ctx.budget
    if "width_mult" not in _factory_args(ctx.model):
        raise ConfigError(f"method 'thinner' needs a model with a width_mult argument; {ctx.model!r} has none "
                          f"(resnet_fmnist, mobilenetv2_fmnist and cnn1d do)")
    lo, hi = 1e-3, float(ctx.model_kwargs.get("width_mult", 1.0))
    for _ in range(THINNER_SEARCH_STEPS):
        mid = (lo + hi) / 2
        if num_params(ctx.dense_model(width_mult=mid)) > budget:
            hi = mid
        else:
            lo = mid
    # Channel counts are integers: the best of the two widths around the budget.
    best = min((lo, hi), key=lambda w: abs(num_params(ctx.dense_model(width_mult=w)) - budget))
    return ctx.dense_model(width_mult=best)


def _factory_args(model: str) -> set[str]:
    return set(inspect.signature(get_spec(model).factory).parameters)


# ------------------------------------------------------------------------------------- nesc-based


def _nesc(ctx: BuildContext, init: str | None = None) -> fx.GraphModule:
    """nesc's transform of the seeded model, or of the trained dense model when ``ctx.dense_state`` is
    given (then ``init="dense"`` fits the pools to the trained weights)."""
    model = ctx.dense_model()
    if ctx.dense_state is not None:
        model.load_state_dict(ctx.dense_state)
    config = ctx.nes.replace(ratio=ctx.ratio, param_budget=None, seed=ctx.seed, init=init or ctx.nes.init)
    return transform(model, (ctx.example,), config)


def _nesc_fixed(ctx: BuildContext) -> fx.GraphModule:
    gm = _nesc(ctx)
    for sampler in samplers(gm):
        sampler.starts.requires_grad_(False)  # the random initial integer starts, never learned
    return gm


def _wsnet(ctx: BuildContext) -> fx.GraphModule:
    gm = _nesc(ctx, init="random")
    with torch.no_grad():
        for members in samplers_by_pool(gm).values():
            for layer, sampler in enumerate(members):
                sampler.starts.copy_(stride_starts(sampler, layer, len(members)))
                sampler.starts.requires_grad_(False)
    if ctx.nes.init == "dense":  # fit the pools along these starts, as nesc's are fitted along its own
        model = ctx.dense_model()
        if ctx.dense_state is not None:
            model.load_state_dict(ctx.dense_state)
        fit_to_model(gm, model)
    return gm


def stride_starts(sampler: EpitomeSampler, layer: int, layers: int) -> Tensor:
    """WSNet-style starts ``(nbo, nbi, 4)``: a fixed stride over the pool's channel axes.

    Output block ``j`` starts ``so = max(1, Op // nbo)`` rows after block ``j - 1`` (overlapping windows
    when the pool is narrower than the layer, as WSNet's filters overlap at their sampling stride),
    wrapping around the pool, and one column after it: a diagonal stride. Without the column step, two
    output blocks whose row windows are rotations of each other (a pool of 3 rows serving 10 classes)
    would give some outputs identical weights. Input blocks stride ``si = max(1, Ip // nbi)`` columns.
    Layers sharing a pool are shifted by ``floor(l * Op / L)`` rows. Spatial windows are centred.
    """
    g = sampler.geometry
    nbo, nbi = g.grid
    Op, Ip = g.pool[:2]
    ylim, xlim = g.start_limits
    so, si = max(1, Op // nbo), max(1, Ip // nbi)
    rows = torch.arange(nbo) * so + layer * Op // layers  # (nbo,)
    o = rows % Op
    i = (torch.arange(nbi)[None, :] * si + torch.arange(nbo)[:, None]) % Ip  # (nbo, nbi)
    starts = torch.zeros(nbo, nbi, 4)
    starts[..., 0] = o[:, None]
    starts[..., 1] = i
    starts[..., 2] = ylim // 2
    starts[..., 3] = xlim // 2
    return starts


def samplers(gm: nn.Module) -> list[EpitomeSampler]:
    return [m for m in gm.modules() if isinstance(m, EpitomeSampler)]


def _stored_when_frozen(model: nn.Module) -> int:
    """What the deployed model stores: the frozen copy's pools, routing maps (8 scalars per block) and
    dense parameters. The trainable GraphModule holds 4 start scalars per block instead."""
    return stored_params(freeze(model))


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
    Method("wsnet", _wsnet, _stored_when_frozen, 0.02, description="WSNet-style fixed strided sampling from nesc pools"),
    Method("hashed", _hashed, num_params, 0.02, description="HashedNets: hashed buckets with sign hashes, per layer"),
    Method("prune", _prune, _prune_count, 0.01, needs_dense_state=True,
           description="layer-wise magnitude pruning of the trained dense model, then fine-tuning"),
    Method("nesc_fixed", _nesc_fixed, _stored_when_frozen, 0.02, description="nesc, random start indices frozen"),
    Method("nesc", _nesc, _stored_when_frozen, 0.02, description="nesc, learned start indices"),
):
    register_method(_method)
