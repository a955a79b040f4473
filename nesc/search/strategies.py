"""Search strategies, one registry: ``random`` and ``uniform`` here, ``esnac`` and ``embedding`` in their files.

A strategy is a class registered by name whose ``propose(space, history, n, rng)`` returns up to ``n``
new genomes given the history so far (``Observation``s: genome and reward, in evaluation order).
Strategies keep no state between calls that the history does not hold: what they learn (an LSTM
embedding, an autoencoder) is re-learned from the history each step, seeded from the step, so a
resumed search proposes what an uninterrupted one would have.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nesc.core.registry import Registry

from .space import Genome, PlanSpace

STRATEGIES: Registry[type] = Registry("search strategy")


@dataclass(frozen=True)
class Observation:
    genome: Genome
    reward: float
    size: float = 1.0  # stored parameters / budget (what the embedding strategy's size regressor learns)


class Strategy:
    """Base class: ``propose`` is what a strategy must define."""

    def __init__(self, **options) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} takes no options, got {sorted(options)}")

    def propose(self, space: PlanSpace, history: list[Observation], n: int, rng: random.Random) -> list[Genome]:
        raise NotImplementedError


@STRATEGIES.register("random")
class RandomSearch(Strategy):
    """Uniformly random genomes (``PlanSpace.random``), the uniform plan first."""

    def propose(self, space, history, n, rng):
        seen = {space.identity(o.genome) for o in history}
        out = [] if space.identity(space.uniform()) in seen else [space.uniform()]
        return out + fresh(space, lambda: space.random(rng), seen | {space.identity(g) for g in out}, n - len(out))


@STRATEGIES.register("uniform")
class UniformPlan(Strategy):
    """The one plan with every layer at the same ratio; nothing else to evaluate."""

    def propose(self, space, history, n, rng):
        uniform = space.identity(space.uniform())
        return [] if any(space.identity(o.genome) == uniform for o in history) else [space.uniform()]


def fresh(space: PlanSpace, draw, seen: set[tuple], n: int, tries: int = 50) -> list[Genome]:
    """Up to ``n`` genomes from ``draw()`` of distinct plans, none in ``seen`` (``PlanSpace.identity``s)."""
    out: list[Genome] = []
    taken = set(seen)
    for _ in range(n * tries):
        if len(out) >= n:
            break
        g = draw()
        if space.identity(g) not in taken:
            taken.add(space.identity(g))
            out.append(g)
    return out


def candidates(space: PlanSpace, history: list[Observation], rng: random.Random, count: int,
               top: int = 5) -> list[Genome]:
    """A pool of unseen genomes to score: mutations (1-3 changes) of the best ``top`` so far, half of
    them, and random genomes for the rest (the exploration ESNAC's paper gets from random sampling)."""
    seen = {space.identity(o.genome) for o in history}
    best = [o.genome for o in sorted(history, key=lambda o: -o.reward)[:top]] or [space.uniform()]
    near = fresh(space, lambda: space.mutate(rng.choice(best), rng, rng.randint(1, 3)), seen, count // 2)
    return near + fresh(space, lambda: space.random(rng), seen | {space.identity(g) for g in near}, count - len(near))
