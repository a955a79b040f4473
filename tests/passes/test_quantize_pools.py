"""passes.quantize_pools (rewrite) and ``nesc.freeze(gm, pool_dtype=...)``: pools stored as int8 (per
row scales), float16 or bfloat16 and dequantised before regeneration; the model equals the fp32 frozen
model with its pools replaced by their dequantised values (an independent reference), and differs from
the fp32 model by the pools' rounding only; the report counts the stored bytes; type-based tools are
refused with a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

import nesc
from helpers import CLOSE, assert_close, check_pass, regenerate_nodes, registry_inputs, transformed_registry
from nesc.core.errors import ConfigError, PassOrderError, RegeneratedWeightError
from nesc.core.modules import tensor_roles
from nesc.core.quant import DEQUANTIZE, QMAX, QuantizedPool
from nesc.passes.quantize_pools import quantize_pools

# Output change of a quantized model against the same model with fp32 pools, relative to the output's
# norm, on the ratio-4 registry mlp / resnet_fmnist (measured: int8 0.4-0.5%, bfloat16 0.12-0.18%,
# float16 0.01%); the bounds leave about 4x margin.
LOOSE_REL = {torch.int8: 0.02, torch.bfloat16: 0.008, torch.float16: 0.001}


def _frozen(name: str = "mlp", **kw):
    _, gm = transformed_registry(name)
    return gm, nesc.freeze(gm, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16])
def test_pools_are_stored_quantized_and_dequantized_before_regeneration(dtype) -> None:
    _, f32 = _frozen()
    q = check_pass(quantize_pools(copy.deepcopy(f32), dtype), modified=True)
    pools = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedPool)}
    assert pools and all(m.values.dtype == dtype for m in pools.values())
    assert not [n for n, _ in q.named_parameters() if n.startswith("nesc_pool")]
    for node in regenerate_nodes(q):
        values, scale, compute = node.args[0].args
        assert node.args[0].target is DEQUANTIZE and values.target.endswith(".values") and compute == torch.float32
        assert (scale.target.endswith(".scale") if dtype == torch.int8 else scale is None)
    roles = tensor_roles(q)
    assert {n for n, r in roles.items() if r == "pool"} == {f"{n}.values" for n in pools}
    assert {n for n, r in roles.items() if r == "pool_scale"} == ({f"{n}.scale" for n in pools}
                                                                   if dtype == torch.int8 else set())


@pytest.mark.parametrize("name", ["mlp", "resnet_fmnist"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16])
def test_outputs_equal_the_fp32_model_on_dequantized_pools(name, dtype) -> None:
    gm, f32 = _frozen(name)
    q = nesc.freeze(gm, pool_dtype=dtype)
    x = registry_inputs(name)
    # independent reference: the fp32 frozen model with each pool replaced by its rounding, by hand
    ref = copy.deepcopy(f32)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if not pname.startswith("nesc_pool"):
                continue
            if dtype == torch.int8:
                scale = (p.abs().amax(dim=(1, 2, 3)) / QMAX).clamp_min(torch.finfo(torch.float32).eps)
                p.copy_(torch.clamp(torch.round(p / scale.view(-1, 1, 1, 1)), -QMAX, QMAX) * scale.view(-1, 1, 1, 1))
            else:
                p.copy_(p.to(dtype).float())
        want, got, fp32 = ref(*x), q(*x), f32(*x)
    assert_close(got, want, CLOSE, f"{name} {dtype} vs hand-dequantized pools")
    rel = _rel(got, fp32)
    assert 0 < rel < LOOSE_REL[dtype], f"{name} {dtype}: output change {rel:.4f} vs fp32 pools"


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16])
def test_torch_compile_runs_quantized_pools_and_matches_eager(dtype) -> None:
    """inductor runs ``nesc.dequantize`` as an extern kernel (torch's dequantize_per_channel with None zero
    points failed in its lowering: ``'NoneType' object has no attribute 'get_size'``). About 6 s on one
    core for the first inductor build, under 1 s for the second."""
    _, frozen = _frozen("mlp", pool_dtype=dtype)
    x = registry_inputs("mlp", 4)
    compiled = torch.compile(frozen, dynamic=False)
    with torch.no_grad():
        want = frozen(*x)
        for call in range(2):  # the second call reads the cached pools and weights inside the compiled code
            # CLOSE: other kernels, the same float32 math (measured: equal, int8 and float16)
            assert_close(compiled(*x), want, CLOSE, f"{dtype} compiled call {call} vs eager")
    for values in (b for n, b in frozen.named_buffers() if n.endswith(".values")):
        values.copy_(values.flip(0))  # new stored values: compiled and eager both follow
    with torch.no_grad():
        assert_close(compiled(*x), frozen(*x), CLOSE, f"{dtype} compiled vs eager after new values")
        assert not torch.equal(frozen(*x), want)


def test_stored_bytes_count_int8_pools_at_one_byte_plus_scales() -> None:
    gm, f32 = _frozen()
    q = nesc.freeze(gm, pool_dtype=torch.int8)
    pools = [p for n, p in f32.named_parameters() if n.startswith("nesc_pool")]
    pool_fp32 = sum(p.numel() * 4 for p in pools)
    pool_int8 = sum(p.numel() + p.shape[0] * 4 for p in pools)
    assert nesc.stored_bytes(f32) - nesc.stored_bytes(q) == pool_fp32 - pool_int8
    assert nesc.stored_params(q) == nesc.stored_params(f32)  # same scalars, fewer bytes
    report = nesc.summary(q, print_table=False)
    assert report.stored_bytes == nesc.stored_bytes(q) and report.to_dict()["stored_bytes"] == report.stored_bytes
    assert {name: shape for name, (shape, _) in report.pools.items()} == {
        f"{n}.values": tuple(p.shape) for n, p in f32.named_parameters() if n.startswith("nesc_pool")}
    f16 = nesc.freeze(gm, pool_dtype=torch.float16)
    assert nesc.stored_bytes(f32) - nesc.stored_bytes(f16) == pool_fp32 // 2


def test_bad_dtypes_and_repeated_quantization_are_refused() -> None:
    gm, f32 = _frozen()
    with pytest.raises(ConfigError, match="pool_dtype must be one of"):
        nesc.freeze(gm, pool_dtype=torch.int4 if hasattr(torch, "int4") else torch.int16)
    q = nesc.freeze(gm, pool_dtype=torch.int8)
    with pytest.raises(PassOrderError, match="already quantized"):
        quantize_pools(q, torch.int8)
    with pytest.raises(PassOrderError, match="frozen model"):
        quantize_pools(copy.deepcopy(gm), torch.int8)


@pytest.mark.parametrize("dtype", [None, torch.int8])
def test_quantize_dynamic_is_refused_with_a_clear_error_and_the_model_untouched(dtype) -> None:
    _, frozen = _frozen(pool_dtype=dtype)
    x = registry_inputs("mlp")
    before = frozen(*x)
    with pytest.raises(RegeneratedWeightError, match=r"fc1\.weight is not stored.*pool_dtype=torch.int8"):
        torch.ao.quantization.quantize_dynamic(frozen, {torch.nn.Linear}, dtype=torch.qint8)
    assert torch.equal(frozen(*x), before)
    with pytest.raises(RegeneratedWeightError):
        frozen.fc1.weight.shape
    with pytest.raises(RegeneratedWeightError):
        torch.abs(frozen.fc1.weight)
    assert "fc1.weight" not in frozen.state_dict()


def test_torchao_quantize_is_refused_with_the_same_error() -> None:
    quantization = pytest.importorskip("torchao.quantization")
    _, frozen = _frozen(pool_dtype=torch.int8)
    with pytest.raises(RegeneratedWeightError, match=r"fc1\.weight is not stored: .* from pool 'nesc_pool_0'"):
        quantization.quantize_(frozen, quantization.Int8WeightOnlyConfig())
