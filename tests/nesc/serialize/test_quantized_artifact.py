"""Artifacts of models with quantized pools (``nesc.freeze(gm, pool_dtype=...)``): the pools are stored
in their dtype (int8 + float32 scales: about a quarter of the fp32 pool bytes), load back to the same
outputs, and a pool whose dtype or scales disagree with the graph is refused with an ``ArtifactError``;
so is a ``nesc.dequantize`` node with other arguments than nesc writes. Files written before
``nesc.dequantize`` (torch's ``dequantize_per_channel`` / ``_to_copy``) load into the new form and
compute what they computed then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nesc
from helpers import CLOSE, EXACT, assert_close, registry_inputs, transformed_registry
from nesc.core import names
from nesc.core.quant import DEQUANTIZE, LEGACY_DEQUANTIZE
from nesc.serialize import load
from serialize_cases import graph_doc, load_error, read_artifact, rewrite, with_graph

POOL, SCALE = "nesc_pool_0.values", "nesc_pool_0.scale"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """{pool dtype or None: (frozen model, path)} for the ratio-4 registry mlp."""
    _, gm = transformed_registry("mlp")
    out = {}
    for dtype in (None, torch.int8, torch.float16, torch.bfloat16):
        frozen = nesc.freeze(gm, pool_dtype=dtype)
        path = tmp_path_factory.mktemp(str(dtype).removeprefix("torch.")) / "model.nesc"
        nesc.save(frozen, path)
        out[dtype] = (frozen, path)
    return out


def _pool_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if n.startswith("nesc_pool"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16])
def test_quantized_pools_round_trip_in_their_dtype(files, dtype) -> None:
    frozen, path = files[dtype]
    loaded = nesc.load(path)
    x = registry_inputs("mlp")
    assert_close(loaded(*x), frozen(*x), EXACT, "loaded vs saved")
    assert loaded.get_buffer(POOL).dtype == dtype
    assert nesc.stored_bytes(loaded) == nesc.stored_bytes(frozen)


def test_an_int8_artifact_stores_a_quarter_of_the_pool_bytes(files) -> None:
    _, fp32 = read_artifact(files[None][1])
    _, int8 = read_artifact(files[torch.int8][1])
    _, fp16 = read_artifact(files[torch.float16][1])
    assert {int8[POOL].dtype, int8[SCALE].dtype, fp16[POOL].dtype} == {torch.int8, torch.float32, torch.float16}
    rows = sum(t.shape[0] for n, t in int8.items() if n.endswith(".scale") and n.startswith("nesc_pool"))
    assert _pool_bytes(int8) == _pool_bytes(fp32) // 4 + 4 * rows
    assert _pool_bytes(fp16) == _pool_bytes(fp32) // 2
    saved = files[None][1].stat().st_size - files[torch.int8][1].stat().st_size
    assert saved >= 0.9 * (_pool_bytes(fp32) - _pool_bytes(int8)), "the file shrinks by (about) the pool bytes saved"


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.__setitem__(SCALE, t[SCALE][:-1]), "scales must be positive finite float32 of shape"),
    (lambda t: t.__setitem__(SCALE, t[SCALE].double()), "scales must be positive finite float32"),
    (lambda t: t.__setitem__(SCALE, -t[SCALE]), "scales must be positive finite float32"),
    (lambda t: t.__setitem__(SCALE, t[SCALE] * float("inf")), "scales must be positive finite float32"),
    (lambda t: t.__setitem__(POOL, t[POOL].float()), "values must be int8"),
    (lambda t: t.__setitem__(POOL, t[POOL].to(torch.int16)), "values must be int8"),
    (lambda t: t.__setitem__(POOL, t[POOL][:-1].contiguous()), "scales must be positive finite float32 of shape"),
], ids=["scale-shape", "scale-float64", "scale-negative", "scale-inf", "values-float", "values-int16", "values-rows"])
def test_a_pool_that_disagrees_with_its_dequantization_is_refused(files, tmp_path, edit, expected) -> None:
    def edited(tensors):
        edit(tensors)
        return tensors

    rewrite(files[torch.int8][1], tmp_path / "edited.nesc", tensors=edited)
    assert expected in load_error(tmp_path / "edited.nesc")


def test_a_cast_pool_stored_as_another_dtype_is_refused(files, tmp_path) -> None:
    rewrite(files[torch.float16][1], tmp_path / "edited.nesc", tensors=lambda t: {**t, POOL: t[POOL].to(torch.int8)})
    assert "float16 / bfloat16" in load_error(tmp_path / "edited.nesc")


# ------------------------------------------------------------------------ the nesc.dequantize node

# Written by nesc.save before nesc.dequantize (format 4): serialize_cases' ConvNet with its conv weight
# regenerated from an int8 / float16 pool (``with_regenerate(traced(ConvNet()))`` after
# ``torch.manual_seed(0)``, then ``quantize_pools``), read through torch's
# ``quantized_decomposed.dequantize_per_channel(q, s, None, 0, -127, 127, torch.int8)`` / ``aten._to_copy``;
# ``extra["output"]``: what that code computed for ``LEGACY_INPUT`` (the independent reference).
LEGACY = {dtype: Path(__file__).parent / "data" / f"convnet_{dtype}_v4.safetensors" for dtype in ("int8", "float16")}
LEGACY_INPUT = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)


def _dequantize_doc(path) -> tuple[dict, dict]:
    doc = graph_doc(path)
    return doc, next(n for n in doc["nodes"] if "dequantize" in str(n.get("target")) or "_to_copy" in str(n.get("target")))


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_files_written_before_nesc_dequantize_load_and_compute_what_they_did(dtype) -> None:
    assert _dequantize_doc(LEGACY[dtype])[1]["target"] in ("quantized_decomposed::dequantize_per_channel.default",
                                                            "aten::_to_copy.default")
    loaded = load(LEGACY[dtype])
    targets = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
    assert DEQUANTIZE in targets and LEGACY_DEQUANTIZE not in targets
    with torch.no_grad():
        got = loaded(LEGACY_INPUT)
    # CLOSE, not EXACT: the stored output came from another machine's conv kernels, whose summation order
    # (AVX2 / AVX-512 / NEON) differs by an ulp or so; the same-process round trips above are EXACT.
    assert_close(got, torch.tensor(loaded.meta[names.EXTRA]["output"]), CLOSE, f"{dtype}: loaded vs when written")


def test_an_old_files_int8_dequantization_is_checked_before_it_is_rewritten(tmp_path) -> None:
    doc, node = _dequantize_doc(LEGACY["int8"])
    node["args"][3] = 1  # another axis than nesc wrote
    rewrite(LEGACY["int8"], tmp_path / "edited.nesc", metadata=with_graph(doc))
    assert "must be (values, scale, None, 0, -127, 127, torch.int8)" in load_error(tmp_path / "edited.nesc")


@pytest.mark.parametrize("edit, expected", [
    (lambda args: args.__setitem__(2, {"$dtype": "int32"}), "must compute a float dtype"),
    (lambda args: args.append(0), "takes (values, scale or None, dtype) positionally"),
    (lambda args: args.__setitem__(1, None), "a cast pool must be stored as float16 / bfloat16"),
], ids=["integer-dtype", "extra-argument", "int8-without-scales"])
def test_a_dequantize_node_with_other_arguments_is_refused(files, tmp_path, edit, expected) -> None:
    doc, node = _dequantize_doc(files[torch.int8][1])
    assert node["target"] == "nesc::dequantize.default"
    edit(node["args"])
    rewrite(files[torch.int8][1], tmp_path / "edited.nesc", metadata=with_graph(doc))
    assert expected in load_error(tmp_path / "edited.nesc")


def test_a_dequantize_node_must_read_stored_tensors_wherever_it_is(files, tmp_path) -> None:
    """Also one that feeds no regenerate node: its values must be a stored pool's, not a computed tensor."""
    doc = graph_doc(files[torch.int8][1])
    nodes = doc["nodes"]
    i = next(k for k, n in enumerate(nodes) if n.get("target") == "nesc::dequantize.default")
    computed = next(n["name"] for n in nodes if n["op"] == "placeholder")  # the model's input
    extra = {**nodes[i], "name": "stray", "args": [{"$node": computed}, *nodes[i]["args"][1:]]}
    nodes.insert(i + 1, extra)
    rewrite(files[torch.int8][1], tmp_path / "edited.nesc", metadata=with_graph(doc))
    assert "dequantize node stray: nesc.dequantize takes (values, scale or None, dtype)" in load_error(
        tmp_path / "edited.nesc")
