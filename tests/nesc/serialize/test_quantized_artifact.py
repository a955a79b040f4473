"""Artifacts of models with quantized pools (``nesc.freeze(gm, pool_dtype=...)``): the pools are stored
in their dtype (int8 + float32 scales: about a quarter of the fp32 pool bytes), load back to the same
outputs, and a pool whose dtype or scales disagree with the graph is refused with an ``ArtifactError``."""

from __future__ import annotations

import pytest
import torch

import nesc
from helpers import EXACT, assert_close, registry_inputs, transformed_registry
from serialize_cases import load_error, read_artifact, rewrite

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
