"""What the nesc.serialize tests share: the models they save and the tools that edit artifacts.

Models are built here by hand: a conv + batch norm + ReLU + dropout + linear net captured with
``symbolic_trace``, and the same net with its conv weight replaced by a ``nesc.regenerate`` node
reading a pool and a routing map, as ``passes.freeze`` leaves it. ``conftest.py`` saves each once per
session (the first ``torch.export`` dominates the run time); the error tests edit copies of those
files with ``rewrite_metadata``.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
import torch.nn.functional as F
from torch import fx, nn

import nesc.core.modules  # noqa: F401 - registers torch.ops.nesc.regenerate
from nesc.core import names
from nesc.core.errors import ArtifactError
from nesc.serialize import load
from nesc.serialize.tensors import digest

REGENERATE = torch.ops.nesc.regenerate.default
SHAPE = (2, 3, 8, 8)  # (B, C, H, W) of the example input


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.drop(F.relu(self.bn(self.conv(x))))  # (B, 8, H, W)
        return self.fc(x.mean((2, 3)))  # (B, 5)


def traced(model: nn.Module, shape=SHAPE) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    gm.meta[names.INPUT_SPECS] = [(tuple(shape), "float32")]
    _ = gm.eval()(torch.randn(*shape))  # one eval pass gives the batch-norm statistics nontrivial values
    return gm


def with_regenerate(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace ``conv``'s weight by regenerate(pool, routes), as a frozen nesc model holds it.

    Weight (8, 3, 3, 3) from a pool (4, 3, 3, 3) in blocks of (4, 3): a (2, 1) grid. Channel starts
    lie inside the pool (o < 4, i < 3); the kernel fills the pool spatially, so y = x = 0.
    """
    gen = torch.Generator().manual_seed(1)
    bias = gm.conv.bias
    gm.delete_submodule("conv")
    gm.add_module("conv", nn.Module())
    gm.conv.bias = bias
    gm.nesc_pool_0 = nn.Parameter(torch.randn(4, 3, 3, 3, generator=gen))
    starts = torch.stack(
        [torch.randint(0, 4, (2, 1), generator=gen), torch.randint(0, 3, (2, 1), generator=gen)]
        + [torch.zeros(2, 1, dtype=torch.int64)] * 2,
        dim=-1,
    ).to(torch.int32)  # (2, 1, 4)
    routes = nn.Module()
    routes.register_buffer("starts", starts)
    routes.register_buffer("fracs", torch.rand(2, 1, 4, generator=gen))  # float32 in [0, 1)
    gm.add_module("nesc_routes", nn.Module())
    gm.nesc_routes.add_module("conv_weight", routes)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv"]
    g = gm.graph
    with g.inserting_before(node):
        pool = g.get_attr("nesc_pool_0")
        s, f = (g.get_attr(f"nesc_routes.conv_weight.{t}") for t in ("starts", "fracs"))
        weight = g.call_function(REGENERATE, (pool, s, f, 1.0, [8, 3, 3, 3], [4, 3], "conv2d"))
        weight.meta[names.SAMPLED_WEIGHT] = "conv.weight"
        conv = g.call_function(F.conv2d, (node.args[0], weight, g.get_attr("conv.bias")), {"padding": 1})
    node.replace_all_uses_with(conv)
    g.erase_node(node)
    g.lint()
    gm.recompile()
    return gm


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    assert {n for n, _ in a.named_parameters()} == {n for n, _ in b.named_parameters()}


# ------------------------------------------------------------------------- editing artifacts


def header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def rewrite_metadata(src, dst, *, rehash: bool = True, **changes) -> None:
    """Copy an artifact with some metadata fields replaced; a well-formed header, only the values change.
    ``rehash``: recompute the digest, as an attacker would, so that what is tested is the check the edit
    is aimed at rather than the digest (which covers the whole header)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    head["__metadata__"].update(changes)
    if rehash:
        meta = {k: v for k, v in head["__metadata__"].items() if k != "sha256"}
        with safe_open(str(src), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        head["__metadata__"]["sha256"] = digest(tensors, meta if meta.get("format_version") != "1" else None)
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def load_error(path) -> str:
    with pytest.raises(ArtifactError) as info:
        load(path)
    return str(info.value)


def rewrite(src, dst, *, metadata=None, tensors=None, rehash: bool = True) -> None:
    """Copy an artifact through safetensors with its metadata and/or tensors edited by the given
    functions (dict -> dict), and its digest recomputed as an attacker would (``rehash``)."""
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta, stored = dict(f.metadata()), {name: f.get_tensor(name) for name in f.keys()}
    meta = metadata(meta) if metadata else meta
    stored = tensors(stored) if tensors else stored
    if rehash:
        meta["sha256"] = digest(stored, {k: v for k, v in meta.items() if k != "sha256"})
    save_file(stored, str(dst), metadata=meta)


def graph_doc(path) -> dict:
    return json.loads(header(path)["__metadata__"]["graph"])


def with_graph(doc: dict):
    """A metadata edit that replaces the graph document."""
    return lambda meta: {**meta, "graph": json.dumps(doc)}
