"""nesc.serialize: one safetensors file, exact round trip, any batch, train/eval, no pickle, clear errors.

Models are built here by hand: a conv + batch norm + ReLU + dropout + linear net captured with
``symbolic_trace``, and the same net with its conv weight replaced by a ``nesc.regenerate`` node
reading a pool and a routing map, as ``passes.freeze`` leaves it. Each model is saved once per module
(the first ``torch.export`` dominates the run time); the error tests edit copies of those files.
"""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import fx, nn

import nesc.core.modules  # noqa: F401 - registers torch.ops.nesc.regenerate
from nesc.core import names
from nesc.core.errors import ArtifactError
from nesc.serialize import EXTRA, FORMAT_VERSION, load, save

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


def _traced(model: nn.Module, shape=SHAPE) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    gm.meta[names.INPUT_SPECS] = [(tuple(shape), "float32")]
    _ = gm.eval()(torch.randn(*shape))  # one eval pass gives the batch-norm statistics nontrivial values
    return gm


def _with_regenerate(gm: fx.GraphModule) -> fx.GraphModule:
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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, tuple[fx.GraphModule, object]]:
    """{kind: (saved module in eval mode, path of its artifact)}, each model saved once per module."""
    out = {}
    for kind in ("plain", "regenerate"):
        torch.manual_seed(0)
        gm = _traced(ConvNet())
        if kind == "regenerate":
            gm = _with_regenerate(gm)
        path = tmp_path_factory.mktemp(kind) / "model.nesc"
        save(gm, path, extra={"report": {"ratio": 0.25, "layers": ["conv"]}})
        out[kind] = (gm.eval(), path)
    return out


@pytest.fixture(params=["plain", "regenerate"])
def saved(request, artifacts):
    return artifacts[request.param]


@pytest.fixture
def regenerate_file(artifacts):
    return artifacts["regenerate"][1]


def _assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    assert {n for n, _ in a.named_parameters()} == {n for n, _ in b.named_parameters()}


# --------------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(saved):
    gm, path = saved
    loaded = load(path)
    assert not loaded.training
    _assert_same_tensors(gm, loaded)
    x = torch.randn(*SHAPE)
    assert torch.equal(loaded(x), gm(x))
    loaded.graph.lint()


def test_loaded_module_runs_at_other_batch_sizes(saved):
    gm, path = saved
    loaded = load(path)
    for batch in (1, 5):
        x = torch.randn(batch, *SHAPE[1:])
        assert torch.equal(loaded(x), gm(x))


def test_batch_one_example_keeps_the_batch_symbolic(tmp_path):
    gm = _traced(ConvNet(), shape=(1, *SHAPE[1:]))  # export would specialise a batch of 1
    save(gm, tmp_path / "m.nesc")
    loaded = load(tmp_path / "m.nesc")
    x = torch.randn(3, *SHAPE[1:])
    assert torch.equal(loaded(x), gm.eval()(x))


def test_regenerate_node_survives_as_one_node_with_its_meta(regenerate_file):
    loaded = load(regenerate_file)
    (node,) = [n for n in loaded.graph.nodes if n.target is REGENERATE]
    assert node.meta[names.SAMPLED_WEIGHT] == "conv.weight"
    pool, starts, fracs = node.args[:3]
    assert [a.op for a in (pool, starts, fracs)] == ["get_attr"] * 3
    assert (pool.target, starts.target) == ("nesc_pool_0", "nesc_routes.conv_weight.starts")
    assert node.args[3:] == (1.0, [8, 3, 3, 3], [4, 3], "conv2d")
    assert isinstance(loaded.nesc_pool_0, nn.Parameter)
    assert loaded.get_buffer("nesc_routes.conv_weight.starts").dtype == torch.int32
    assert "conv.weight" not in loaded.state_dict()  # the weight is regenerated, never stored


def test_resaving_a_loaded_model_is_exact(regenerate_file, tmp_path):
    first = load(regenerate_file)
    save(first, tmp_path / "again.nesc")
    second = load(tmp_path / "again.nesc")
    _assert_same_tensors(first, second)
    regenerated = [n.meta.get(names.SAMPLED_WEIGHT) for n in second.graph.nodes if n.target is REGENERATE]
    assert regenerated == ["conv.weight"]
    x = torch.randn(*SHAPE)
    assert torch.equal(first(x), second(x))


def test_metadata_comes_back(saved):
    _, path = saved
    loaded = load(path)
    assert loaded.meta[EXTRA] == {"report": {"ratio": 0.25, "layers": ["conv"]}}
    assert loaded.meta[names.INPUT_SPECS] == [(SHAPE, "float32")]


def test_train_and_eval_switch_dropout_and_batch_norm(saved):
    gm, path = saved
    loaded = load(path)
    x = torch.randn(*SHAPE)
    tracked = loaded.get_buffer("bn.num_batches_tracked")
    before = int(tracked)
    assert torch.equal(loaded(x), loaded(x))  # eval: deterministic, statistics untouched
    assert int(tracked) == before
    loaded.train()
    assert not torch.equal(loaded(x), loaded(x))  # dropout draws a new mask every call
    assert int(tracked) == before + 2
    assert not torch.equal(loaded.get_buffer("bn.running_mean"), gm.get_buffer("bn.running_mean"))
    loaded.eval()
    assert torch.equal(loaded(x), loaded(x))


def test_tied_noncontiguous_sequential_and_cumulative_bn(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(6, 6))  # the path a.0.weight has a digit atom
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a[0].weight  # tied: stored once, tied again after load
            self.t = nn.Parameter(torch.randn(4, 6).t())  # non-contiguous (6, 4)
            self.bn = nn.BatchNorm1d(4, momentum=None)  # cumulative average

        def forward(self, x):
            return self.bn(self.b(self.a(x)) @ self.t)

    gm = _traced(Tied(), shape=(3, 6))
    save(gm, tmp_path / "m.nesc")
    loaded = load(tmp_path / "m.nesc")
    assert loaded.get_parameter("a.0.weight") is loaded.b.weight
    assert loaded.t.stride() == gm.t.stride() == (1, 6)  # the layout comes back, not just the values
    _assert_same_tensors(gm, loaded)
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), gm.eval()(x))
    (bn,) = [m for m in loaded.modules() if hasattr(m, "momentum") and hasattr(m, "eps")]
    assert bn.momentum is None


# ------------------------------------------------------------------------------- the format


def _header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def test_file_is_safetensors_and_nothing_pickles(monkeypatch, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    gm = _with_regenerate(_traced(ConvNet()))
    path = tmp_path / "m.nesc"
    save(gm, path)
    loaded = load(path)
    x = torch.randn(*SHAPE)
    assert torch.equal(loaded(x), gm.eval()(x))
    md = _header(path)["__metadata__"]
    assert md["format"] == "nesc" and md["format_version"] == str(FORMAT_VERSION)
    assert {"nesc_version", "torch_version", "graph", "tensors", "input_specs", "extra", "sha256"} <= md.keys()
    nodes = json.loads(md["graph"])["nodes"]
    assert not any(n["op"] == "call_module" for n in nodes)  # _guards_fn dropped, nothing opaque
    assert {"nesc::regenerate.default", "aten::conv2d.default"} <= {n["target"] for n in nodes}


# ------------------------------------------------------------------------------------ errors


def _rewrite_metadata(src, dst, **changes) -> None:
    """Copy an artifact with some metadata fields replaced; a well-formed header, only the values change."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _load_error(path) -> str:
    with pytest.raises(ArtifactError) as info:
        load(path)
    return str(info.value)


def test_missing_file(tmp_path):
    msg = _load_error(tmp_path / "nope.nesc")
    assert "nope.nesc" in msg and "no such file" in msg


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.nesc"
    path.write_text("these are my notes, not a model\n" * 4)
    assert "not a readable safetensors file" in _load_error(path)


def test_truncated_file(regenerate_file, tmp_path):
    path = tmp_path / "cut.nesc"
    path.write_bytes(regenerate_file.read_bytes()[:-16])
    msg = _load_error(path)
    assert "not a readable safetensors file" in msg and "truncated" in msg


def test_flipped_byte_in_tensor_data(regenerate_file, tmp_path):
    raw = bytearray(regenerate_file.read_bytes())
    raw[-3] ^= 0xFF
    path = tmp_path / "flipped.nesc"
    path.write_bytes(bytes(raw))
    msg = _load_error(path)
    assert "sha256" in msg and "tampered" in msg


def test_plain_safetensors_file_is_not_a_nesc_artifact(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    msg = _load_error(path)
    assert "not a nesc artifact" in msg and "safetensors.torch.load_file" in msg


def test_newer_format_version(regenerate_file, tmp_path):
    path = tmp_path / "future.nesc"
    _rewrite_metadata(regenerate_file, path, format_version=str(FORMAT_VERSION + 1), nesc_version="9.0")
    msg = _load_error(path)
    assert f"format_version '{FORMAT_VERSION + 1}'" in msg  # what the file has
    assert f"reads format_version {FORMAT_VERSION}" in msg  # what this nesc reads
    assert "nesc 9.0" in msg and "re-save" in msg  # how to fix


@pytest.mark.parametrize(
    "graph, expected",
    [
        ("{not json", "invalid graph description"),
        (json.dumps({"nodes": [{"op": "placeholder", "name": "x; import os", "target": "x"}]}), "identifier"),
        (json.dumps({"nodes": [{"op": "call_module", "name": "m", "target": "m"}]}), "not one nesc writes"),
    ],
    ids=["not-json", "code-in-a-name", "unknown-op-kind"],
)
def test_invalid_graph_description(regenerate_file, tmp_path, graph, expected):
    path = tmp_path / "edited.nesc"
    _rewrite_metadata(regenerate_file, path, graph=graph)
    msg = _load_error(path)
    assert "invalid graph description" in msg and expected in msg


def test_unknown_operators_are_listed_together(regenerate_file, tmp_path):
    graph = _header(regenerate_file)["__metadata__"]["graph"]
    graph = graph.replace("aten::relu.default", "aten::no_such_op.default")
    graph = graph.replace("nesc::regenerate.default", "nesc::regenerate_v9.default")
    path = tmp_path / "unknown_op.nesc"
    _rewrite_metadata(regenerate_file, path, graph=graph)
    msg = _load_error(path)
    assert "2 operator(s)" in msg and "aten::no_such_op.default" in msg and "nesc::regenerate_v9.default" in msg
    assert "Import the library that registers them" in msg


def test_only_arithmetic_python_functions_resolve(regenerate_file, tmp_path):
    # operator.attrgetter / methodcaller / call would let a crafted file walk to arbitrary Python.
    graph = _header(regenerate_file)["__metadata__"]["graph"].replace("aten::relu.default", "operator.attrgetter")
    path = tmp_path / "crafted.nesc"
    _rewrite_metadata(regenerate_file, path, graph=graph)
    assert "unknown function 'operator.attrgetter'" in _load_error(path)


# ------------------------------------------------------------------------------ save errors


@torch.fx.wrap
def _no_grad_twice(x):
    # Export turns each no_grad block into a higher-order op calling a subgraph module: not data.
    with torch.no_grad():
        x = x + 1
    with torch.no_grad():
        return x * 2


class NoGrad(nn.Module):
    def forward(self, x):
        return _no_grad_twice(x)


def test_unencodable_nodes_are_listed_together(tmp_path):
    gm = _traced(NoGrad(), shape=(2, 4))
    with pytest.raises(ArtifactError) as info:
        save(gm, tmp_path / "m.nesc")
    msg = str(info.value)
    assert msg.count("target torch.ops.higher_order.wrap_with_set_grad_enabled") == 2
    assert "cannot be written as data" in msg
    assert not (tmp_path / "m.nesc").exists()


def test_save_needs_input_specs_and_json_extra(tmp_path):
    gm = fx.symbolic_trace(ConvNet())
    with pytest.raises(ArtifactError, match="nesc_input_specs"):
        save(gm, tmp_path / "m.nesc")
    gm.meta[names.INPUT_SPECS] = [(SHAPE, "float32")]
    with pytest.raises(ArtifactError, match="JSON-serialisable"):
        save(gm, tmp_path / "m.nesc", extra={"model": ConvNet()})
