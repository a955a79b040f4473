"""Artifacts as an attacker writes them: code in names and keyword arguments, file-touching ops,
in-place writes into inputs and weights, deep JSON, edited tensors with a recomputed digest. Each is
refused with the project's ``ArtifactError`` and without any side effect; any name PyTorch accepts
(torchvision's ``block1-0``, ``a b``) saves and loads, a name where code would read it must be one fx
writes safely, and no name may replace an attribute of the rebuilt module."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from nesc.core import names
from nesc.serialize import FROZEN_VERSION, load, save
from nesc.core.errors import ArtifactError
from serialize_cases import (encode_artifact, graph_doc, header, load_error, read_artifact, rewrite, rewrite_metadata,
                             traced, with_graph)

MARKER = "nesc_untrusted_test_ran"


@pytest.fixture
def audit():
    """Records every file opened, process started and module imported while the test body runs."""
    events: list[tuple[str, tuple]] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event in ("open", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "import"):
            events.append((event, args))

    sys.addaudithook(hook)  # hooks cannot be removed: switch it off after the test
    yield events
    active[0] = False


def _opened(events) -> list[str]:
    return [str(args[0]) for event, args in events if event == "open" and isinstance(args[0], str)]


def _first(doc: dict, op: str) -> dict:
    return next(n for n in doc["nodes"] if n["op"] == op)


def test_code_in_a_keyword_argument_name_never_runs(regenerate_file, tmp_path, audit) -> None:
    doc = graph_doc(regenerate_file)
    call = next(n for n in doc["nodes"] if n["op"] == "call_function")
    call["kwargs"] = {f"x=1)\r__import__('builtins').{MARKER}=1\r#": 1}
    rewrite(regenerate_file, tmp_path / "kw.nesc", metadata=with_graph(doc))
    audit.clear()
    assert "keyword argument" in load_error(tmp_path / "kw.nesc")
    assert not hasattr(__import__("builtins"), MARKER)
    assert [p for p in _opened(audit) if "kw.nesc" not in p] == []


@pytest.mark.parametrize("field, value, expected", [
    ("name", "x\rimport os", "not a Python identifier"),
    ("name", "self", "not a Python identifier"),
    ("target", 'conv")\rimport os\r#', "not a stored tensor"),
])
def test_code_in_names_and_paths_is_refused(regenerate_file, tmp_path, field, value, expected) -> None:
    doc = graph_doc(regenerate_file)
    node = _first(doc, "placeholder" if field == "name" else "get_attr")
    node[field] = value
    rewrite(regenerate_file, tmp_path / "crafted.nesc", metadata=with_graph(doc))
    assert expected in load_error(tmp_path / "crafted.nesc")


def _renamed(src, dst, old: str, new: str, *, in_graph: bool) -> None:
    """Copy of ``src`` whose tensor ``old`` is called ``new`` in the tensor table and the stored tensors
    (and, ``in_graph``, in the get_attr nodes that read it), the digest recomputed."""
    def meta(m):
        table = json.loads(m["tensors"])
        table[new] = table.pop(old)
        graph = m["graph"]
        if in_graph:
            doc = json.loads(graph)
            for node in doc["nodes"]:
                if node["op"] == "get_attr" and node["target"] == old:
                    node["target"] = new
            graph = json.dumps(doc)
        return {**m, "tensors": json.dumps(table), "graph": graph}

    rewrite(src, dst, metadata=meta, tensors=lambda t: {(new if k == old else k): v for k, v in t.items()})


@pytest.mark.parametrize("evil", ['conv.a"),__import__("builtins").' + MARKER + '=1,("', "conv.for", "conv.a\\",
                                  "conv.a\nb"])
def test_a_tensor_path_that_would_end_a_string_in_generated_code_is_refused(regenerate_file, tmp_path, evil) -> None:
    _renamed(regenerate_file, tmp_path / "path.nesc", "conv.bias", evil, in_graph=True)
    assert "cannot be written into the module's code" in load_error(tmp_path / "path.nesc")
    assert not hasattr(__import__("builtins"), MARKER)


def test_any_name_torch_accepts_is_data_where_no_code_reads_it(regenerate_file, tmp_path) -> None:
    """A tensor the graph does not read may have any name torch accepts, quotes and keywords included:
    it is registered through nn.Module, never written into code."""
    evil = 'a"),__import__("builtins").' + MARKER + '=1,("'

    def meta(m):
        table = json.loads(m["tensors"])
        table[f"extra.{evil}"] = table["extra.for"] = {"kind": "buffer"}
        return {**m, "tensors": json.dumps(table)}

    rewrite(regenerate_file, tmp_path / "data.nesc", metadata=meta,
            tensors=lambda t: {**t, f"extra.{evil}": torch.ones(2), "extra.for": torch.zeros(3)})
    loaded = load(tmp_path / "data.nesc")
    assert torch.equal(loaded.get_buffer(f"extra.{evil}"), torch.ones(2))
    assert torch.equal(loaded.get_buffer("extra.for"), torch.zeros(3))
    assert not hasattr(__import__("builtins"), MARKER)


# Attributes of the rebuilt GraphModule (and of every nn.Module) that a tensor name must never replace.
INTERNALS = ["graph", "code", "forward", "meta", "training", "_code", "_graph", "__class__", "__dict__",
             "_parameters", "_modules", "recompile", "conv.forward", "conv.training", "bn.__class__",
             "conv.bias.data", "fc.weight.T"]


@pytest.mark.parametrize("name", INTERNALS)
def test_a_tensor_named_like_a_module_internal_is_refused_not_installed(regenerate_file, tmp_path, name) -> None:
    def meta(m):
        table = json.loads(m["tensors"])
        table[name] = {"kind": "constant"}
        return {**m, "tensors": json.dumps(table)}

    rewrite(regenerate_file, tmp_path / "clash.nesc", metadata=meta, tensors=lambda t: {**t, name: torch.zeros(1)})
    msg = load_error(tmp_path / "clash.nesc")
    assert "clashes with a module attribute" in msg or "runs through a non-module" in msg, msg
    # the class the loader builds is untouched: a fresh file still loads and runs
    assert isinstance(load(regenerate_file)(torch.randn(2, 3, 8, 8)), torch.Tensor)


def test_ops_that_touch_files_are_refused_before_anything_runs(regenerate_file, tmp_path, audit) -> None:
    doc = graph_doc(regenerate_file)
    out = _first(doc, "output")
    read = {"op": "call_function", "name": "leak", "target": "aten::from_file.default",
            "args": ["/etc/passwd"], "kwargs": {"shared": False, "size": 64, "dtype": {"$dtype": "uint8"}}}
    doc["nodes"].insert(doc["nodes"].index(out), read)
    out["args"] = [{"$tuple": [{"$node": "leak"}]}]
    rewrite(regenerate_file, tmp_path / "leak.nesc", metadata=with_graph(doc))
    audit.clear()
    msg = load_error(tmp_path / "leak.nesc")
    assert "aten::from_file is not on nesc's allow-list" in msg
    assert "/etc/passwd" not in _opened(audit)


def test_in_place_writes_into_an_input_or_a_stored_tensor_are_refused(regenerate_file, tmp_path) -> None:
    for target_op in ("placeholder", "get_attr"):
        doc = graph_doc(regenerate_file)
        source = _first(doc, target_op)["name"]
        out = _first(doc, "output")
        doc["nodes"].insert(doc["nodes"].index(out), {"op": "call_function", "name": "overwrite",
                                                      "target": "aten::relu_.default", "args": [{"$node": source}]})
        rewrite(regenerate_file, tmp_path / f"{target_op}.nesc", metadata=with_graph(doc))
        assert "writes into" in load_error(tmp_path / f"{target_op}.nesc"), target_op


def test_deeply_nested_json_is_the_projects_error(regenerate_file, tmp_path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for key in ("graph", "tensors", "extra", "input_specs"):
        rewrite(regenerate_file, tmp_path / f"{key}.nesc", metadata=lambda m, key=key: {**m, key: deep})
        assert "invalid artifact" in load_error(tmp_path / f"{key}.nesc"), key


@pytest.mark.parametrize("extra", ["[]", '"text"', '{"dense_reasons": [1]}', '{"config": 3}'])
def test_extra_must_follow_its_schema(regenerate_file, tmp_path, extra) -> None:
    rewrite(regenerate_file, tmp_path / "extra.nesc", metadata=lambda m: {**m, "extra": extra})
    assert "extra" in load_error(tmp_path / "extra.nesc")


def test_an_edited_header_without_a_new_digest_is_refused(regenerate_file, tmp_path) -> None:
    rewrite(regenerate_file, tmp_path / "edited.nesc", metadata=lambda m: {**m, "extra": "{}"}, rehash=False)
    assert "tampered" in load_error(tmp_path / "edited.nesc")


SCALE = "nesc_routes.conv_weight.scale"


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.__setitem__("nesc_routes.conv_weight.starts", t["nesc_routes.conv_weight.starts"] + 1000),
     "outside its pool"),
    (lambda t: t.__setitem__("nesc_routes.conv_weight.starts", -t["nesc_routes.conv_weight.starts"] - 1),
     "outside its pool"),
    (lambda t: t.__setitem__("nesc_routes.conv_weight.fracs", t["nesc_routes.conv_weight.fracs"] * float("nan")),
     "fractions"),
    (lambda t: t.__setitem__("nesc_routes.conv_weight.starts", t["nesc_routes.conv_weight.starts"][:1]),
     "expected int32"),
    (lambda t: t.__setitem__("nesc_routes.conv_weight.starts", t["nesc_routes.conv_weight.starts"].long()),
     "expected int32"),
    (lambda t: t.__setitem__("fc.weight", t["fc.weight"][:, :3].contiguous()), "does not run on its recorded"),
    # The gain is a stored tensor since format 4: checked like the routing map it belongs to.
    (lambda t: t.__setitem__(SCALE, t[SCALE] * float("inf")), "expected a finite float scalar"),
    (lambda t: t.__setitem__(SCALE, t[SCALE].reshape(1)), "expected a finite float scalar"),
    (lambda t: t.__setitem__(SCALE, t[SCALE].long()), "expected a finite float scalar"),
], ids=["start-too-large", "start-negative", "nan-fraction", "short-routes", "int64-routes", "weight-shape",
        "inf-scale", "scale-shape", "int-scale"])
def test_edited_tensors_with_a_recomputed_digest_are_checked(regenerate_file, tmp_path, edit, expected) -> None:
    def edited(tensors):
        edit(tensors)
        return tensors

    rewrite(regenerate_file, tmp_path / "tensors.nesc", tensors=edited)
    assert expected in load_error(tmp_path / "tensors.nesc")


class Torchvisionish(nn.Module):
    """torchvision names some children ``denseblock1``/``block1-0``: legal module names, not identifiers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("block1-0", nn.Conv2d(3, 4, 3, padding=1))
        self.features.add_module("relu-0", nn.ReLU())

    def forward(self, x):
        return self.features(x).mean((2, 3))


@pytest.mark.parametrize("child", ["block2-1", "a b", "1", "ü", "a'b", "x+y", "match"])
def test_legal_module_names_that_are_not_identifiers_save_and_load(tmp_path, child) -> None:
    model = Torchvisionish()
    model.features.add_module(child, nn.Conv2d(4, 4, 1))
    gm = traced(model)
    save(gm, tmp_path / "tv.nesc")
    loaded = load(tmp_path / "tv.nesc")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), gm.eval()(x))
    assert {"features.block1-0.weight", f"features.{child}.weight"} <= set(dict(loaded.named_parameters()))
    assert loaded.state_dict().keys() == gm.state_dict().keys()


def test_the_digest_covers_the_header(regenerate_file) -> None:
    meta = header(regenerate_file)["__metadata__"]
    assert meta["format_version"] == str(FROZEN_VERSION) and len(meta["sha256"]) == 64
    assert names.NESC_VERSION in meta


@pytest.fixture(scope="module")
def products_file(tmp_path_factory):
    """A frozen cnn1d whose layers share products (``nesc.gather_products`` with its routing maps)."""
    import nesc
    from helpers import registry_inputs, registry_model

    gm = nesc.transform(registry_model("cnn1d"), registry_inputs("cnn1d"),
                        nesc.NESConfig(ratio=4, min_params=128, reuse="outputs", init="random"))
    path = tmp_path_factory.mktemp("products") / "m.nesc"
    nesc.save(nesc.freeze(gm), path)
    return path


def _products_map(tensors) -> str:
    return next(k for k in tensors if k.endswith("_products.starts"))


@pytest.mark.parametrize("edit, expected", [
    (lambda t, k: t.__setitem__(k, t[k] + torch.tensor([1000, 0], dtype=torch.int32)), "group(s) of"),
    (lambda t, k: t.__setitem__(k, t[k] + torch.tensor([0, 1000], dtype=torch.int32)), "group(s) of"),
    (lambda t, k: t.__setitem__(k, -t[k] - 1), "group(s) of"),
    (lambda t, k: t.__setitem__(k, t[k][:1]), "expected int32"),
    (lambda t, k: t.__setitem__(k.replace("starts", "fracs"), t[k.replace("starts", "fracs")] + 2), "fractions"),
], ids=["group-too-large", "row-too-large", "negative", "short", "fraction-above-one"])
def test_an_edited_product_map_is_refused(products_file, tmp_path, edit, expected) -> None:
    def edited(tensors):
        edit(tensors, _products_map(tensors))
        return tensors

    rewrite(products_file, tmp_path / "edited.nesc", tensors=edited)
    assert expected in load_error(tmp_path / "edited.nesc")


def test_torchvision_regnet_compresses_saves_and_loads(tmp_path) -> None:
    """torchvision's RegNet names its blocks ``block1-0``; its 2.14 build runs under .ci/torch214."""
    regnet = pytest.importorskip("torchvision.models.regnet")
    import nesc

    torch.manual_seed(0)
    params = regnet.BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=8)
    model, x = regnet.RegNet(params, num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    frozen = nesc.freeze(nesc.transform(model, (x,), ratio=2, min_params=0, init="random"))
    save(frozen, tmp_path / "regnet.nesc")
    loaded = load(tmp_path / "regnet.nesc")
    assert any("block1-0" in n for n in loaded.state_dict())
    torch.testing.assert_close(loaded(x), frozen(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- trainable models (format 5)

CONV = "nesc_samplers.conv_weight"  # a sampler with a learner in the "learner" artifact (reads the input x)


def _spec(docs) -> dict:
    return docs["trainable"]["samplers"][CONV]


def _call(docs) -> dict:
    return next(n for n in docs["graph"]["nodes"] if n["op"] == "call_module" and n["target"] == CONV)


def _rename_sampler(docs, tensors, new: str) -> None:
    docs["trainable"]["samplers"][new] = docs["trainable"]["samplers"].pop(CONV)
    _call(docs)["target"] = new
    for name in [n for n in docs["tensors"] if n.startswith(CONV + ".")]:
        moved = new + name[len(CONV):]
        docs["tensors"][moved] = docs["tensors"].pop(name)
        tensors[moved] = tensors.pop(name)


def _set(key, value):
    return lambda docs, tensors: _spec(docs).__setitem__(key, value)


def _tensor(leaf, fn):
    return lambda docs, tensors: tensors.__setitem__(f"{CONV}.{leaf}", fn(tensors[f"{CONV}.{leaf}"]))


def _both_in_channels(docs, tensors) -> None:
    """A learner consistent with its own tensors but not with the features the graph gives it."""
    _spec(docs)["learner"]["in_channels"] = 5
    w = tensors[f"{CONV}.learner.fc.weight"]
    tensors[f"{CONV}.learner.fc.weight"] = torch.zeros(w.shape[0], 5)


# name: (edit of the parsed documents {"trainable", "graph", "tensors"} and the stored tensors, expected text)
TRAINABLE_EDITS = {
    "a module type off the allow-list": (_set("type", "builtins.eval"), "is not one nesc builds"),
    "an unknown key": (_set("factory", "os.system"), "has keys"),
    "a huge sampling width": (_set("width", 1e9), "width"),
    "a NaN sampling width": (_set("width", float("nan")), "width"),
    "an unknown tie": (_set("tied", "sideways"), "tied"),
    "an unknown layout": (_set("layout", "conv3d"), "layout"),
    "a block larger than the pool": (_set("block", [10**6, 1]), "block"),
    "a weight shape its starts do not have": (_set("shape", [32, 3, 3, 3]), "starts"),
    "a learner input width its weight does not have": (lambda d, t: _spec(d)["learner"].update(in_channels=7),
                                                       "learner.fc: weight"),
    "learner tensors without a learner": (_set("learner", None), "holds"),
    "a learner channel axis other than 1 or -1": (lambda d, t: _spec(d)["learner"].update(channel_dim=2),
                                                 "channel_dim"),
    "a learner momentum above 1": (lambda d, t: _spec(d)["learner"].update(momentum=3.0), "momentum"),
    "a learner reading the wrong number of channels": (_both_in_channels, "its learner reads 5 channels"),
    "integer starts": (_tensor("starts", lambda s: s.long()), "floating point"),  # refused as a parameter
    "integer origin": (_tensor("origin", lambda s: s.long()), "expected a float tensor"),
    "a NaN start": (_tensor("starts", lambda s: s.clone().fill_(float("nan"))), "non-finite"),
    "a float32 gain": (_tensor("scale", lambda s: s.float()), "float64"),
    "a tensor too many under a sampler": (lambda d, t: (d["tensors"].__setitem__(f"{CONV}.evil", {"kind": "buffer"}),
                                                        t.__setitem__(f"{CONV}.evil", torch.ones(1))), "holds"),
    "a sampler path that would end a string in code": (lambda d, t: _rename_sampler(d, t, 'a"),print(1),("'),
                                                       "cannot be written into the module's code"),
    "a sampler at a path holding other tensors": (lambda d, t: d["trainable"]["samplers"].__setitem__(
        "conv", d["trainable"]["samplers"][CONV]), "holds"),
    "a call of an undeclared module": (lambda d, t: _call(d).__setitem__("target", "bn"), "not a trainable module"),
    "a call of a declared module that is no sampler": (lambda d, t: _call(d).__setitem__("target", "nesc_mode_0"),
                                                       "not a trainable module"),
    "a pool of another shape": (lambda d, t: _call(d)["args"][0].__setitem__("$node", next(
        n["name"] for n in d["graph"]["nodes"] if n["op"] == "get_attr" and n["target"] == "conv.bias")), "pool"),
    "a third argument": (lambda d, t: _call(d)["args"].append(1), "positionally"),
    "a keyword argument": (lambda d, t: _call(d).__setitem__("kwargs", {"x": 1}), "positionally"),
    "a document with unknown keys": (lambda d, t: d["trainable"].__setitem__("modules", {}), "expected ['config'"),
    "a plan layer of a pool it does not have": (lambda d, t: next(iter(d["trainable"]["plan"]["layers"].values()))
                                                .__setitem__(0, "nesc_pool_99"), "plan layer"),
    "a config field that does not exist": (lambda d, t: d["trainable"]["config"].__setitem__("eval", "x"),
                                           "unknown fields"),
    "a config that does not validate": (lambda d, t: d["trainable"]["config"].__setitem__("ratio", 0.5),
                                        "does not validate"),
    # What only training mode reads (any artifact; a trainable one is loaded to train).
    "a bool batch-norm step counter": (lambda d, t: t.__setitem__("bn.num_batches_tracked", torch.tensor(True)),
                                       "expected an int64 scalar"),
    "a dropout probability above 1": (lambda d, t: next(n for n in d["graph"]["nodes"] if "dropout" in n["target"])
                                      ["args"].__setitem__(1, 2.0), "dropout probability"),
}


@pytest.mark.parametrize("case", sorted(TRAINABLE_EDITS))
def test_a_malformed_trainable_model_is_refused(learner_file, tmp_path, audit, case) -> None:
    edit, expected = TRAINABLE_EDITS[case]
    meta, tensors = read_artifact(learner_file)
    docs = {k: json.loads(meta[k]) for k in ("trainable", "graph", "tensors")}
    edit(docs, tensors)
    meta.update({k: json.dumps(v) for k, v in docs.items()})
    (tmp_path / "t.nesc").write_bytes(encode_artifact(meta, tensors))
    audit.clear()
    with pytest.raises(ArtifactError) as info:
        load(tmp_path / "t.nesc")
    assert expected in str(info.value) and not getattr(info.value, "unexpected", False), str(info.value)
    assert [p for p in _opened(audit) if "t.nesc" not in p] == []


def test_a_trainable_document_needs_format_5(learner_file, tmp_path) -> None:
    rewrite_metadata(learner_file, tmp_path / "v4.nesc", format_version="4")
    assert "has no 'trainable' document" in load_error(tmp_path / "v4.nesc")


def test_a_trainable_document_in_the_header_is_refused(learner_file, tmp_path) -> None:
    """One place per document: a header entry beside the packed documents could say something else."""
    rewrite_metadata(learner_file, tmp_path / "inline.nesc", raw=True, trainable="{}")
    assert "keeps its documents compressed" in load_error(tmp_path / "inline.nesc")


def test_the_placeholder_op_of_save_is_never_loaded(learner_file, tmp_path) -> None:
    meta, tensors = read_artifact(learner_file)
    doc = json.loads(meta["graph"])
    next(n for n in doc["nodes"] if n["op"] == "call_function")["target"] = "nesc_save::sampled.default"
    meta["graph"] = json.dumps(doc)
    (tmp_path / "p.nesc").write_bytes(encode_artifact(meta, tensors))
    assert "not on nesc's allow-list" in load_error(tmp_path / "p.nesc")
