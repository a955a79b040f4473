"""ESNAC (Cao, Wang, Kitani, ICLR 2019): Bayesian optimisation over a learned embedding of plans.

A plan is read as the sequence of its per-layer feature vectors (``PlanSpace.features``). A
bidirectional LSTM embeds it: the mean of its outputs over the layers, L2-normalised. A Gaussian
process whose kernel is an RBF over that embedding models the reward (``gp.RBFGP``). At every step the
LSTM and the kernel's hyperparameters are learned from the evaluated plans by maximising the GP's
leave-one-out predictive log-likelihood. Several kernels, each fitted on a random half of the history,
each pick one candidate by expected improvement among sampled candidates (mutations of the best plans
and random ones): a batch of diverse proposals for parallel evaluation.

Transfer (the paper's claim that the embedding carries over between architectures): the features are
model-agnostic, so ``export`` returns an LSTM fitted on the whole history, saved by the search as
``esnac_embedding.safetensors``; ``ESNAC(embedding=path, retrain=False)`` reuses it on another model and
only fits the kernel's hyperparameters.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn import functional as F

from .gp import RBFGP, expected_improvement
from .space import PlanSpace
from .strategies import STRATEGIES, Observation, RandomSearch, Strategy, candidates


class Embedder(nn.Module):
    """(N, layers, features) -> (N, 2 * hidden): BiLSTM, mean over layers, L2-normalised."""

    def __init__(self, features: int, hidden: int = 16) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)  # (N, L, 2H)
        return F.normalize(out.mean(1), dim=-1)


@STRATEGIES.register("esnac")
class ESNAC(Strategy):
    def __init__(self, *, kernels: int | None = None, pool: int = 256, steps: int = 60, hidden: int = 16,
                 lr: float = 0.02, warmup: int = 4, embedding: str | Path | None = None,
                 retrain: bool = True) -> None:
        self.kernels, self.pool, self.steps, self.hidden, self.lr = kernels, pool, steps, hidden, lr
        self.warmup, self.retrain = warmup, retrain
        self.embedding = load_file(str(embedding)) if embedding is not None else None

    def propose(self, space: PlanSpace, history: list[Observation], n: int, rng: random.Random):
        if len(history) < self.warmup:
            return RandomSearch().propose(space, history, n, rng)
        x = torch.stack([space.features(o.genome) for o in history])  # (N, L, F)
        y = standardise(torch.tensor([o.reward for o in history]))
        pool = candidates(space, history, rng, self.pool)
        if not pool:
            return []
        xq = torch.stack([space.features(g) for g in pool])
        picks: list[int] = []
        for _ in range(self.kernels or max(n, 1)):
            half = rng.sample(range(len(history)), max(2, len(history) // 2))
            embedder, gp = self.fit(space, x[half], y[half], seed=rng.randrange(2**31))
            with torch.no_grad():
                mean, std = gp.posterior(embedder(x), y, embedder(xq))
                ei = expected_improvement(mean, std, float(y.max()))
            ei[picks] = -1.0  # one kernel, one new candidate
            picks.append(int(ei.argmax()))
            if len(picks) >= min(n, len(pool)):
                break
        return [pool[i] for i in picks]

    def fit(self, space: PlanSpace, x: Tensor, y: Tensor, seed: int) -> tuple[Embedder, RBFGP]:
        """Learn the LSTM (unless reused without retraining) and the kernel by maximising the LOO likelihood."""
        torch.manual_seed(seed)
        embedder, gp = Embedder(space.feature_size, self.hidden), RBFGP()
        if self.embedding is not None:
            embedder.load_state_dict(self.embedding)
        params = list(gp.parameters()) + (list(embedder.parameters()) if self.retrain else [])
        optimizer = torch.optim.Adam(params, lr=self.lr)
        for _ in range(self.steps):
            optimizer.zero_grad()
            loss = -gp.loo_log_likelihood(embedder(x), y) / len(y)
            loss.backward()
            optimizer.step()
        return embedder.eval(), gp

    def export(self, space: PlanSpace, history: list[Observation], seed: int = 0) -> dict[str, Tensor]:
        """The LSTM fitted on the whole history, for reuse on another model (``embedding=``)."""
        x = torch.stack([space.features(o.genome) for o in history])
        embedder, _ = self.fit(space, x, standardise(torch.tensor([o.reward for o in history])), seed)
        return {k: v.detach().contiguous() for k, v in embedder.state_dict().items()}


def standardise(y: Tensor) -> Tensor:
    y = y.float()
    std = y.std() if len(y) > 1 else torch.tensor(0.0)
    return (y - y.mean()) / (std if std > 1e-8 else 1.0)
