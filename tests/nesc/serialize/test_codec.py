"""nesc.serialize.codec: values survive JSON, and a graph description is a schema, not code: names must
be identifiers, node kinds and call targets come from fixed lists, and failures are listed together."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nesc.core.errors import ArtifactError
from nesc.serialize import load, save
from nesc.serialize.codec import Invalid, decode, encode
from nesc.serialize.ops import PY_FUNCTIONS
from serialize_cases import load_error, read_artifact, rewrite_metadata, traced

VALUES = [None, True, 3, 2.5, "conv2d", [1, [2, 3]], (1, (2,)), {"a": 1, 2: (3,)}, float("inf"), float("-inf"),
          slice(0, None, 2), Ellipsis, torch.device("cpu"), torch.float16, torch.strided, torch.channels_last]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_survive_json(value):
    text = json.dumps(encode(value), allow_nan=False)  # strict JSON: inf travels as a tagged string
    assert decode(json.loads(text), {}) == value


@pytest.mark.parametrize("doc", [{"$node": "x"}, {"$eval": "1"}, {"$dtype": "Tensor"}, {"$tuple": [], "$dict": []}],
                         ids=["undefined-node", "unknown-tag", "not-a-dtype", "two-tags"])
def test_malformed_values_are_invalid(doc):
    with pytest.raises(Invalid):
        decode(doc, {})


def test_the_python_allow_list_is_arithmetic_only():
    assert {"operator.getitem", "operator.add", "math.ceil", "torch.sym_max"} <= PY_FUNCTIONS.keys()
    assert not {"operator.attrgetter", "operator.methodcaller", "operator.call"} & PY_FUNCTIONS.keys()


# ------------------------------------------------------------------------------ load errors


@pytest.mark.parametrize(
    "graph, expected",
    [
        ("{not json", "header JSON"),
        (json.dumps({"nodes": [{"op": "placeholder", "name": "x; import os", "target": "x"}]}), "identifier"),
        (json.dumps({"nodes": [{"op": "call_method", "name": "m", "target": "m"}]}), "not one nesc writes"),
        (json.dumps({"nodes": [{"op": "call_module", "name": "m", "target": "m"}]}), "not a trainable module"),
    ],
    ids=["not-json", "code-in-a-name", "unknown-op-kind", "a-module-a-frozen-file-does-not-have"],
)
def test_invalid_graph_description(regenerate_file, tmp_path, graph, expected):
    path = tmp_path / "edited.nesc"
    rewrite_metadata(regenerate_file, path, graph=graph)
    msg = load_error(path)
    assert "invalid artifact" in msg and expected in msg


def test_unknown_operators_are_listed_together(regenerate_file, tmp_path):
    graph = read_artifact(regenerate_file)[0]["graph"]
    graph = graph.replace("aten::relu.default", "aten::no_such_op.default")
    graph = graph.replace("nesc::regenerate.default", "nesc::regenerate_v9.default")
    path = tmp_path / "unknown_op.nesc"
    rewrite_metadata(regenerate_file, path, graph=graph)
    msg = load_error(path)
    assert "2 call(s)" in msg and "aten::no_such_op is not on nesc's allow-list" in msg
    assert "nesc::regenerate_v9 is not on nesc's allow-list" in msg and "nesc.serialize.ops" in msg


def test_only_arithmetic_python_functions_resolve(regenerate_file, tmp_path):
    # operator.attrgetter / methodcaller / call would let a crafted file walk to arbitrary Python.
    graph = read_artifact(regenerate_file)[0]["graph"].replace("aten::relu.default", "operator.attrgetter")
    path = tmp_path / "crafted.nesc"
    rewrite_metadata(regenerate_file, path, graph=graph)
    assert "'operator.attrgetter' is neither" in load_error(path)


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
    gm = traced(NoGrad(), shape=(2, 4))
    with pytest.raises(ArtifactError) as info:
        save(gm, tmp_path / "m.nesc")
    msg = str(info.value)
    assert msg.count("target torch.ops.higher_order.wrap_with_set_grad_enabled") == 2
    assert "cannot be written as data" in msg
    assert not (tmp_path / "m.nesc").exists()


def test_a_pytree_signature_round_trips(tmp_path):
    class Pair(nn.Module):
        def forward(self, x):
            return {"double": x * 2, "parts": (x + 1, x - 1)}

    gm = traced(Pair(), shape=(2, 4))
    save(gm, tmp_path / "m.nesc")
    loaded = load(tmp_path / "m.nesc")
    x = torch.randn(2, 4)
    out, want = loaded(x), gm(x)
    assert out.keys() == want.keys() and isinstance(out["parts"], tuple)  # a dict stays a dict
    assert torch.equal(out["double"], want["double"]) and all(map(torch.equal, out["parts"], want["parts"]))
