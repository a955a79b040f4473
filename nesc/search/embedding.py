"""Architecture Compression (Ashok, 2019): gradient descent in a learned continuous embedding of plans.

A 1-D CNN encoder maps a plan (its per-layer feature sequence, ``PlanSpace.features``) to a
continuous embedding ``(D, layers)``; a 1-D CNN decoder maps an embedding back to per-layer choices
(level x group, ``PlanSpace.codes``) and the width. Two regressors read the embedding (mean over
layers): the reward, and the stored size relative to the budget. All four are trained jointly at
every step: reconstruction on the evaluated plans and on random ones (the autoencoder needs no
labels), regression on the evaluated ones. Compression is gradient ascent in the embedding, from
the best evaluated plans, on ``predicted reward - penalty * max(0, predicted size - 1)``; each
result is decoded to a discrete plan, re-encoded, and kept only if its predicted size is within the
budget and it was not evaluated before. Missing proposals are filled by scoring sampled candidates
with the regressors.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .esnac import standardise
from .space import PlanSpace
from .strategies import STRATEGIES, Observation, RandomSearch, Strategy, candidates

SIZE_SLACK = 0.02


class Autoencoder(nn.Module):
    def __init__(self, features: int, choices: int, widths: int, dim: int = 8, channels: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(features, channels, 3, padding=1), nn.ReLU(),
                                     nn.Conv1d(channels, dim, 3, padding=1))
        self.decoder = nn.Sequential(nn.Conv1d(dim, channels, 3, padding=1), nn.ReLU(),
                                     nn.Conv1d(channels, choices, 1))
        self.width = nn.Linear(dim, widths)
        self.reward = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, 1))
        self.size = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, 1))

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x.transpose(1, 2))  # (N, L, F) -> (N, D, L)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoder(z), self.width(z.mean(2))  # (N, choices, L), (N, widths)

    def predict(self, z: Tensor) -> tuple[Tensor, Tensor]:
        pooled = z.mean(2)
        return self.reward(pooled)[:, 0], self.size(pooled)[:, 0]  # standardised reward, log(size)


@STRATEGIES.register("embedding")
class EmbeddingDescent(Strategy):
    def __init__(self, *, steps: int = 150, lr: float = 0.01, descent_steps: int = 50, descent_lr: float = 0.1,
                 penalty: float = 10.0, unlabelled: int = 128, pool: int = 256, warmup: int = 4) -> None:
        self.steps, self.lr, self.descent_steps, self.descent_lr = steps, lr, descent_steps, descent_lr
        self.penalty, self.unlabelled, self.pool, self.warmup = penalty, unlabelled, pool, warmup

    def propose(self, space: PlanSpace, history: list[Observation], n: int, rng: random.Random):
        if len(history) < self.warmup:
            return RandomSearch().propose(space, history, n, rng)
        torch.manual_seed(rng.randrange(2**31))
        net = self.fit(space, history, rng)
        seen = {space.identity(o.genome) for o in history}
        out = []
        for o in sorted(history, key=lambda o: -o.reward)[: 2 * n]:
            g = self.descend(space, net, o.genome)
            if g is not None and space.identity(g) not in seen:
                seen.add(space.identity(g))
                out.append(g)
            if len(out) >= n:
                return out
        pool = [g for g in candidates(space, history, rng, self.pool) if space.identity(g) not in seen]
        if pool:
            with torch.no_grad():
                score = self.objective(net, net.encode(torch.stack([space.features(g) for g in pool])))
            out += [pool[i] for i in score.argsort(descending=True)[: n - len(out)].tolist()]
        return out

    def fit(self, space: PlanSpace, history: list[Observation], rng: random.Random) -> Autoencoder:
        genomes = [o.genome for o in history] + [space.random(rng) for _ in range(self.unlabelled)]
        x = torch.stack([space.features(g) for g in genomes])
        codes = torch.tensor([space.codes(g) for g in genomes])  # (N, L)
        widths = torch.tensor([g.width for g in genomes])
        labelled = len(history)
        reward = standardise(torch.tensor([o.reward for o in history]))
        size = torch.tensor([math.log(max(o.size, 1e-6)) for o in history])
        net = Autoencoder(space.feature_size, space.choices, len(space.widths))
        optimizer = torch.optim.Adam(net.parameters(), lr=self.lr)
        for _ in range(self.steps):
            optimizer.zero_grad()
            z = net.encode(x)
            logits, width_logits = net.decode(z)
            pred_reward, pred_size = net.predict(z[:labelled])
            loss = (F.cross_entropy(logits, codes) + F.cross_entropy(width_logits, widths)
                    + F.mse_loss(pred_reward, reward) + F.mse_loss(pred_size, size))
            loss.backward()
            optimizer.step()
        return net.eval()

    def objective(self, net: Autoencoder, z: Tensor) -> Tensor:
        reward, log_size = net.predict(z)
        return reward - self.penalty * F.relu(log_size.exp() - 1.0)

    def descend(self, space: PlanSpace, net: Autoencoder, genome):
        """Ascend the objective from ``genome``'s embedding; decode; re-encode and check the size."""
        z = net.encode(space.features(genome)[None]).detach().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=self.descent_lr)
        for _ in range(self.descent_steps):
            optimizer.zero_grad()
            (-self.objective(net, z).sum()).backward()
            optimizer.step()
        with torch.no_grad():
            logits, width_logits = net.decode(z)
            g = space.from_codes(logits[0].argmax(0).tolist(), int(width_logits[0].argmax()))
            _, log_size = net.predict(net.encode(space.features(g)[None]))
        return g if float(log_size.exp()) <= 1.0 + SIZE_SLACK else None
