"""What the nesc.serialize tests share: the models they save and the tools that edit artifacts.

Models are built here by hand: a conv + batch norm + ReLU + dropout + linear net captured with
``symbolic_trace``, and the same net with its conv weight replaced by a ``nesc.regenerate`` node
reading a pool and a routing map, as ``passes.freeze`` leaves it. ``conftest.py`` saves each once per
session (the first ``torch.export`` dominates the run time); the error tests edit copies of those
files with ``rewrite`` / ``rewrite_metadata``.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from safetensors import safe_open
import torch.nn.functional as F
from torch import fx, nn

import nesc.core.modules  # noqa: F401 - registers torch.ops.nesc.regenerate
from nesc.core import names
from nesc.core.errors import ArtifactError
from nesc.serialize import container, load
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
    routes.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))  # the gain: a 0-d buffer
    gm.add_module("nesc_routes", nn.Module())
    gm.nesc_routes.add_module("conv_weight", routes)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv"]
    g = gm.graph
    with g.inserting_before(node):
        pool = g.get_attr("nesc_pool_0")
        s, f, scale = (g.get_attr(f"nesc_routes.conv_weight.{t}") for t in ("starts", "fracs", "scale"))
        weight = g.call_function(REGENERATE, (pool, s, f, scale, [8, 3, 3, 3], [4, 3], "conv2d"))
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
#
# Tests edit what a file says, not how format 3 packs it: ``decode_artifact`` gives the header entries
# with the documents inflated (JSON texts under "graph", "tensors", "input_specs", "extra", "layout")
# and the stored tensors by name, for every format version; ``encode_artifact`` writes them back in the
# file's own version, the digest recomputed as an attacker would (``rehash``).

PLAIN = ("format", "format_version", names.NESC_VERSION, "torch_version", "sha256")
PACKED = ("3", "4", "5")  # the versions whose documents and tensors are packed (``container``)


def header(path) -> dict:
    """The raw safetensors header (tensor entries and ``__metadata__``) of a file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def decode_artifact(data: bytes) -> tuple[dict, dict]:
    """(header entries with the documents inflated, stored tensors by name) of an artifact's bytes."""
    from safetensors.torch import load as load_tensors

    (n,) = struct.unpack("<Q", data[:8])
    meta, tensors = dict(json.loads(data[8 : 8 + n])["__metadata__"]), dict(load_tensors(data))
    if meta.get("format_version") in PACKED:
        documents, tensors = container.unpack(tensors)
        meta = {**meta, **documents}
    return meta, tensors


def encode_artifact(meta: dict, tensors: dict, *, rehash: bool = True, keep_layout: bool = False) -> bytes:
    """The bytes of an artifact with these header entries and tensors, in the version ``meta`` names.
    Format 3: the tensors are packed anew, and the layout made from them unless ``keep_layout`` (then
    ``meta["layout"]``, maybe edited, goes into the file as it is)."""
    from safetensors.torch import save as save_tensors

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if meta.get("format_version") in PACKED:
        documents = {k: meta[k] for k in (*container.DOCUMENTS, *container.OPTIONAL_DOCUMENTS) if k in meta}
        stored = container.pack(documents, tensors)
        if keep_layout and container.LAYOUT in meta:
            text = json.dumps({**documents, container.LAYOUT: meta[container.LAYOUT]})
            stored["documents"] = torch.frombuffer(bytearray(zlib.compress(text.encode())), dtype=torch.uint8)
        meta = {k: v for k, v in meta.items() if k not in (*documents, container.LAYOUT)}
        tensors = stored
    if rehash:
        rest = {k: v for k, v in meta.items() if k != "sha256"}
        meta = {**meta, "sha256": digest(tensors, rest if meta.get("format_version") != "1" else None)}
    return save_tensors(tensors, metadata=meta)


def read_artifact(path) -> tuple[dict, dict]:
    return decode_artifact(path.read_bytes())


def rewrite_metadata(src, dst, *, rehash: bool = True, raw: bool = False, **changes) -> None:
    """Copy an artifact with some header entries or documents replaced (``rehash``: the digest recomputed,
    as an attacker would, so that what is tested is the check the edit is aimed at rather than the
    digest, which covers the whole file). Plain entries are edited in the raw header, the tensors'
    bytes kept, so that any version may be written (a future one included); ``raw``: every entry so
    (a document beside the packed ones)."""
    if not raw and not changes.keys() <= set(PLAIN):
        return rewrite(src, dst, metadata=lambda m: {**m, **changes}, rehash=rehash)
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
    """Copy an artifact with its header entries and/or stored tensors edited by the given functions
    (dict -> dict), in its own format version, the digest recomputed as an attacker would (``rehash``)."""
    meta, stored = read_artifact(src)
    meta = metadata(meta) if metadata else meta
    stored = tensors(stored) if tensors else stored
    dst.write_bytes(encode_artifact(meta, stored, rehash=rehash))


def graph_doc(path) -> dict:
    return json.loads(read_artifact(path)[0]["graph"])


def with_graph(doc: dict):
    """A metadata edit that replaces the graph document."""
    return lambda meta: {**meta, "graph": json.dumps(doc)}


# ------------------------------------------------------------------------ trainable models (format 5)


class TrainNet(nn.Module):
    """conv + batch norm + dropout + conv + linear: every weight sampled once transformed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.2)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.drop(F.relu(self.bn(self.conv(x))))  # (B, 16, H, W)
        x = F.relu(self.conv2(x))  # (B, 16, H, W)
        return self.fc(x.mean((2, 3)))  # (B, 10)


def trainable_model(**changes) -> fx.GraphModule:
    """``TrainNet`` transformed with every weight sampled (random pools: no fit), in train mode."""
    import nesc

    torch.manual_seed(0)
    settings = dict(ratio=2, min_params=16, keep_first=False, keep_classifier=False, init="random", **changes)
    return nesc.transform(TrainNet(), (torch.randn(*SHAPE),), **settings).train()


def relocate(gm: fx.GraphModule, moves: dict[str, str]) -> fx.GraphModule:
    """Move parameters (pools) and modules (samplers) of ``gm`` to other paths of its module tree, the
    graph's get_attr / call_module targets with them, as a pass that places pools on submodules does."""
    for old, new in moves.items():
        owner_path, _, leaf = old.rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, leaf)
        delattr(owner, leaf)
        if isinstance(value, nn.Module):
            gm.add_submodule(new, value)
        else:
            parent_path, _, new_leaf = new.rpartition(".")
            try:
                parent = gm.get_submodule(parent_path)
            except AttributeError:
                gm.add_submodule(parent_path, nn.Module())
                parent = gm.get_submodule(parent_path)
            parent.register_parameter(new_leaf, value)
        for node in gm.graph.nodes:
            if node.op in ("get_attr", "call_module") and node.target == old:
                node.target = new
    gm.graph.lint()
    gm.recompile()
    return gm
