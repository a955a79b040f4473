"""Output structures of saved models: a type registered in the loading process is restored; an unknown
one comes back as a plain dict/tuple of the same structure with a warning naming it; a file's type
names are never imported (a defaultdict's factory module included)."""

from __future__ import annotations

import collections
import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import nesc
from nesc.core import compat
from nesc.core.errors import ArtifactError, NescWarning
from nesc.serialize import load, save
from serialize_cases import graph_doc, rewrite, with_graph

Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass
class Pair:
    first: torch.Tensor
    second: torch.Tensor


torch.export.register_dataclass(Pair, serialized_type_name="nesc_tests.Pair")


class Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc, self.kind = nn.Linear(4, 3), kind

    def forward(self, x):
        y = self.fc(x)  # (B, 3)
        return Point(y, y * 2) if self.kind == "namedtuple" else Pair(y, y - 1)


def _saved(model: nn.Module, example, tmp_path):
    gm = nesc.capture(model.eval(), example)
    save(gm, tmp_path / "m.nesc")
    return gm, tmp_path / "m.nesc"


def _load_quietly(path):
    with pytest.warns(NescWarning) as record:
        loaded = load(path)
    return loaded, " ".join(str(w.message) for w in record)


def test_a_registered_dataclass_is_restored_and_an_unknown_one_is_a_dict(tmp_path, monkeypatch) -> None:
    gm, path = _saved(Returns("dataclass"), (torch.randn(2, 4),), tmp_path)
    x = torch.randn(2, 4)
    out, want = load(path)(x), gm(x)
    assert isinstance(out, Pair) and torch.equal(out.first, want.first) and torch.equal(out.second, want.second)
    known = compat.pytree_type_registered
    monkeypatch.setattr(compat, "pytree_type_registered", lambda name: name != "nesc_tests.Pair" and known(name))
    loaded, message = _load_quietly(path)
    out = loaded(x)
    assert type(out) is dict and list(out) == ["first", "second"] and torch.equal(out["second"], want.second)
    assert "nesc_tests.Pair as a dict" in message and "import its module" in message


def test_a_namedtuple_without_a_serialized_name_saves_and_comes_back_as_a_tuple(tmp_path) -> None:
    gm, path = _saved(Returns("namedtuple"), (torch.randn(2, 4),), tmp_path)
    loaded, message = _load_quietly(path)
    x = torch.randn(2, 4)
    out, want = loaded(x), gm(x)
    assert type(out) is tuple and len(out) == 2 and all(map(torch.equal, out, want))
    assert f"{__name__}.Point as a tuple" in message


def test_a_transformers_output_loads_without_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=16, patch_size=8)
    x = torch.randn(1, 3, 16, 16)
    gm, path = _saved(transformers.ViTModel(config), (x,), tmp_path)
    want = gm(x)
    assert type(load(path)(x)).__name__ == "BaseModelOutputWithPooling"  # registered here: restored
    torch.save({"x": x, "last": want.last_hidden_state}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import sys, warnings, torch, nesc
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = nesc.load({str(path)!r})
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        got = out(ref["x"])
        assert type(got) is dict and torch.equal(got["last_hidden_state"], ref["last"]), got.keys()
        assert "transformers" not in sys.modules
        print("|".join(str(m.message) for m in w))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "transformers.modeling_outputs.BaseModelOutputWithPooling as a dict" in run.stdout
    assert "import its module before nesc.load (transformers.modeling_outputs)" in run.stdout


LEAF = {"type": None, "context": None, "children_spec": []}
# forward(x): args (x,), no kwargs, as treespec_dumps writes it
ONE_ARGUMENT = json.dumps([1, {"type": "builtins.tuple", "context": "null", "children_spec": [
    {"type": "builtins.tuple", "context": "null", "children_spec": [LEAF]},
    {"type": "builtins.dict", "context": "[]", "children_spec": []}]}])


def _with_out_spec(src, dst, spec) -> None:
    doc = graph_doc(src)
    doc["codegen"] = {"kind": "pytree", "orig_args": ["x"], "in_spec": ONE_ARGUMENT, "out_spec": json.dumps([1, spec])}
    rewrite(src, dst, metadata=with_graph(doc))


def test_a_defaultdict_never_imports_its_factory_module(regenerate_file, tmp_path) -> None:
    context = json.dumps({"default_factory_module": "nesc_tests_never_imported", "default_factory_name": "f",
                          "dict_context": ["out"]})
    _with_out_spec(regenerate_file, tmp_path / "dd.nesc",
                   {"type": "collections.defaultdict", "context": context, "children_spec": [LEAF]})
    loaded, message = _load_quietly(tmp_path / "dd.nesc")
    out = loaded(torch.randn(2, 3, 8, 8))
    assert type(out) is dict and list(out) == ["out"] and "nesc_tests_never_imported" not in sys.modules
    assert "collections.defaultdict as a dict" in message


@pytest.mark.parametrize("spec", [{"type": 3, "context": None, "children_spec": []},
                                  {"type": None, "context": "x", "children_spec": []},
                                  {"type": "builtins.tuple", "context": "null", "children_spec": "no"},
                                  {"type": "collections.namedtuple", "context": "[1]", "children_spec": [LEAF]}])
def test_a_malformed_tree_is_the_projects_error(regenerate_file, tmp_path, spec) -> None:
    _with_out_spec(regenerate_file, tmp_path / "bad.nesc", spec)
    with pytest.raises(ArtifactError, match="invalid artifact"):
        load(tmp_path / "bad.nesc")
