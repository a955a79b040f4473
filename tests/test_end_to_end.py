"""Every registry model, end to end: transform at ratio 4 -> forward/backward -> five Adam steps lower the
loss on a fixed batch -> freeze -> the frozen model equals the trained one and stores 1/4 of the bytes
-> save/load gives it back bit for bit.

Test-size inputs, batch 2. The three ImageNet-size models take 5-15 s each on a busy 2-core CPU and are
marked slow; the others always run. mlp and cnn1d start from the default least-squares fit to their
dense weights, the others from random pools (see helpers.DENSE_INIT_MODELS).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nesc
from helpers import (
    BUDGET_RTOL,
    BYTES_RTOL,
    DENSE_INIT_MODELS,
    EXACT,
    assert_close,
    num_params,
    registry_inputs,
    run,
    transformed_registry,
)
from nesc.core import names
from nesc.models import get_spec, list_models

SLOW = {"efficientnet_b0", "mobilenetv2", "resnet18"}
STEPS = 5
BATCH = 2


def _case(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


def test_the_fast_models_are_not_all_marked_slow() -> None:
    assert {"resnet18_cifar", "mlp", "cnn1d", "vit_tiny"} <= set(list_models()) - SLOW


def _loss(gm, x, y, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks at every evaluation
    return F.cross_entropy(gm(*x), y)


@pytest.mark.parametrize("name", [_case(n) for n in list_models()])
def test_transform_train_freeze_save_load(name: str, tmp_path) -> None:
    spec = get_spec(name)
    x, y = registry_inputs(name, BATCH), spec.make_targets(BATCH)
    model, gm = transformed_registry(name)  # ratio 4
    if name in DENSE_INIT_MODELS:
        errors = gm.meta["nesc_fit_errors"]
        assert set(errors) == set(gm.meta[names.PLAN].layers) and all(0 <= e < 1 for e in errors.values())
    plan = gm.meta[names.PLAN]
    assert abs(plan.planned - num_params(model) / 4) <= BUDGET_RTOL * num_params(model) / 4
    # trainable: 4 learnable start coordinates a block; frozen: 8 routing scalars a block
    blocks = sum(g.num_blocks for _, g in plan.layers.values())
    assert nesc.stored_params(gm) == plan.planned - 4 * blocks

    # forward / backward: gradients reach every pool and every sampler's start indices
    gm.train()
    loss0 = _loss(gm, x, y)
    assert torch.isfinite(loss0)
    loss0.backward()
    pools = {n: p for n, p in gm.named_parameters() if n.startswith("nesc_pool")}
    assert pools and all(p.grad is not None and p.grad.abs().sum() > 0 for p in pools.values()), (
        "a pool gets no gradient"
    )
    starts = [p for n, p in gm.named_parameters() if n.endswith(".starts")]
    assert sum(p.grad is not None and p.grad.abs().sum() > 0 for p in starts) >= len(starts) // 2

    # a few optimizer steps on a fixed batch lower the loss
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    gm.zero_grad()
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(gm, x, y).backward()
        opt.step()
    with torch.no_grad():
        loss_after = _loss(gm, x, y)
    assert loss_after < loss0, f"{name}: loss {loss0.item():.4f} -> {loss_after.item():.4f} after {STEPS} Adam steps"

    # freeze: exact parity with the trained model in eval mode, 1/4 of the dense bytes
    frozen = nesc.freeze(gm)
    assert_close(run(frozen, x), run(gm, x), EXACT, f"{name}: frozen vs trained")
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert abs(nesc.stored_bytes(frozen) - dense_bytes / 4) <= BYTES_RTOL * dense_bytes / 4
    assert nesc.stored_params(frozen) == plan.planned

    # save / load: the artifact rebuilds the frozen model bit for bit, without the model's class
    nesc.save(frozen, tmp_path / f"{name}.nesc")
    loaded = nesc.load(tmp_path / f"{name}.nesc")
    assert_close(run(loaded, x), run(frozen, x), EXACT, f"{name}: loaded vs frozen")
    assert nesc.stored_params(loaded) == nesc.stored_params(frozen)
