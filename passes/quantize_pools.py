"""quantize_pools (rewrite): store every pool of a frozen graph as int8 (one symmetric scale per pool
row), float16 or bfloat16, and dequantise it in the graph right before the regeneration reads it.

Why: pools are most of what a compressed model stores; int8 makes them 4x smaller again, and the
regeneration, the routing maps and every backend's kernels after the dequantisation stay as they are.
``nesc.freeze(gm, pool_dtype=...)`` runs it last (after ``reuse``, whose product maps read the same
regenerate nodes). Formats and ops: ``nesc.core.quant``.

Requires: a frozen graph (every pool read by ``nesc.regenerate`` nodes only, through ``get_attr``).
Ensures: every pool is a ``QuantizedPool`` at the pool's old path; each regenerate node reads it
through one ``nesc.dequantize`` node (int8: values and scales; float16/bfloat16: values, scale None);
the graph lints. The model computes in the pools' old dtype; outputs change by the rounding of the
pools only.

    before:  %p = get_attr[nesc_pool_0]; %w = nesc.regenerate(%p, ...)
    after:   %q = get_attr[nesc_pool_0.values]; %s = get_attr[nesc_pool_0.scale]
             %p = nesc.dequantize(%q, %s, torch.float32)        (float16: nesc.dequantize(%q, None, torch.float32))
             %w = nesc.regenerate(%p, ...)
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, fx

from nesc.core.errors import PassOrderError
from nesc.core.modules import is_regenerate, sampler_of
from nesc.core.quant import check_pool_dtype, dequantize_node, pool_read, quantize

from .infra import NescPass, PassResult, broken_promise


class QuantizePools(NescPass):
    name = "quantize_pools"

    def __init__(self, dtype: torch.dtype, scales: dict[str, Tensor] | None = None):
        super().__init__()
        self.dtype = check_pool_dtype(dtype)
        self.scales = scales or {}  # pool path -> int8 scales learned by prepare_qat's fake-quantizers

    def requires(self, gm: fx.GraphModule) -> None:
        trainable = [n.name for n in gm.graph.nodes if sampler_of(gm, n) is not None]
        if trainable:
            raise PassOrderError(f"{self.name}: nodes {trainable[:3]} still call trainable samplers; quantise the "
                                 f"pools of a frozen model (nesc.freeze(gm, pool_dtype=...))")
        for node in filter(is_regenerate, gm.graph.nodes):
            read = pool_read(node.args[0])
            if read is None or read.dequantize is not None:
                what = "already quantized" if read is not None else f"read from {node.args[0]!r}, not a get_attr"
                raise PassOrderError(f"{self.name}: regenerate node {node.name!r}: its pool is {what}; quantize the "
                                     f"pools of a frozen fp32 model once")
            others = [u.name for u in read.values.users if not (is_regenerate(u) and u.args[0] is read.values)]
            if others:
                raise PassOrderError(f"{self.name}: pool {read.values.target!r} is also read by {others[:3]}, not "
                                     f"only as the pool of regenerate nodes; nothing was quantized")

    def call(self, gm: fx.GraphModule) -> PassResult:
        reads: dict[str, list[fx.Node]] = defaultdict(list)
        for node in filter(is_regenerate, gm.graph.nodes):
            if node.args[0] not in reads[node.args[0].target]:
                reads[node.args[0].target].append(node.args[0])
        for target, getters in reads.items():
            _quantize_one(gm, target, getters, self.dtype, self.scales.get(target))
        if reads:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(reads))

    def ensures(self, gm: fx.GraphModule) -> None:
        plain = [n.name for n in filter(is_regenerate, gm.graph.nodes) if pool_read(n.args[0]).dequantize is None]
        if plain:
            raise broken_promise(self.name, f"regenerate nodes {plain[:3]} still read an unquantized pool")


def quantize_pools(gm: fx.GraphModule, dtype: torch.dtype, scales: dict[str, Tensor] | None = None) -> PassResult:
    """``QuantizePools(dtype, scales)(gm)``: the pass as a plain function."""
    return QuantizePools(dtype, scales)(gm)


def _quantize_one(gm: fx.GraphModule, target: str, getters: list[fx.Node], dtype: torch.dtype,
                  scale: Tensor | None) -> None:
    """Pool parameter ``target`` -> a QuantizedPool at the same path; each of its get_attr nodes -> a
    dequantisation of the stored values."""
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    pool = getattr(owner, leaf)
    compute = pool.dtype
    delattr(owner, leaf)
    owner.add_module(leaf, quantize(pool, dtype, scale))
    for old in getters:
        with gm.graph.inserting_before(old):
            values = gm.graph.get_attr(f"{target}.values")
            scales = gm.graph.get_attr(f"{target}.scale") if dtype == torch.int8 else None
            new = dequantize_node(gm.graph, values, scales, compute)
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)
