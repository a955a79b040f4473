"""nesc.search.reward: ESNAC's C(2-C) A/A_dense and the hard-budget variant, on hand-computed values."""

from __future__ import annotations

import pytest

from nesc.core.errors import ConfigError
from nesc.search.reward import reward


def test_paper_reward_is_c_times_two_minus_c_times_relative_accuracy() -> None:
    # params = dense / 4: C = 0.75, C (2 - C) = 0.9375; A / A_dense = 0.9 / 0.95.
    assert reward("paper", 0.9, 25, 0.95, 100, 25) == pytest.approx(0.9375 * 0.9 / 0.95, rel=1e-12)
    assert reward("paper", 0.95, 100, 0.95, 100, 25) == 0.0  # the dense model compresses nothing
    assert reward("paper", 0.5, 0, 0.5, 100, 25) == pytest.approx(1.0)  # C = 1: the limit


def test_budget_reward_is_relative_accuracy_within_the_budget_and_zero_beyond() -> None:
    assert reward("budget", 0.9, 25, 0.9, 100, 25) == pytest.approx(1.0)
    assert reward("budget", 0.9, 25 * 1.02, 0.9, 100, 25) == pytest.approx(1.0)  # the planner's tolerance
    assert reward("budget", 0.9, 26, 0.9, 100, 25) == 0.0


def test_unknown_reward_and_bad_reference_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown reward"):
        reward("soft", 0.9, 25, 0.9, 100, 25)
    with pytest.raises(ConfigError, match="positive dense accuracy"):
        reward("paper", 0.9, 25, 0.0, 100, 25)
