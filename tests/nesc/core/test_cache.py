"""nesc.core.cache: inference reuses a regenerated weight only while every tensor it was built from is
unchanged. The reference is the same model with the cache switched off (it regenerates every call)."""

from __future__ import annotations

import gc

import pytest
import torch

import nesc
from helpers import EXACT, assert_close, registry_inputs, registry_model
from nesc import NESConfig
from nesc.core import cache
from nesc.core.cache import cached, weight_cache


def _counter():
    calls = []

    def build():
        calls.append(1)
        return torch.randn(3)

    return calls, build


def test_a_hit_needs_the_same_tensors_at_the_same_versions() -> None:
    pool, starts = torch.randn(4, requires_grad=True), torch.zeros(2)
    calls, build = _counter()
    with torch.no_grad():
        first = cached(starts, (pool, starts), "k", build)
        assert cached(starts, (pool, starts), "k", build) is first and len(calls) == 1
        pool.add_(1)  # an in-place write (an optimizer step) bumps the version
        assert cached(starts, (pool, starts), "k", build) is not first and len(calls) == 2
        starts.fill_(1)
        cached(starts, (pool, starts), "k", build)
        assert len(calls) == 3
        cached(starts, (pool.detach().clone(), starts), "k", build)  # another pool object
        cached(starts, (pool, starts), "other static key", build)
        assert len(calls) == 5


def test_no_cache_while_autograd_records_or_when_switched_off() -> None:
    pool, starts = torch.randn(4, requires_grad=True), torch.zeros(2)
    calls, build = _counter()
    cached(starts, (pool, starts), "k", build)
    cached(starts, (pool, starts), "k", build)
    assert len(calls) == 2, "a forward that records gradients always regenerates"
    with torch.no_grad(), weight_cache(False):
        cached(starts, (pool, starts), "k", build)
        cached(starts, (pool, starts), "k", build)
    assert len(calls) == 4 and cache.cache_enabled()


def test_an_entry_dies_with_its_weight() -> None:
    starts = torch.zeros(2)
    with torch.no_grad():
        cached(starts, (torch.randn(4), starts), "k", lambda: torch.randn(3))
    key = id(starts)
    assert key in cache._entries
    del starts
    gc.collect()
    assert key not in cache._entries


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_eval_outputs_follow_training_and_loaded_weights(frozen: bool) -> None:
    model = registry_model("resnet_fmnist")
    gm = nesc.transform(model, registry_inputs("resnet_fmnist"), NESConfig(ratio=4, min_params=128))
    gm = nesc.freeze(gm) if frozen else gm
    x = registry_inputs("resnet_fmnist", 4)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(2):
        gm.eval()
        with torch.no_grad():
            before = gm(*x)
            with weight_cache(False):
                assert_close(gm(*x), before, EXACT, "cached vs regenerated")
        gm.train()
        opt.zero_grad()
        gm(*x).square().mean().backward()
        opt.step()
        gm.eval()
        with torch.no_grad():
            after = gm(*x)
            with weight_cache(False):
                assert_close(after, gm(*x), EXACT, "after an optimizer step")
        assert not torch.equal(after, before), "the step changed the model, and eval saw it"
    other = nesc.transform(registry_model("resnet_fmnist", seed=1), registry_inputs("resnet_fmnist"),
                           NESConfig(ratio=4, min_params=128))
    gm.load_state_dict((nesc.freeze(other) if frozen else other).state_dict())
    with torch.no_grad():
        loaded = gm(*x)
        with weight_cache(False):
            assert_close(loaded, gm(*x), EXACT, "after load_state_dict")


def test_a_weight_written_in_place_is_rebuilt() -> None:
    pool, starts = torch.randn(4), torch.zeros(2)
    calls, build = _counter()
    with torch.no_grad():
        first = cached(starts, (pool, starts), "k", build)
        first.mul_(0)  # a consumer writing into the cached tensor
        assert cached(starts, (pool, starts), "k", build) is not first and len(calls) == 2


def test_inference_tensors_are_never_cached_and_never_fail() -> None:
    """An inference tensor has no version counter, so nothing could prove a weight built from it fresh."""
    calls, build = _counter()
    with torch.inference_mode():
        pool = torch.randn(4)
        cached(pool, (pool,), "k", build)
        cached(pool, (pool,), "k", build)
    assert len(calls) == 2


def _counting(monkeypatch, module, name: str) -> list:
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _quantized_mlp(dtype):
    from helpers import transformed_registry

    _, gm = transformed_registry("mlp")
    return nesc.freeze(gm, pool_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16])
def test_quantized_pools_hit_the_cache_until_their_values_or_scales_change(monkeypatch, dtype) -> None:
    """The stored values (and int8 scales) key the dequantised pool, which keys the weights: a second
    forward rebuilds nothing; an in-place write to either rebuilds what reads it, and the outputs then
    equal the model with the cache off (which dequantises and regenerates every call)."""
    from nesc.core import modules, quant

    frozen, x = _quantized_mlp(dtype), registry_inputs("mlp", 4)
    regenerated, dequantized = _counting(monkeypatch, modules, "regenerate_fastest"), _counting(
        monkeypatch, quant, "dequantize_reference")
    with torch.no_grad():
        first = frozen(*x)
        assert regenerated and dequantized
        regenerated.clear(), dequantized.clear()
        assert_close(frozen(*x), first, EXACT, "second forward")
        assert regenerated == [] and dequantized == [], "a second forward regenerates nothing"
    writes = {"values": lambda v: v.copy_(v.flip(1))}
    if dtype == torch.int8:
        writes["scale"] = lambda s: s.copy_(s * 1.5)
    for leaf, write in writes.items():
        stored = frozen.get_buffer(f"nesc_pool_0.{leaf}")
        with torch.no_grad():
            before = frozen(*x)  # every pool and weight cached (switching the cache off below empties it)
            regenerated.clear(), dequantized.clear()
            write(stored)
            after = frozen(*x)
            assert len(dequantized) == 1 and regenerated, f"a write to the {leaf} rebuilds pool 0 and its weights"
            with weight_cache(False):
                assert_close(after, frozen(*x), EXACT, f"after a write to nesc_pool_0.{leaf}")
        assert not torch.equal(after, before), f"the write to the {leaf} changed the outputs"


def test_quantized_pools_run_and_stay_cached_in_inference_mode(monkeypatch) -> None:
    """The cached dequantised pool is built outside inference mode (it has a version counter), so the
    weights read from it are cached there too; before, the regenerate node's cache failed on it."""
    from nesc.core import modules

    frozen, x = _quantized_mlp(torch.int8), registry_inputs("mlp", 4)
    with torch.no_grad():
        want = frozen(*x)
    regenerated = _counting(monkeypatch, modules, "regenerate_fastest")
    with torch.inference_mode():
        assert_close(frozen(*x), want, EXACT, "inference mode vs no_grad")
        calls = len(regenerated)
        assert_close(frozen(*x), want, EXACT, "second inference-mode forward")
    assert len(regenerated) == calls, "the second inference-mode forward regenerates nothing"
