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
