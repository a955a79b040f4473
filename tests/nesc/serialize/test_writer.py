"""nesc.serialize.writer: ``save`` re-exports exactly (any batch, regenerate nodes kept), writes
safetensors without pickle, and refuses what it cannot write."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import fx, nn

from nesc.core import names
from nesc.core.errors import ArtifactError
from nesc.serialize import FROZEN_VERSION, load, save
from serialize_cases import (REGENERATE, SHAPE, ConvNet, assert_same_tensors, header, read_artifact, traced,
                             with_regenerate)


def test_round_trip_is_bit_exact(saved):
    gm, path = saved
    loaded = load(path)
    assert not loaded.training
    assert_same_tensors(gm, loaded)
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
    gm = traced(ConvNet(), shape=(1, *SHAPE[1:]))  # export would specialise a batch of 1
    save(gm, tmp_path / "m.nesc")
    loaded = load(tmp_path / "m.nesc")
    x = torch.randn(3, *SHAPE[1:])
    assert torch.equal(loaded(x), gm.eval()(x))


def test_regenerate_node_survives_as_one_node_with_its_meta(regenerate_file):
    loaded = load(regenerate_file)
    (node,) = [n for n in loaded.graph.nodes if n.target is REGENERATE]
    assert node.meta[names.SAMPLED_WEIGHT] == "conv.weight"
    pool, starts, fracs, scale = node.args[:4]
    assert [a.op for a in (pool, starts, fracs, scale)] == ["get_attr"] * 4
    assert (pool.target, starts.target) == ("nesc_pool_0", "nesc_routes.conv_weight.starts")
    assert scale.target == "nesc_routes.conv_weight.scale" and scale.target in loaded.state_dict()
    assert loaded.get_buffer(scale.target).dtype == torch.float64 and float(loaded.get_buffer(scale.target)) == 1.0
    assert node.args[4:] == ([8, 3, 3, 3], [4, 3], "conv2d")
    assert isinstance(loaded.nesc_pool_0, nn.Parameter)
    assert loaded.get_buffer("nesc_routes.conv_weight.starts").dtype == torch.int32
    assert "conv.weight" not in loaded.state_dict()  # the weight is regenerated, never stored


def test_resaving_a_loaded_model_is_exact(regenerate_file, tmp_path):
    first = load(regenerate_file)
    save(first, tmp_path / "again.nesc")
    second = load(tmp_path / "again.nesc")
    assert_same_tensors(first, second)
    regenerated = [n.meta.get(names.SAMPLED_WEIGHT) for n in second.graph.nodes if n.target is REGENERATE]
    assert regenerated == ["conv.weight"]
    x = torch.randn(*SHAPE)
    assert torch.equal(first(x), second(x))


def test_file_is_safetensors_and_nothing_pickles(monkeypatch, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    gm = with_regenerate(traced(ConvNet()))
    path = tmp_path / "m.nesc"
    save(gm, path)
    loaded = load(path)
    x = torch.randn(*SHAPE)
    assert torch.equal(loaded(x), gm.eval()(x))
    raw = header(path)
    md = raw.pop("__metadata__")
    assert md["format"] == "nesc" and md["format_version"] == str(FROZEN_VERSION)
    assert md.keys() == {"format", "format_version", "nesc_version", "torch_version", "sha256"}
    assert {name: entry["dtype"] for name, entry in raw.items()} == {"documents": "U8", "data": "U8"}
    documents, _ = read_artifact(path)
    assert {"graph", "tensors", "input_specs", "extra", "layout"} <= documents.keys()
    nodes = json.loads(documents["graph"])["nodes"]
    assert not any(n["op"] == "call_module" for n in nodes)  # _guards_fn dropped, nothing opaque
    assert {"nesc::regenerate.default", "aten::conv2d.default"} <= {n["target"] for n in nodes}


def test_save_needs_input_specs_and_json_extra(tmp_path):
    gm = fx.symbolic_trace(ConvNet())
    with pytest.raises(ArtifactError, match="nesc_input_specs"):
        save(gm, tmp_path / "m.nesc")
    gm.meta[names.INPUT_SPECS] = [(SHAPE, "float32")]
    with pytest.raises(ArtifactError, match="JSON-serialisable"):
        save(gm, tmp_path / "m.nesc", extra={"model": ConvNet()})


def test_a_trainable_model_saves_quietly_and_loads_trainable(tmp_path, capsys):
    """Format 5 (``test_trainable.py`` has the rest): another model, saved without printing anything."""
    import nesc
    from helpers import COMPRESS_ALL, StageNet, stage_net_inputs

    gm = nesc.transform(StageNet(), stage_net_inputs(), init="random", ratio=2, **COMPRESS_ALL)
    capsys.readouterr()
    nesc.save(gm, tmp_path / "m.nesc")
    out = capsys.readouterr()
    assert out.out == out.err == ""  # no graph printed
    loaded = nesc.load(tmp_path / "m.nesc").train()
    x = stage_net_inputs()
    torch.manual_seed(1)  # the same dropout mask for both
    a = gm.train()(*x)
    torch.manual_seed(1)
    b = loaded(*x)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    pa, pb = dict(gm.named_parameters()), dict(loaded.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k].grad, pb[k].grad) for k in pa)
