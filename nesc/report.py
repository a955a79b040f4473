"""The per-layer report: what each weight became, what it costs, and why anything stayed dense.

Works on any stage — a captured dense graph, a transformed one, a frozen one, a loaded artifact —
because it reads only what find_weights derives from the graph plus the reasons the plan recorded.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from nesc.core import names
from nesc.core.modules import REGENERATE, EpitomeSampler, is_gather_products, tensor_roles
from nesc.core.quant import pool_read
from nesc.core.sampling import ROUTING_SCALARS_PER_BLOCK, START_SCALARS_PER_BLOCK, Geometry
from nesc.passes.find_weights import find_weights, weight_infos
from nesc.passes.functionalize import INLINED, functionalize
from nesc.passes.reuse import fold_channels


@dataclass(frozen=True)
class LayerRow:
    name: str  # the weight's qualified name
    op: str
    shape: tuple[int, ...]  # the weight as the op uses it
    state: str  # dense | sampled | frozen
    pool: str  # "" when dense
    pool_shape: tuple[int, ...]
    shares_with: int  # other layers reading the same pool
    params: int  # dense parameters of this weight
    stored: float  # what this weight costs now: routing map + its share of the pool (or params if dense)
    madd: int  # multiply-adds per example
    regen_madd: int  # multiply-adds to regenerate the weight, once per forward
    reason: str = ""  # why it stayed dense, or what passes.reuse did
    adds: int = 0  # additions per example outside the op (passes.reuse's fold and product interpolation)


@dataclass
class Report:
    rows: list[LayerRow]
    other_dense: dict[str, tuple[int, int]]  # reason -> (tensors, params) for biases, norms, ...
    dense_params: int  # the dense model's parameter count
    stored_params: int  # pools + routing maps + dense parameters
    pools: dict[str, tuple[tuple[int, ...], list[str]]] = field(default_factory=dict)
    stored_bytes: int = 0  # bytes of what stored_params counts, int8 pools at 1 byte per element + scales

    @property
    def ratio(self) -> float:
        return self.dense_params / max(self.stored_params, 1)

    @property
    def madd(self) -> int:
        return sum(r.madd for r in self.rows)

    @property
    def adds(self) -> int:
        return sum(r.adds for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "other_dense": {k: list(v) for k, v in self.other_dense.items()},
            "dense_params": self.dense_params,
            "stored_params": self.stored_params,
            "stored_bytes": self.stored_bytes,
            "ratio": self.ratio,
            "madd": self.madd,
            "adds": self.adds,
        }

    def __rich__(self):
        from rich.table import Table

        table = Table(title=f"nesc: {self.dense_params:,} -> {self.stored_params:,} parameters ({self.ratio:.2f}x)")
        for col, justify in [("layer", "left"), ("op", "left"), ("weight", "left"), ("pool", "left"),
                             ("shared by", "right"), ("params", "right"), ("stored", "right"),
                             ("MAdd", "right"), ("adds", "right"), ("regen MAdd", "right"), ("note", "left")]:
            table.add_column(col, justify=justify, overflow="fold")
        for r in self.rows:
            pool = f"{r.pool} {tuple(r.pool_shape)}" if r.pool else "-"
            table.add_row(
                r.name, r.op, "x".join(map(str, r.shape)), pool, str(r.shares_with + 1) if r.pool else "-",
                f"{r.params:,}", f"{r.stored:,.0f}", f"{r.madd:,}", f"{r.adds:,}" if r.adds else "-",
                f"{r.regen_madd:,}" if r.regen_madd else "-",
                r.reason or ("" if r.pool else "dense"),
            )
        for reason, (tensors, params) in sorted(self.other_dense.items()):
            table.add_row(f"({tensors} other tensors)", "", "", "-", "-", f"{params:,}", f"{params:,}", "", "", "",
                          reason)
        weights = sum(r.params for r in self.rows)
        table.add_section()
        table.add_row("total", "", "", f"{len(self.pools)} pools", "", f"{self.dense_params:,}",
                      f"{self.stored_params:,}", f"{self.madd:,}", f"{self.adds:,}",
                      f"{sum(r.regen_madd for r in self.rows):,}",
                      f"{weights:,} in weight-bearing ops")
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=180, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(self)
        return console.export_text()


def build_report(gm: fx.GraphModule) -> Report:
    if not any(names.WEIGHT in n.meta for n in gm.graph.nodes):
        # A graph straight from capture may still call nn.Conv2d/nn.Linear as modules: analyse a copy
        # in the functional form rather than rewrite the caller's graph.
        if any(n.op == "call_module" and type(gm.get_submodule(n.target)) in INLINED for n in gm.graph.nodes):
            gm = functionalize(copy.deepcopy(gm)).graph_module
        find_weights(gm)
    infos = weight_infos(gm)
    geometry_of, pool_of = _sampled_weights(gm)
    members: dict[str, list[str]] = defaultdict(list)
    for name, pool in pool_of.items():
        members[pool].append(name)
    reasons = gm.meta.get(names.DENSE_REASONS, {})
    folds, products = _folds(gm), _products(gm)
    rows, seen = [], set()
    madd: dict[str, int] = defaultdict(int)  # a weight read by several ops (tied, sliced): all their work
    for info in infos:
        madd[info.weight_name] += info.madd
    for info in infos:
        if info.weight_name in seen:
            continue  # a tied weight used by several ops: one row
        seen.add(info.weight_name)
        g: Geometry | None = geometry_of.get(info.weight_name)
        if g is None:
            rows.append(LayerRow(info.weight_name, info.op, g_shape(info), info.state, "", (), 0, info.numel,
                                 info.numel, madd[info.weight_name], 0, reasons.get(info.weight_name, "dense")))
            continue
        pool = pool_of[info.weight_name]
        share = math.prod(g.pool) / len(members[pool])
        # Trainable: 4 start coordinates per block (parameters); frozen: the routing map's 8 scalars.
        routing = g.num_blocks * (ROUTING_SCALARS_PER_BLOCK if info.state == "frozen" else START_SCALARS_PER_BLOCK)
        # A folded op (passes.reuse) reads fewer input channels than the weight it replaces had, and an
        # op whose products are shared computes fewer output channels than the layer has.
        channels, adds = folds.get(info.weight_name, (info.shape[1], 0))
        outputs, lerps, routes = products.get(info.weight_name, (info.shape[0], 0, 0))
        notes = [f"folded: {channels} -> {info.shape[1]} input channels ({channels / info.shape[1]:.2f}x fewer "
                 f"multiply-adds)"] if channels != info.shape[1] else []
        if outputs != info.shape[0]:
            notes.append(f"shared: {outputs} outputs from {info.shape[0]} products "
                         f"({outputs / info.shape[0]:.2f}x fewer multiply-adds)")
        params = info.numel * channels // info.shape[1] * outputs // info.shape[0]
        rows.append(LayerRow(info.weight_name, info.op, g_shape(info), info.state, pool, g.pool,
                             len(members[pool]) - 1, params, routing + routes + share,
                             madd[info.weight_name], len(g.corners) * g.numel, "; ".join(notes), adds + lerps))
    other: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p in gm.meta.get(names.DENSE_PARAMS, []):
        other[p.reason][0] += 1
        other[p.reason][1] += p.numel
    dense_total = sum(r.params for r in rows) + sum(v[1] for v in other.values())
    learners = [m for m in gm.modules() if isinstance(m, EpitomeSampler) and m.learner is not None]
    if learners:  # stored while training, not part of the dense model, dropped by freeze
        other["transformation learners (training only: freeze drops them)"] = [
            len(learners), sum(p.numel() for m in learners for p in m.learner.parameters())]
    pools = {name: (tuple(_tensor(gm, name).shape), members[name]) for name in members}
    stored = stored_params(gm)
    return Report(rows, {k: tuple(v) for k, v in other.items()}, dense_total, stored, pools, stored_bytes(gm))


_SUMS = (torch.ops.aten.sum.dim_IntList, torch.sum)
_RESHAPES = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
_PADS = (torch.ops.aten.constant_pad_nd.default, torch.ops.aten.pad.default)


def _folds(gm: fx.GraphModule) -> dict[str, tuple[int, int]]:
    """Weight name -> (input channels before the fold, additions per example) for every op whose input
    is ``passes.reuse``'s channel fold: still the ``fold_channels`` call, or, in a loaded artifact, the
    pad -> reshape (copies, period) -> sum over the copies that export made of it, where the period is
    the op's input width and the op's weight is regenerated from a pool that many channels wide."""
    out = {}
    for node in gm.graph.nodes:
        info = node.meta.get(names.WEIGHT)
        x = node.args[0] if info is not None and info.state == "frozen" and node.args else None
        if not isinstance(x, fx.Node) or x.op != "call_function":
            continue
        if x.target is fold_channels:
            src, axis = x.args[0], x.args[2]
        elif x.target in _SUMS and len(x.args) > 1 and isinstance(x.args[0], fx.Node) and x.args[0].target in _RESHAPES:
            dims = x.args[1] if isinstance(x.args[1], (list, tuple)) else [x.args[1]]
            if len(dims) != 1:
                continue
            src, axis = x.args[0].args[0], dims[0]
            if isinstance(src, fx.Node) and src.target in _PADS:
                src = src.args[0]
        else:
            continue
        shape, folded = _shape_of(src), _shape_of(x)
        if not shape or not folded or len(shape) != len(folded):
            continue
        axis %= len(shape)
        channels, period = shape[axis], folded[axis]
        if period != info.shape[1] or channels <= period:
            continue
        copies = -(-channels // period)
        out[info.weight_name] = (channels, (copies - 1) * math.prod(folded[1:]))
    return out


def _products(gm: fx.GraphModule) -> dict[str, tuple[int, int, int]]:
    """Weight name -> (the layer's output channels, interpolation operations per example, scalars of
    the product map) for every op whose output ``passes.reuse`` routes through ``nesc.gather_products``
    (a custom op, so the same node in a loaded artifact). Each interpolated output element is one
    subtraction and one multiply-add; a copied one costs nothing."""
    out = {}
    for node in filter(is_gather_products, gm.graph.nodes):
        op, starts, fracs, _, dim, channels, block, _ = node.args
        info = op.meta.get(names.WEIGHT) if isinstance(op, fx.Node) else None
        shape = _shape_of(node)
        if info is None or not shape or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (starts, fracs)):
            continue
        f = gm.get_buffer(fracs.target)
        interpolated = int((f != 0).repeat_interleave(block)[:channels].sum())
        per_channel = math.prod(shape[1:]) // shape[dim % len(shape)]
        scalars = gm.get_buffer(starts.target).numel() + f.numel()
        out[info.weight_name] = (channels, 2 * interpolated * per_channel, scalars)
    return out


def _shape_of(node) -> tuple[int, ...]:
    if not isinstance(node, fx.Node):
        return ()
    meta = node.meta.get("tensor_meta") or node.meta.get("val")
    return tuple(int(d) for d in getattr(meta, "shape", ()))


def g_shape(info) -> tuple[int, ...]:
    return Geometry(info.shape, info.shape, (1, 1), info.layout).param_shape


def _sampled_weights(gm: fx.GraphModule):
    """weight name -> Geometry, and weight name -> pool attribute, for sampled and frozen weights."""
    geometry, pool = {}, {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), EpitomeSampler):
            s = gm.get_submodule(node.target)
            geometry[s.weight_name], pool[s.weight_name] = s.geometry, node.args[0].target
        elif node.op == "call_function" and node.target is REGENERATE:
            p, _, _, _, shape, block, layout = node.args
            name = node.meta.get(names.SAMPLED_WEIGHT, node.name)
            p = pool_read(p).values  # the stored pool, or its int8 / float16 values (nesc.core.quant)
            pool_shape = tuple(_tensor(gm, p.target).shape)
            geometry[name] = Geometry(tuple(shape), pool_shape, tuple(block), layout)
            pool[name] = p.target
    return geometry, pool


def stored_params(gm: fx.GraphModule) -> int:
    """Scalars the model stores for its weights: every parameter, plus frozen routing maps.

    Trainable start indices are parameters and count; batch-norm statistics are buffers and do not
    (they are the same in the dense and compressed model).
    """
    return sum(t.numel() for t in _stored_tensors(gm))


def stored_bytes(gm: fx.GraphModule) -> int:
    """Bytes of what ``stored_params`` counts (and of an int8 pool's scales): an int8 pool costs one
    byte per element, a float16 / bfloat16 one two."""
    tensors = _stored_tensors(gm)
    if isinstance(gm, fx.GraphModule):
        tensors += [gm.get_buffer(name) for name, role in tensor_roles(gm).items() if role == "pool_scale"]
    return sum(t.numel() * t.element_size() for t in tensors)


def _stored_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Every parameter, and the routing maps' and quantized pools' buffers (found by the graph's
    structure: the tensors a ``nesc.regenerate`` node reads as starts and fractions, or as its pool)."""
    tensors = list(gm.parameters())
    if isinstance(gm, fx.GraphModule):
        buffers = dict(gm.named_buffers())
        tensors += [buffers[name] for name, role in tensor_roles(gm).items()
                    if role == "route" or (role == "pool" and name in buffers)]
    return tensors


def _tensor(gm: nn.Module, path: str) -> torch.Tensor:
    """The parameter or buffer at ``path`` (a float pool is a parameter, a quantized one's values a buffer)."""
    owner, _, leaf = path.rpartition(".")
    return getattr(gm.get_submodule(owner), leaf)
