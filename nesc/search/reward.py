"""Rewards of an evaluated plan: ESNAC's size-accuracy trade-off and a hard-budget variant.

ESNAC (Cao et al., 2019, eq. 4): ``R = C (2 - C) * A / A_dense`` with ``C = 1 - params / dense_params``
the compression (0 for the dense model, towards 1 for a tiny one): ``C (2 - C)`` rises steeply at
first and flattens, so accuracy counts more once a model is small. ``budget``: ``A / A_dense`` when
the plan stores at most the budget (plus the planner's tolerance), else 0 (the constrained variant).
"""

from __future__ import annotations

from nesc.core.errors import ConfigError

REWARDS = ("paper", "budget")
BUDGET_SLACK = 0.02  # plan_pools meets a budget within 2%


def reward(kind: str, acc: float, params: int, dense_acc: float, dense_params: int, budget: int) -> float:
    if kind not in REWARDS:
        raise ConfigError(f"unknown reward {kind!r}; valid: {', '.join(REWARDS)}")
    if dense_acc <= 0 or dense_params <= 0:
        raise ConfigError(f"reward needs a positive dense accuracy and size, got {dense_acc!r}, {dense_params!r}")
    relative = acc / dense_acc
    if kind == "budget":
        return relative if params <= budget * (1 + BUDGET_SLACK) else 0.0
    c = 1.0 - params / dense_params
    return c * (2.0 - c) * relative
