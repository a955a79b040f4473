"""Frozen registry models with product maps (``NESConfig(reuse="outputs")``: ``passes.reuse`` makes layers'
outputs interpolated copies of one op run with the pool's rows, ``torch.ops.nesc.gather_products``),
shared by the TVM and ONNX tests. Fractions are drawn in [0, 1) so that every output channel really
interpolates (at init they are all 0, which would test a plain gather)."""

from __future__ import annotations

import copy
import functools

import torch
from torch import fx, nn

import nesc
from helpers import registry_inputs, registry_model
from nesc.core import names
from nesc.core.config import NESConfig
from nesc.core.modules import is_gather_products

# A linear net (products along dim -1, with the layer's bias in the gather), conv1d, and a conv2d
# net with batch norm and residual adds after the gather.
PRODUCT_MODELS = ("mlp", "cnn1d", "resnet_fmnist")
CONFIG = NESConfig(ratio=4, min_params=128, reuse="outputs", init="random")


def with_fractions(frozen: fx.GraphModule, seed: int = 0) -> fx.GraphModule:
    """``frozen`` with every product map's fractions drawn uniformly in [0, 1) (in place)."""
    gen = torch.Generator().manual_seed(seed)
    for node in filter(is_gather_products, frozen.graph.nodes):
        fracs = frozen.get_buffer(node.args[2].target)
        fracs.copy_(torch.rand(fracs.shape, generator=gen))
    return frozen


def gather_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_gather_products(n)]


@functools.lru_cache(maxsize=None)
def _products_registry(name: str) -> tuple[nn.Module, fx.GraphModule]:
    torch.manual_seed(0)
    model = registry_model(name).eval()
    frozen = with_fractions(nesc.freeze(nesc.transform(model, registry_inputs(name), CONFIG))).eval()
    shared = [d for d in frozen.meta[names.REUSE].values() if "shared" in d]
    assert shared and gather_nodes(frozen), f"{name}: no product map at {CONFIG}: {frozen.meta[names.REUSE]}"
    return model, frozen


def products_registry(name: str) -> tuple[nn.Module, fx.GraphModule]:
    """(dense model, frozen model with product maps and nonzero fractions), both in eval mode; copies."""
    model, frozen = _products_registry(name)
    return copy.deepcopy(model), copy.deepcopy(frozen)
