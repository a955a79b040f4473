"""Quantized pools (``nesc.freeze(gm, pool_dtype=...)``) in the backends: ONNX dequantises with
``DequantizeLinear`` (int8) or ``Cast`` (float16, bfloat16) feeding the regeneration and stores the int8 / float16
tensors; TVM dequantises inside the regeneration kernel (``once``: at load, ``per_call``: every call)
and its parameters are the int8 values and scales (bfloat16: refused, numpy has none). Both match the eager frozen model with the same
quantized pools within ``BACKEND_REL`` (tight: same math, other kernels); against the fp32 pools
they differ by the pools' rounding (loose, ``tests/passes/test_quantize_pools.LOOSE_REL``)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import nesc
from helpers import BACKEND_REL, assert_backend_close, registry_inputs, transformed_registry

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'nesc[onnx]'")


@functools.lru_cache(maxsize=None)
def _frozen(name: str, dtype: torch.dtype | None):
    _, gm = transformed_registry(name)
    return nesc.freeze(gm, pool_dtype=dtype)


def _eager(frozen, x):
    with torch.no_grad():
        return frozen(*x)


# ------------------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("name, dtype", [
    ("mlp", torch.int8), ("mlp", torch.float16), ("mlp", torch.bfloat16), ("resnet_fmnist", torch.int8),
    pytest.param("resnet_fmnist", torch.float16, marks=pytest.mark.slow),
    pytest.param("resnet_fmnist", torch.bfloat16, marks=pytest.mark.slow)])
def test_onnx_dequantizes_before_the_regeneration_and_matches_eager(tmp_path, name, dtype) -> None:
    from nesc.backends.onnx import ort_session

    frozen, x = _frozen(name, dtype), registry_inputs(name)
    out = nesc.export_onnx(frozen, x, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    want = {torch.int8: onnx.TensorProto.INT8, torch.float16: onnx.TensorProto.FLOAT16,
            torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]
    pools = {n for n in inits if n.startswith("nesc_pool") and n.endswith(".values")}
    assert pools and {inits[n] for n in pools} == {want}, "the file stores the pools in their dtype"
    if dtype == torch.int8:
        assert "DequantizeLinear" in out.ops
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert {n.input[0] for n in dq} == pools and all(n.input[1].endswith(".scale") for n in dq)
    # compressed: the file's tensors are what the frozen module holds (check_compressed ran), int8 included
    assert out.tensor_bytes <= 1.05 * out.expected_bytes + 4096
    for regenerate in ("once", "per_call"):
        sess = ort_session(tmp_path / "m.onnx", regenerate=regenerate)
        got = sess.run(None, {sess.get_inputs()[0].name: x[0].numpy()})[0]
        assert_backend_close(got, _eager(frozen, x), f"{name} {dtype} onnxruntime {regenerate} vs eager")


def test_an_int8_onnx_file_is_smaller_than_the_fp32_one_by_the_pool_bytes(tmp_path) -> None:
    x = registry_inputs("mlp")
    f32 = nesc.export_onnx(_frozen("mlp", None), x, tmp_path / "f32.onnx")
    int8 = nesc.export_onnx(_frozen("mlp", torch.int8), x, tmp_path / "int8.onnx")
    pools = sum(p.numel() for n, p in _frozen("mlp", None).named_parameters() if n.startswith("nesc_pool"))
    assert f32.tensor_bytes - int8.tensor_bytes >= 3 * pools - 4 * 1024  # 3 bytes per element, less the scales


# ------------------------------------------------------------------------------------------- TVM


def _tvm_case(name: str, dtype, regenerate: str) -> None:
    pytest.importorskip("tvm", reason="the TVM backend needs the tvm extra: pip install -e '.[tvm]'")
    frozen, x = _frozen(name, dtype), registry_inputs(name)
    compiled = nesc.compile(frozen, x, regenerate=regenerate)
    got = compiled(x[0].numpy())
    assert_backend_close(np.asarray(got), _eager(frozen, x), f"{name} {dtype} TVM {regenerate} vs eager")


@pytest.mark.parametrize("regenerate", ["once", "per_call"])
def test_tvm_int8_pools_match_eager(regenerate) -> None:
    _tvm_case("mlp", torch.int8, regenerate)


@pytest.mark.slow
@pytest.mark.parametrize("regenerate", ["once", "per_call"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float16])
def test_tvm_quantized_pools_match_eager_on_a_convnet(dtype, regenerate) -> None:
    _tvm_case("resnet_fmnist", dtype, regenerate)


def test_tvm_parameters_are_the_int8_values_and_the_kernel_dequantizes() -> None:
    pytest.importorskip("tvm", reason="the TVM backend needs the tvm extra: pip install -e '.[tvm]'")
    from nesc.backends.tvm.lower import lower

    frozen, x = _frozen("mlp", torch.int8), registry_inputs("mlp")
    lowered = lower(frozen, x)
    pools = {n: a for n, a in lowered.params.items() if n.startswith("nesc_pool")}
    assert pools and {str(a.dtype) for n, a in pools.items() if n.endswith(".values")} == {"int8"}
    assert {lowered.kinds[n] for n in pools} == {"pool"}
    assert {r["pool"] for r in lowered.routes.values() if r.get("pool")} <= set(pools)
    assert "dequantize" not in lowered.mod.script(), "no separate dequantisation op: the kernel reads int8"


def test_tvm_deployed_int8_model_runs_torch_free(tmp_path) -> None:
    pytest.importorskip("tvm", reason="the TVM backend needs the tvm extra: pip install -e '.[tvm]'")
    from tvm_deploy_cases import run_torch_free

    frozen, x = _frozen("mlp", torch.int8), registry_inputs("mlp")
    library = tmp_path / "mlp.so"
    nesc.compile(frozen, x, regenerate="once").export_library(library)
    done = run_torch_free(library, x, _eager(frozen, x), BACKEND_REL)
    assert done.returncode == 0, done.stderr[-2000:]


def test_tvm_refuses_bfloat16_pools_with_a_clear_error() -> None:
    pytest.importorskip("tvm", reason="the TVM backend needs the tvm extra: pip install -e '.[tvm]'")
    from nesc.backends.tvm.lower import LoweringError, lower

    with pytest.raises(LoweringError, match="no bfloat16.*pool_dtype=torch.int8 or torch.float16"):
        lower(_frozen("mlp", torch.bfloat16), registry_inputs("mlp"))


@pytest.mark.parametrize("backend", ["load", "onnx", pytest.param("tvm", marks=pytest.mark.slow)])
def test_product_maps_read_int8_pools_in_every_backend(tmp_path, backend) -> None:
    """``passes.reuse``'s product maps (``reuse="outputs"``) compute their products from a regenerate node
    whose pool is now dequantised: each backend still matches eager."""
    from helpers import registry_model
    from product_cases import CONFIG, gather_nodes, with_fractions

    torch.manual_seed(0)
    x = registry_inputs("resnet_fmnist")
    gm = nesc.transform(registry_model("resnet_fmnist").eval(), x, CONFIG)
    frozen = with_fractions(nesc.freeze(gm, pool_dtype=torch.int8))
    assert gather_nodes(frozen)
    want = _eager(frozen, x)
    if backend == "load":
        nesc.save(frozen, tmp_path / "m.nesc")
        assert torch.equal(_eager(nesc.load(tmp_path / "m.nesc"), x), want)
    elif backend == "onnx":
        from nesc.backends.onnx import ort_session

        nesc.export_onnx(frozen, x, tmp_path / "m.onnx")
        sess = ort_session(tmp_path / "m.onnx")
        assert_backend_close(sess.run(None, {sess.get_inputs()[0].name: x[0].numpy()})[0], want, "onnxruntime")
    else:
        pytest.importorskip("tvm", reason="the TVM backend needs the tvm extra: pip install -e '.[tvm]'")
        for regenerate in ("once", "per_call"):
            got = nesc.compile(frozen, x, regenerate=regenerate)(x[0].numpy())
            assert_backend_close(np.asarray(got), want, f"TVM {regenerate}")
