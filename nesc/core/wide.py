"""The sampling kernel wider than linear interpolation, which training anneals to linear.

``regenerate_wide`` reads each weight element as the tent-weighted average of the pool rows within
``width`` cells of its real-valued position along every active axis (``tent_weights``), so that a
start's loss has no sharp kink at integer starts while the starts learn; ``set_sampling_width``
(``nesc.core.modules``) sets the width of every sampler, and at width 1 the kernel is
``nesc.core.sampling.regenerate``'s linear interpolation, the rule freeze keeps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sampling import Geometry, assemble_blocks, window_index


def tent_weights(fracs: Tensor, width: float) -> Tensor:
    """Weights of the ``2R`` rows ``floor(s) - R + 1 .. floor(s) + R`` (``R = ceil(width)``) that a
    tent kernel of half-width ``width`` centred at ``s`` gives, normalised to sum to one: shape
    ``(*fracs.shape, 2R)``. ``width = 1`` is linear interpolation exactly (weights ``1 - f, f``)."""
    R = max(1, math.ceil(width - 1e-9))
    offsets = torch.arange(1 - R, R + 1, device=fracs.device, dtype=fracs.dtype)
    w = (1 - (offsets - fracs[..., None]).abs() / width).clamp_min(0)
    return w / w.sum(-1, keepdim=True)


def regenerate_wide(pool: Tensor, starts: Tensor, fracs: Tensor, scale: float | Tensor, geometry: Geometry,
                    width: float) -> Tensor:
    """``regenerate`` with a sampling kernel wider than linear interpolation: along every active
    axis, each weight element is the tent-weighted average (half-width ``width`` cells) of the pool
    rows around its real-valued position, so the slope of a start's loss changes gradually over
    ``width`` cells: the jump at an integer start, a sharp V once the pool has adapted to its
    window, is 5-10x smaller at width 2-3 than at 1 (random pools). ``width = 1`` is ``regenerate``'s
    formula (to float rounding); training anneals ``width`` to 1 so that the frozen routing map (linear interpolation)
    is what the model was trained with. Differentiable in ``pool`` and ``fracs`` through autograd."""
    nbo, nbi = geometry.grid
    R = max(1, math.ceil(width - 1e-9))
    w = (pool * scale).reshape(-1)[window_index(starts, geometry, taps=2 * R)]
    for d in range(4):
        if geometry.active[d]:
            k = tent_weights(fracs[..., d].to(w.dtype), width).reshape(nbo, nbi, 1, 1, 1, 1, 2 * R)
            w = (w.unfold(2 + d, 2 * R, 1) * k).sum(-1)
    return assemble_blocks(w, geometry)
