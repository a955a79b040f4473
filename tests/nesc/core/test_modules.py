"""nesc.core.modules under dtype casts: start indices, routing fractions and learned offsets are
positions, so ``gm.to(torch.bfloat16)`` / ``gm.half()`` cast the pools and dense weights but leave them
float32 and bit-identical, moves between devices still move them, ``.double()`` widens them (nothing
is lost), and the cast model runs in the new dtype close to the float32 one."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import COMPRESS_ALL, EXACT, StageNet, assert_close, assert_snr, stage_net_inputs
from torch import fx

import nesc
from nesc.core.modules import EpitomeSampler, RoutingMap, TransformationLearner, tensor_roles

# A cast model against its float32 original, StageNet's output: bfloat16 (8 bits of mantissa per
# weight and activation) measured 52 dB, float16 (11 bits) 73 dB. Start indices rounded to bfloat16
# alone (blocks reading shifted windows; what the cast did before) measured 30 dB: below both bounds.
BF16_MIN_SNR_DB = 40.0
HALF_MIN_SNR_DB = 60.0


def _transformed(learner: bool = False) -> fx.GraphModule:
    torch.manual_seed(0)
    gm = nesc.transform(StageNet(), stage_net_inputs(), ratio=2, learner=learner, **COMPRESS_ALL)
    with torch.no_grad():  # fractional starts, as after training: what a bf16 cast would round
        for s in _samplers(gm):
            s.starts.add_(torch.rand_like(s.starts) * 0.9 + 0.0123457)
    return gm.eval()


def _samplers(gm: fx.GraphModule) -> list[EpitomeSampler]:
    return [m for m in gm.modules() if isinstance(m, EpitomeSampler)]


def _positions(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every start, fraction and learned offset of ``gm``, by name."""
    out = {}
    for name, mod in gm.named_modules():
        if isinstance(mod, EpitomeSampler):
            out[f"{name}.starts"] = mod.starts.detach().clone()
        elif isinstance(mod, RoutingMap):
            out[f"{name}.fracs"] = mod.fracs.clone()
        elif isinstance(mod, TransformationLearner):
            out[f"{name}.running_offset"] = mod.running_offset.clone()
    assert out, "the model holds no positions"
    return out


def _assert_positions_kept(cast: fx.GraphModule, before: dict[str, torch.Tensor]) -> None:
    after = _positions(cast)
    assert after.keys() == before.keys()
    for name, t in after.items():
        assert t.dtype == torch.float32, f"{name} was cast to {t.dtype}"
        assert_close(t, before[name], EXACT, name)


@pytest.mark.parametrize("cast, dtype, min_db", [
    (lambda gm: gm.to(torch.bfloat16), torch.bfloat16, BF16_MIN_SNR_DB),
    (lambda gm: gm.bfloat16(), torch.bfloat16, BF16_MIN_SNR_DB),
    (lambda gm: gm.half(), torch.float16, HALF_MIN_SNR_DB),
    (lambda gm: gm.to("cpu", torch.bfloat16), torch.bfloat16, BF16_MIN_SNR_DB),
], ids=["to(bfloat16)", "bfloat16()", "half()", "to(cpu, bfloat16)"])
def test_a_cast_keeps_start_indices_float32_and_runs_in_the_new_dtype(cast, dtype, min_db) -> None:
    gm = _transformed()
    x = stage_net_inputs()
    want = gm(*x)
    before = _positions(gm)
    low = cast(copy.deepcopy(gm))
    _assert_positions_kept(low, before)
    pools = [low.get_parameter(n) for n, role in tensor_roles(low).items() if role == "pool"]
    assert pools and all(p.dtype == dtype for p in pools), "the pools take the new dtype"
    assert low.get_parameter("bn.weight").dtype == dtype, "so do the dense parameters"
    got = low(*(t.to(dtype) for t in x))
    assert got.dtype == dtype
    assert_snr(got.float(), want, min_db, f"{dtype} forward against float32")


def test_a_cast_model_trains_and_its_starts_get_float32_gradients() -> None:
    low = _transformed().to(torch.bfloat16).train()
    low(*(t.bfloat16() for t in stage_net_inputs())).float().pow(2).mean().backward()
    for s in _samplers(low):
        assert s.starts.dtype == s.starts.grad.dtype == torch.float32
    low.half()  # a cast with gradients present keeps them in the dtype of their starts
    assert all(s.starts.grad.dtype == torch.float32 for s in _samplers(low))


def test_the_learner_offsets_stay_float32() -> None:
    gm = _transformed(learner=True)
    before = _positions(gm)
    low = copy.deepcopy(gm).to(torch.bfloat16)
    _assert_positions_kept(low, before)
    low.train()(*(t.bfloat16() for t in stage_net_inputs()))  # a training step updates the running offsets
    assert all(m.running_offset.dtype == torch.float32 for m in low.modules() if isinstance(m, TransformationLearner))


def test_a_frozen_model_keeps_its_fractions_float32() -> None:
    frozen = nesc.freeze(_transformed())
    x = stage_net_inputs()
    want = frozen(*x)
    before = _positions(frozen)
    low = copy.deepcopy(frozen).to(torch.bfloat16)
    _assert_positions_kept(low, before)
    assert all(m.starts.dtype == torch.int32 for m in low.modules() if isinstance(m, RoutingMap))
    assert_snr(low(*(t.bfloat16() for t in x)).float(), want, BF16_MIN_SNR_DB, "frozen bf16 forward")


def test_moving_devices_still_moves_the_positions() -> None:
    gm = _transformed()
    moved = copy.deepcopy(gm).to("meta")  # a device move that needs no accelerator
    assert {t.device.type for t in _positions(moved).values()} == {"meta"}
    assert all(p.device.type == "meta" for p in moved.parameters())
    back = moved.to_empty(device="cpu")
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in _positions(back).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_a_cast_moves_and_keeps_the_positions() -> None:
    gm = _transformed()
    x = stage_net_inputs()
    want = gm(*x)
    before = _positions(gm)
    low = copy.deepcopy(gm).to("cuda", torch.bfloat16)
    assert {t.device.type for t in _positions(low).values()} == {"cuda"}
    _assert_positions_kept(low.cpu(), before)
    got = low.cuda()(*(t.to("cuda", torch.bfloat16) for t in x))
    assert_snr(got.float().cpu(), want, BF16_MIN_SNR_DB, "cuda bf16 forward")


def test_a_cast_to_float64_takes_the_positions_along() -> None:
    """Nothing is lost widening: ``.double()`` (gradcheck's precision) casts starts and fractions too."""
    gm = _transformed()
    before = _positions(gm)
    wide = copy.deepcopy(gm).double()
    assert all(t.dtype == torch.float64 for t in _positions(wide).values())
    back = wide.float()
    for name, t in _positions(back).items():
        assert_close(t, before[name], EXACT, name)
    narrowed = nesc.freeze(_transformed()).double().half()  # widened, then a narrowing cast: kept wide
    assert {t.dtype for t in _positions(narrowed).values()} == {torch.float64}
