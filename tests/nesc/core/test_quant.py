"""``nesc.core.quant`` and ``nesc.core.qat``: int8 pool quantisation against an independent per-row
formula, the checks an untrusted pool goes through, and the fake-quantizers of ``prepare_qat``
(their forward against torch's fake-quant formula, and ``freeze`` using their scales)."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import nesc
from helpers import CLOSE, EXACT, assert_close, registry_inputs, transformed_registry
from nesc.core.errors import ConfigError
from nesc.core.modules import samplers_by_pool
from nesc.core.quant import FAKE_QUANT, PoolRead, QMAX, dequantize_node, pool_problem, quantize


def _pool(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(6, 5, 3, 3, generator=g)
    pool[2] *= 40  # rows of very different magnitude: one scale per row matters
    pool[4] = 0  # an all-zero row still gets a positive scale
    return pool


def test_int8_values_and_scales_match_the_symmetric_per_row_formula() -> None:
    pool = _pool()
    q = quantize(pool, torch.int8)
    amax = pool.abs().amax(dim=(1, 2, 3))
    want_scale = torch.where(amax > 0, amax / QMAX, q.scale)  # a zero row: any positive scale
    assert_close(q.scale, want_scale.float(), CLOSE, "scales = amax / 127")
    assert bool((q.scale > 0).all())
    want = torch.clamp(torch.round(pool / want_scale.view(-1, 1, 1, 1)), -QMAX, QMAX).to(torch.int8)
    assert q.values.dtype == torch.int8 and torch.equal(q.values, want)
    # the dequantised pool is within half a step of the original, per row
    err = (q.values.float() * q.scale.view(-1, 1, 1, 1) - pool).abs().amax(dim=(1, 2, 3))
    assert bool((err <= q.scale / 2 * (1 + 1e-5)).all()), err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_pools_are_plain_casts(dtype) -> None:
    pool = _pool()
    q = quantize(pool, dtype)
    assert not hasattr(q, "scale")
    assert_close(q.values, pool.to(dtype), EXACT)


def test_a_bad_dtype_or_scale_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pool_dtype must be one of"):
        quantize(_pool(), torch.int16)
    with pytest.raises(ConfigError, match="one per pool row"):
        quantize(_pool(), torch.int8, scale=torch.ones(3))
    with pytest.raises(ConfigError, match="positive"):
        quantize(_pool(), torch.int8, scale=torch.zeros(6))


def _int8_read() -> tuple[PoolRead, torch.Tensor, torch.Tensor]:
    g = fx.Graph()
    values, scale = g.get_attr("p.values"), g.get_attr("p.scale")
    node = dequantize_node(g, values, scale, torch.float32)
    q = quantize(_pool(), torch.int8)
    return PoolRead(values, scale, node), q.values, q.scale


def test_pool_problem_accepts_what_freeze_writes_and_names_each_defect() -> None:
    read, values, scale = _int8_read()
    assert pool_problem(read, values, scale) is None
    assert "int8 of 4 dimensions" in pool_problem(read, values.float(), scale)
    assert "positive finite float32 of shape (6,)" in pool_problem(read, values, scale[:3])
    assert "positive finite" in pool_problem(read, values, scale.double())
    assert "positive finite" in pool_problem(read, values, -scale)
    assert "positive finite" in pool_problem(read, values, scale * float("nan"))
    node = read.dequantize
    node.args = (*node.args[:2], torch.int32)  # an integer pool
    assert "must compute a float dtype, got torch.int32" in pool_problem(read, values, scale)
    node.args = (*node.args[:2], torch.float32, 0)  # torch's form had an axis here; nesc's has none
    assert "takes (values, scale or None, dtype)" in pool_problem(read, values, scale)
    node.args, node.kwargs = node.args[:3], {"out_dtype": torch.float16}
    assert "takes (values, scale or None, dtype)" in pool_problem(read, values, scale)


def test_pool_problem_checks_a_cast_pool_by_its_values() -> None:
    g = fx.Graph()
    values = g.get_attr("p.values")
    read = PoolRead(values, None, dequantize_node(g, values, None, torch.float32))
    assert pool_problem(read, quantize(_pool(), torch.float16).values, None) is None
    assert pool_problem(read, quantize(_pool(), torch.bfloat16).values, None) is None
    assert "float16 / bfloat16" in pool_problem(read, quantize(_pool(), torch.int8).values, None)
    assert "float16 / bfloat16" in pool_problem(read, _pool(), None)  # float32 values: nothing nesc writes


# ------------------------------------------------------------------------------------------ QAT


def test_prepare_qat_fake_quantizes_each_pool_once_with_torch_formula() -> None:
    _, gm = transformed_registry("mlp")
    x = registry_inputs("mlp")
    nesc.prepare_qat(gm)
    gm.train()
    gm(*x)  # the observers see the pools
    pools = samplers_by_pool(gm)
    assert pools
    for name, samplers in pools.items():
        fq = getattr(samplers[0], FAKE_QUANT)
        assert all(getattr(s, FAKE_QUANT) is fq for s in samplers)  # a shared pool: one set of scales
        pool = gm.get_parameter(name)
        want = torch.fake_quantize_per_channel_affine(pool, fq.scale, fq.zero_point.int(), 0, -127, 127)
        assert_close(fq(pool), want, EXACT)
    # gradients reach the pools through the fake-quant (straight-through)
    gm(*x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in gm.named_parameters() if n.startswith("nesc_pool"))
    with pytest.raises(ConfigError, match="once"):
        nesc.prepare_qat(gm)
    with pytest.raises(ConfigError, match="int8"):
        nesc.prepare_qat(transformed_registry("mlp")[1], dtype=torch.float16)


def test_freeze_of_a_qat_model_uses_its_scales_and_matches_its_eval_output() -> None:
    _, gm = transformed_registry("mlp")
    x = registry_inputs("mlp")
    nesc.prepare_qat(gm)
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
    for _ in range(3):  # a few steps of "fine-tuning"
        opt.zero_grad()
        gm(*x).square().mean().backward()
        opt.step()
    gm.eval()
    gm.apply(torch.ao.quantization.disable_observer)  # eval must not move the scales
    with torch.no_grad():
        want = gm(*x)
    frozen = nesc.freeze(gm)  # int8 by default after prepare_qat
    scales = {n: b for n, b in frozen.named_buffers() if n.endswith(".scale") and n.startswith("nesc_pool")}
    fqs = {tuple(getattr(m, FAKE_QUANT).scale.tolist()) for m in gm.modules() if hasattr(m, FAKE_QUANT)}
    assert scales and {tuple(s.tolist()) for s in scales.values()} == fqs
    with torch.no_grad():
        got = frozen(*x)
    # the same rounding of the same pools; only the regeneration's summation order may differ
    assert_close(got, want, CLOSE, "frozen int8 vs the QAT model in eval mode")



def test_a_qat_model_frozen_before_any_step_is_still_int8_with_observed_scales() -> None:
    _, gm = transformed_registry("mlp")
    nesc.prepare_qat(gm)
    frozen = nesc.freeze(gm)  # the fake-quantizers never ran: scales come from the pools themselves
    pools = {n: m for n, m in frozen.named_modules() if type(m).__name__ == "QuantizedPool"}
    assert pools and all(m.values.dtype == torch.int8 for m in pools.values())
    for name, m in pools.items():
        amax = gm.get_parameter(name).detach().abs().amax(dim=(1, 2, 3))
        assert_close(m.scale, amax / QMAX, CLOSE, name)
