"""nesc.search.esnac: the embedding is an L2-normalised mean over layers, and a fitted ESNAC proposes
unseen plans and prefers the region the history rewards (no training: rewards from a known function)."""

from __future__ import annotations

import random

import torch

from nesc.search.esnac import ESNAC, Embedder
from nesc.search.space import PlanSpace
from nesc.search.strategies import Observation


def test_the_embedding_is_unit_length_and_order_aware() -> None:
    x = torch.randn(3, 7, 5)
    z = Embedder(5, 4)(x)
    assert z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert not torch.allclose(Embedder(5, 4)(x.flip(1)), z)  # a bidirectional LSTM still reads order


def test_esnac_proposes_unseen_plans_that_the_history_favours() -> None:
    space = PlanSpace("resnet_fmnist", 4.0, max_groups=0)
    rng = random.Random(0)
    # A known reward: fewer dense layers is better. ESNAC should not propose dense-heavy plans.
    genomes = {space.random(rng) for _ in range(24)}
    history = [Observation(g, -sum(v == 0 for v in g.levels) + 0.01 * i) for i, g in enumerate(genomes)]
    picks = ESNAC(steps=30).propose(space, history, 3, random.Random(1))
    assert len(picks) == 3 and len(set(picks)) == 3 and not set(picks) & genomes
    mean_dense = sum(v == 0 for g in picks for v in g.levels) / 3
    assert mean_dense < 1.0  # random genomes have 0.7 on average; the history's best have 0
