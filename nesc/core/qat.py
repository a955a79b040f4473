"""Quantisation-aware fine-tuning of the pools: ``prepare_qat(gm)`` before the user's loop, then
``nesc.freeze(gm, pool_dtype=torch.int8)`` quantises with the scales the fake-quantizers learned.

Each pool gets one torch ``FakeQuantize`` (per-row symmetric int8, moving-average observer:
``nesc.core.quant.fake_quantizer``), attached to every trainable sampler that reads the pool (the
same module, so a shared pool has one set of scales) and applied by a forward pre-hook on the
sampler's pool input. The pools stay float parameters: gradients pass the rounding straight
through (torch's ``fake_quantize_per_channel_affine``), and the scales follow the pools as they
change. ``pool_fake_quant`` shows up in the sampler's ``state_dict``, so a checkpoint keeps it.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from .errors import ConfigError
from .modules import samplers_by_pool
from .quant import FAKE_QUANT, fake_quant_hook, fake_quantizer


def prepare_qat(gm: fx.GraphModule, dtype: torch.dtype = torch.int8) -> fx.GraphModule:
    """Put a fake-quantizer on every pool of the trainable ``gm`` (in place; returns ``gm``). Only int8:
    float16 and bfloat16 round far below int8's error and need no fine-tuning."""
    if dtype != torch.int8:
        raise ConfigError(f"prepare_qat fine-tunes for int8 pools (torch.int8), got {dtype!r}; float16 / bfloat16 "
                          f"pools need no quantisation-aware training: nesc.freeze(gm, pool_dtype={dtype})")
    pools = samplers_by_pool(gm)
    if not pools:
        raise ConfigError("prepare_qat: the model has no trainable sampler (is it frozen, or not transformed?); call "
                          "it on the output of nesc.transform, before nesc.freeze")
    for pool, samplers in pools.items():
        fq = fake_quantizer().to(gm.get_parameter(pool).device)
        for sampler in samplers:
            if hasattr(sampler, FAKE_QUANT):
                raise ConfigError(f"prepare_qat: {sampler.weight_name} already has a fake-quantizer; call it once")
            sampler.add_module(FAKE_QUANT, fq)
            sampler.register_forward_pre_hook(fake_quant_hook)
    return gm


def qat_scales(gm: fx.GraphModule) -> dict[str, Tensor]:
    """Pool name -> the int8 scales its fake-quantizer holds (empty without ``prepare_qat``)."""
    out = {}
    for pool, samplers in samplers_by_pool(gm).items():
        fq = getattr(samplers[0], FAKE_QUANT, None)
        if fq is not None and fq.scale.shape == gm.get_parameter(pool).shape[:1]:  # it has seen the pool
            out[pool] = fq.scale.detach().clone()
    return out


def is_prepared(gm: fx.GraphModule) -> bool:
    """Whether ``prepare_qat`` put fake-quantizers on ``gm``'s pools."""
    return any(hasattr(m, FAKE_QUANT) for m in gm.modules())
