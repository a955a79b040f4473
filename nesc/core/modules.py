"""The modules and the op built on the sampling math: what a transformed or frozen graph contains.

* ``EpitomeSampler`` (trainable): owns one weight's start indices (and, in the paper's mode, a
  ``TransformationLearner``) and reads its pool as input; ``passes.epitomize`` adds one per weight.
* ``RoutingMap`` (frozen): int32 starts and float fractions per block; ``passes.freeze`` adds one per
  weight and calls ``torch.ops.nesc.regenerate`` on it.
* ``torch.ops.nesc.regenerate``: the frozen form of a sampled weight, a ``torch.library`` op (fake
  kernel and autograd registered) that torch.export keeps as one node. Importing this module
  registers it.
* ``torch.ops.nesc.gather_products``: ``passes.reuse``'s product map (``nesc.core.products``), a custom
  op for the same reason.
* ``tensor_roles`` / ``samplers_by_pool``: what each tensor of a GraphModule is, read from the graph's
  structure (which node consumes it), never from its name.

Start indices, fractions and learned offsets are positions, not weights: they stay float32 when the
model is cast to a narrower float (``gm.to(torch.bfloat16)``, ``gm.half()``;
``compat.keep_precision_on_cast``), while pools and dense weights take the new dtype and the sampled
weight comes out in the pool's dtype. ``.double()`` casts them too (nothing is lost).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, fx, nn

from .cache import cached
from .compat import keep_precision_on_cast
from .errors import ConfigError
from .products import gather_products_op, product_index  # noqa: F401 - registers nesc::gather_products
from .quant import pool_read
from .sampling import Geometry, regenerate, regenerate_grad, regenerate_indexed, scale_buffer, split_starts
from .wide import regenerate_wide


@keep_precision_on_cast("running_offset")
class TransformationLearner(nn.Module):
    """A batch-conditioned offset for the start indices: the paper's transformation learner as a
    weight shared by the whole batch allows.

    It reads batch-averaged features (mean over every axis but channels) and predicts one offset per
    block and axis; a running average of its predictions (like batch norm's statistics) is what eval
    mode and freeze use, so the deployed model has a static routing map either way. A per-sample
    learner would need a weight per sample. Measured on MNIST-1D (``benchmarks/results/sampling``):
    no better than plain learned starts at 4x, 8x or 16x, so it stays off by default.
    """

    def __init__(self, in_channels: int, grid: tuple[int, int], channel_dim: int, momentum: float = 0.1):
        super().__init__()
        self.grid = grid
        self.channel_dim = channel_dim
        self.momentum = momentum
        self.fc = nn.Linear(in_channels, grid[0] * grid[1] * 4)
        nn.init.zeros_(self.fc.weight)  # start from the plain learned starts
        nn.init.zeros_(self.fc.bias)
        self.register_buffer("running_offset", torch.zeros(*grid, 4))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.running_offset
        feats = x.movedim(self.channel_dim, -1).reshape(-1, x.shape[self.channel_dim]).mean(0)  # (C,)
        # A position: at least float32, whatever the model's dtype (the running average's dtype).
        offset = self.fc(feats).view(*self.grid, 4).to(self.running_offset.dtype)
        with torch.no_grad():
            self.running_offset.lerp_(offset.detach(), self.momentum)
        return offset


# Blocks of at most this many elements regenerate with one gather over all blocks (``regenerate_indexed``),
# larger ones from stacked strided views of the pool (``regenerate``, a view per block): forward +
# backward, one thread, indexed vs sliced: 128 blocks of 1x20x3 0.86 vs 2.62 ms; 4 of 6x8x3x3 0.64 vs
# 0.73; 4 of 16x16x3x3 0.50 vs 0.61; 9 of 22x22x3x3 0.88 vs 0.71; 9 of 86x171 2.25 vs 1.08; 32 of 64x64
# 3.20 vs 2.21. Raised from 1024 once the views made the sliced path cheaper per call but not per block:
# MobileNetV2's training step (224, batch 8, 14 layers switched) 1.21x -> 1.13x dense in one A/B run.
INDEXED_BLOCK_NUMEL = 3072
# While torch.compile traces a training forward, weights of at most this many elements regenerate with
# the gather traced into the graph; larger ones call ``nesc::regenerate`` and, in the backward,
# ``nesc::regenerate_backward`` (opaque: the eager slices), since inductor's scatter-add for the gather's
# gradient grows slower than them: compiled forward + backward of one sampled linear layer at batch 32,
# traced vs ops, 2 threads: 32,768 elements 3.0 vs 3.5 ms; 65,536 7.4 vs 4.2; 131,072 7.7 vs 5.3;
# 401,408 23.6 vs 10.8.
COMPILED_GATHER_NUMEL = 32768
# EpitomeSampler's ``tied`` (NESConfig.reuse): no tie, True (= "inputs"), "inputs", "outputs".
TIES = (False, True, "inputs", "outputs")


def regenerate_fastest(pool: Tensor, starts: Tensor, fracs: Tensor, scale: float | Tensor,
                       geometry: Geometry) -> Tensor:
    """``regenerate`` (stacked slices of the pool) or ``regenerate_indexed`` (one gather), whichever is
    faster for the geometry (``INDEXED_BLOCK_NUMEL``) or, while a compiler traces (``torch.compile``, AOTAutograd:
    its tensors are fakes or functional wrappers), the one without data-dependent Python, whose index
    arithmetic the compiler fuses into the gather. Same values either way."""
    tracing = torch.compiler.is_compiling() or type(pool) not in (Tensor, nn.Parameter)
    if tracing or _small_blocks(geometry):
        return regenerate_indexed(pool, starts, fracs, scale, geometry)
    return regenerate(pool, starts, fracs, scale, geometry)


def _small_blocks(geometry: Geometry) -> bool:
    return geometry.block[0] * geometry.block[1] * geometry.shape[2] * geometry.shape[3] <= INDEXED_BLOCK_NUMEL


@keep_precision_on_cast("starts", "scale")
class EpitomeSampler(nn.Module):
    """Trainable sampler: owns one weight's start indices (and learner); reads its pool as input.

    forward(pool) -> weight, or forward(pool, x) -> weight when a transformation learner is used.
    """

    def __init__(
        self,
        geometry: Geometry,
        starts: Tensor,
        scale: float,
        weight_name: str,
        learner: TransformationLearner | None = None,
        tied: bool | str = False,
    ):
        super().__init__()
        if tuple(starts.shape) != (*geometry.grid, 4):
            raise ValueError(f"starts must be {(*geometry.grid, 4)}, got {tuple(starts.shape)}")
        if tied not in TIES:
            raise ValueError(f"tied must be one of {TIES}, got {tied!r}")
        self.geometry = geometry
        self.register_buffer("scale", scale_buffer(scale))
        self.weight_name = weight_name
        # Reuse-friendly routing (NESConfig.reuse): False, "inputs" (True) or "outputs"; see ``tie``.
        self.tied = "inputs" if tied is True else tied
        starts = self.tie(starts.float().floor() if tied else starts)
        self.starts = nn.Parameter(starts.float())
        # Where the starts began, for the displacement metrics (``start_stats``); never read by forward.
        self.register_buffer("origin", starts.detach().float().clone())
        self.learner = learner
        # Half-width in cells of the sampling kernel: 1 is linear interpolation (what freeze keeps);
        # wider smooths the start indices' loss landscape while they learn (``set_sampling_width``).
        self.width = 1.0

    def get_extra_state(self) -> Tensor:  # the sampling width shapes outputs too: a checkpoint holds it
        return torch.tensor(self.width, dtype=torch.float64)

    def set_extra_state(self, state: Tensor) -> None:
        if not (isinstance(state, Tensor) and state.numel() == 1 and float(state) >= 1):  # NaN fails too
            raise ConfigError(f"{self.weight_name}: sampling width in the state must be one number >= 1, got {state!r}")
        self.width = float(state)

    def tie(self, starts: Tensor) -> Tensor:
        """With ``tied``: every block of an output row takes the row's first block's output-channel and
        spatial start, and reads the pool columns that follow its neighbour's (input start ``i0 + k*bi``
        of the first block's integer ``i0``, never learned), so each sampled weight's input columns repeat
        with the pool's period ``Ip`` and ``passes.reuse`` can fold the input channels exactly.

        ``"outputs"`` ties further: every row reads the input and spatial starts of the first row, so
        rows differ only in their output-channel start, every output channel is an (interpolated) copy
        of one op run with the pool's rows, and ``passes.reuse`` computes the layer with ``Op``
        instead of ``O`` output channels (its product map)."""
        if not self.tied:
            return starts
        nbo, nbi = self.geometry.grid
        row = starts[:, :1]
        first = starts[:1, :1] if self.tied == "outputs" else row
        i = first[..., 1].detach() + torch.arange(nbi, device=starts.device) * self.geometry.block[1]
        return torch.stack([row[..., 0].expand(nbo, nbi), i.expand(nbo, nbi), first[..., 2].expand(nbo, nbi),
                            first[..., 3].expand(nbo, nbi)], dim=-1)

    def effective_starts(self, x: Tensor | None = None) -> Tensor:
        if self.learner is None:
            return self.tie(self.starts)
        if x is None:  # a read that feeds no op with features (a tied weight's other use)
            return self.tie(self.starts + self.learner.running_offset)
        return self.tie(self.starts + self.learner(x))

    def routing(self) -> tuple[Tensor, Tensor]:
        """The integer starts and interpolation fractions eval mode uses: the routing map."""
        with torch.no_grad():
            was = self.training
            self.eval()
            base, frac = split_starts(self.effective_starts(), self.geometry)
            self.train(was)
        return base, frac.detach().clone()

    def forward(self, pool: Tensor, x: Tensor | None = None) -> Tensor:
        if self.training:
            return self._regenerate(pool, x)
        inputs = (pool, self.starts, self.scale) + ((self.learner.running_offset,) if self.learner is not None else ())
        return cached(self.starts, inputs, (self.width, self.geometry), lambda: self._regenerate(pool, x))

    def _regenerate(self, pool: Tensor, x: Tensor | None) -> Tensor:
        base, frac = split_starts(self.effective_starts(x), self.geometry)
        g = self.geometry
        if self.width > 1:
            return regenerate_wide(pool, base, frac, self.scale, g, self.width)
        if torch.compiler.is_compiling() and g.numel > COMPILED_GATHER_NUMEL:  # the eager slices, as two ops
            return torch.ops.nesc.regenerate(pool, base, frac, self.scale, list(g.shape), list(g.block), g.layout)
        return regenerate_fastest(pool, base, frac, self.scale, g)

    def extra_repr(self) -> str:
        g = self.geometry
        width = f", width={self.width:g}" if self.width != 1 else ""
        return f"{self.weight_name}: {g.shape} <- pool {g.pool}, blocks {g.grid} of {g.block}, layout={g.layout}{width}"


@keep_precision_on_cast("fracs", "scale")
class RoutingMap(nn.Module):
    """A frozen sampler's routing map: int32 starts and float fractions per block, and the weight's
    gain ``scale`` (a float64 scalar; absent in ``passes.reuse``'s product maps).

    A passive container (never called): the graph reads ``starts``, ``fracs`` and ``scale`` through
    get_attr and calls ``torch.ops.nesc.regenerate``.
    """

    def __init__(self, starts: Tensor, fracs: Tensor, scale: float | Tensor | None = None):
        super().__init__()
        self.register_buffer("starts", starts.to(torch.int32))
        self.register_buffer("fracs", fracs.float())
        if scale is not None:
            self.register_buffer("scale", scale_buffer(scale))


# ``nesc::regenerate`` is defined on a plain ``torch.library.Library`` rather than ``custom_op``: a
# frozen model calls it once per weight per forward and, in inference, mostly returns a cached weight,
# so the dispatch is the cost; this path is several times cheaper per call than ``custom_op``'s.
_LIB = torch.library.Library("nesc", "FRAGMENT")
_LIB.define("regenerate(Tensor pool, Tensor starts, Tensor fracs, Tensor scale, int[] shape, int[] block, "
            "str layout) -> Tensor")


def regenerate_op(
    pool: Tensor, starts: Tensor, fracs: Tensor, scale: Tensor, shape: list[int], block: list[int], layout: str
) -> Tensor:
    """The frozen form of a sampled weight: one graph node, kept whole by torch.export. ``scale``: the
    routing map's 0-d float64 gain. In inference the weight comes from ``nesc.core.cache`` while the
    pool, routing map and scale are unchanged."""
    geometry = Geometry(tuple(shape), tuple(pool.shape), tuple(block), layout)
    return cached(starts, (pool, starts, fracs, scale), geometry,
                  lambda: regenerate_fastest(pool, starts, fracs, scale, geometry))


_LIB.impl("regenerate", regenerate_op, "CompositeExplicitAutograd")


@torch.library.register_fake("nesc::regenerate", lib=_LIB)
def _regenerate_fake(pool, starts, fracs, scale, shape, block, layout):
    geometry = Geometry(tuple(shape), tuple(pool.shape), tuple(block), layout)
    return pool.new_empty(geometry.param_shape)


def _regenerate_setup(ctx, inputs, output):
    pool, starts, fracs, scale, shape, block, layout = inputs
    ctx.save_for_backward(pool, starts, fracs, scale)
    ctx.geometry = Geometry(tuple(shape), tuple(pool.shape), tuple(block), layout)


def _regenerate_backward(ctx, grad):
    # A frozen model can still be fine-tuned: pools (and fractions) get gradients, routes stay fixed.
    pool, starts, fracs, scale = ctx.saved_tensors
    g = ctx.geometry
    if not _small_blocks(g):  # one opaque op, also in a compiled backward
        static = list(g.shape), list(g.block), g.layout
        gp, gf = torch.ops.nesc.regenerate_backward(grad, pool, starts, fracs, scale, *static)
        return gp, None, gf, None, None, None, None
    with torch.enable_grad():  # many small blocks: autograd through the gather (traced when compiled)
        p, f = pool.detach().requires_grad_(True), fracs.detach().requires_grad_(True)
        gp, gf = torch.autograd.grad(regenerate_indexed(p, starts, f, scale, g), (p, f), grad)
    return gp, None, gf, None, None, None, None


torch.library.register_autograd("nesc::regenerate", _regenerate_backward, setup_context=_regenerate_setup, lib=_LIB)

# The gradient as an op of its own, so that a compiled backward calls it as one opaque kernel (the
# eager slices) instead of tracing the gather's scatter-add (``COMPILED_GATHER_NUMEL``).
_LIB.define("regenerate_backward(Tensor grad, Tensor pool, Tensor starts, Tensor fracs, Tensor scale, int[] shape, "
            "int[] block, str layout) -> (Tensor, Tensor)")


def _regenerate_backward_op(grad, pool, starts, fracs, scale, shape, block, layout):
    geometry = Geometry(tuple(shape), tuple(pool.shape), tuple(block), layout)
    return regenerate_grad(grad, pool, starts, fracs, scale, geometry)


_LIB.impl("regenerate_backward", _regenerate_backward_op, "CompositeExplicitAutograd")


@torch.library.register_fake("nesc::regenerate_backward", lib=_LIB)
def _regenerate_backward_fake(grad, pool, starts, fracs, scale, shape, block, layout):
    return torch.empty_like(pool), torch.empty_like(fracs)


REGENERATE = torch.ops.nesc.regenerate.default
GATHER_PRODUCTS = torch.ops.nesc.gather_products.default
# Arguments of a gather_products node.
GATHER_ARGS = ("products", "starts", "fracs", "bias", "dim", "channels", "block", "rows")
# Arguments of a regenerate node: (pool, starts, fracs, scale, shape, block, layout).
REGENERATE_ARGS = ("pool", "starts", "fracs", "scale", "shape", "block", "layout")


def is_regenerate(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is REGENERATE


def is_gather_products(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is GATHER_PRODUCTS


def sampler_of(gm: fx.GraphModule, node: fx.Node) -> EpitomeSampler | None:
    """The EpitomeSampler a ``call_module`` node calls, or None."""
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    return mod if isinstance(mod, EpitomeSampler) else None


def tensor_roles(gm: fx.GraphModule) -> dict[str, str]:
    """``{qualified name: role}`` for every tensor nesc added: ``pool`` (read by a sampler or a regenerate
    node), ``pool_scale`` (an int8 pool's scales), ``route`` (a routing map's starts/fracs), ``scale`` (its
    gain), ``start`` and ``learner`` (a sampler's trainable indices, gain and learner). Read from the graph,
    so a renamed pool is still a pool; every other tensor of the module is the user's (dense)."""
    roles: dict[str, str] = {}
    for node in gm.graph.nodes:
        sampler = sampler_of(gm, node)
        if sampler is not None:
            if isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
                roles[node.args[0].target] = "pool"
            for pname, _ in sampler.named_parameters():
                roles[f"{node.target}.{pname}"] = "learner" if pname.startswith("learner.") else "start"
            for bname, _ in sampler.named_buffers():
                roles[f"{node.target}.{bname}"] = "learner" if bname.startswith("learner.") else "start"
        elif is_regenerate(node) or is_gather_products(node):  # a product map routes as a routing map does
            read = pool_read(node.args[0]) if is_regenerate(node) else None  # a pool, maybe dequantised (quant)
            kinds = ("route", "route", "scale") if is_regenerate(node) else ("route", "route")
            pool = [(read.values, "pool"), (read.scale, "pool_scale")] if read is not None else []
            for arg, role in [*zip(node.args[1:4], kinds), *pool]:
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    roles[arg.target] = role
    return roles


def samplers_by_pool(gm: fx.GraphModule) -> dict[str, list[EpitomeSampler]]:
    """Pool name -> the samplers reading it, in graph order (each sampler once)."""
    out: dict[str, list[EpitomeSampler]] = defaultdict(list)
    for node in gm.graph.nodes:
        sampler = sampler_of(gm, node)
        if sampler is not None and sampler not in out[node.args[0].target]:
            out[node.args[0].target].append(sampler)
    return dict(out)


def set_sampling_width(gm: nn.Module, width: float) -> None:
    """Set the sampling kernel's half-width (cells, >= 1) of every trainable sampler of ``gm``.

    ``width > 1`` reads each weight element as a tent-weighted average of the pool rows within
    ``width`` cells of its position, so a start index has a useful gradient towards windows a few
    cells away; ``width = 1`` is plain linear interpolation, the formula freeze makes exact.
    ``nesc.train.fit`` anneals it (``TrainConfig.sampling_width``); in a loop of your own, lower it to
    1 before ``nesc.freeze``.
    """
    if not (isinstance(width, (int, float)) and not isinstance(width, bool) and width >= 1):
        raise ConfigError(f"sampling width must be a number >= 1 (cells; 1 = linear interpolation), got {width!r}")
    for m in gm.modules():
        if isinstance(m, EpitomeSampler):
            m.width = float(width)


@torch.no_grad()
def start_stats(gm: nn.Module) -> dict[str, float]:
    """How far the start indices moved from where they began, over every block coordinate along an
    axis the block can move (``Geometry.active``): mean and max displacement in cells, and the share
    whose integer cell changed (``moved``). Empty when the model has no trainable sampler."""
    moves, changed = [], []
    for m in gm.modules():
        if isinstance(m, EpitomeSampler):
            active = torch.tensor(m.geometry.active)
            d = (m.starts - m.origin)[..., active]
            moves.append(d.abs().reshape(-1))
            changed.append((m.starts.floor() != m.origin.floor())[..., active].reshape(-1))
    if not moves:
        return {}
    d, c = torch.cat(moves), torch.cat(changed)
    if d.numel() == 0:
        return {"start_mean_move": 0.0, "start_max_move": 0.0, "start_moved": 0.0}
    return {"start_mean_move": float(d.mean()), "start_max_move": float(d.max()),
            "start_moved": float(c.float().mean())}
