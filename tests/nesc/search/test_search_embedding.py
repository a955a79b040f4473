"""nesc.search.embedding: the autoencoder learns to reconstruct plans, and descent proposes unseen plans
within the budget that the learned objective prefers."""

from __future__ import annotations

import random

import torch

from nesc.search.embedding import EmbeddingDescent
from nesc.search.space import PlanSpace
from nesc.search.strategies import Observation


def _history(space: PlanSpace, n: int = 16) -> list[Observation]:
    rng = random.Random(0)
    genomes = list(dict.fromkeys(space.random(rng) for _ in range(n)))
    return [Observation(g, -sum(v == 0 for v in g.levels) + 0.01 * i, 1.0) for i, g in enumerate(genomes)]


def test_the_autoencoder_reconstructs_the_plans_it_was_trained_on() -> None:
    space = PlanSpace("resnet_fmnist", 4.0)
    history = _history(space)
    torch.manual_seed(0)
    net = EmbeddingDescent(steps=300).fit(space, history, random.Random(0))
    with torch.no_grad():
        x = torch.stack([space.features(o.genome) for o in history])
        logits, _ = net.decode(net.encode(x))
    codes = torch.tensor([space.codes(o.genome) for o in history])
    assert (logits.argmax(1) == codes).float().mean() > 0.9


def test_descent_proposes_unseen_plans() -> None:
    space = PlanSpace("resnet_fmnist", 4.0)
    history = _history(space)
    picks = EmbeddingDescent(steps=100).propose(space, history, 3, random.Random(2))
    assert len(picks) == 3 and len(set(picks)) == 3
    assert not set(picks) & {o.genome for o in history}
