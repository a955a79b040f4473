"""The block-grid search of plan_pools: pool shapes whose routing maps stay small.

A pool of N elements serving weights of W elements cuts them into about W / N blocks, and every block
stores ``ROUTING_SCALARS_PER_BLOCK`` scalars once frozen, so pools + routing ~ N + 8 W / N: smallest
at N ~ sqrt(8 W), and growing again below it. A pool driven down to one output channel makes one
block per weight row, and its routing maps outgrow the pool many times over. ``plan_sizes`` sizes
pools by splitting the channel budget evenly between Op and Ip; where that leaves routing heavy (or
nothing for the pools), it asks ``best_shape`` here, which evaluates pool + routing exactly (as
``plan_sizes.geometry`` and ``Geometry.frozen_routing`` count them, vectorised with numpy) over the
grid of (Op, Ip) at which a member's block count changes, and returns the largest pool whose cost fits
the allowance. ``min_cost`` is the smallest cost any shape reaches: what the errors quote when even
that does not fit.

    before:  pool (1, 29, 1, 1) for 64x64 linears: 64 blocks per weight, routing 16x the pool
    after:   pool (12, 14, 1, 1): 30 blocks per weight, pools + routing within the budget
"""

from __future__ import annotations

import math

import numpy as np

from nesc.core.sampling import PRODUCT_SCALARS_PER_ROW, ROUTING_SCALARS_PER_BLOCK

# Candidate values per channel axis: the block-count breakpoints of every member, thinned to this many.
MAX_CANDIDATES = 96


def _breakpoints(sizes: list[int]) -> np.ndarray:
    """Every c at which ceil(n / min(n, c)) changes for some n in ``sizes``: ceil(n / k), k = 1..n."""
    points = np.unique(np.concatenate([np.ceil(n / np.arange(1, n + 1)).astype(np.int64) for n in set(sizes)]))
    if len(points) > MAX_CANDIDATES:  # keep both ends, spaced evenly on a log scale in between
        keep = np.unique(np.round(np.geomspace(1, len(points), MAX_CANDIDATES)).astype(np.int64) - 1)
        points = points[keep]
    return points


def _ceil(a, b):
    return -(-a // b)


def routing(members, Op, Ip) -> np.ndarray:
    """Frozen routing scalars of ``members`` [(O, I, folded, shared)] for every pool (Op, Ip) of the
    broadcast arrays ``Op``, ``Ip``; exactly ``sum(_geometry(...).frozen_routing(...))``."""
    total = np.zeros(np.broadcast(Op, Ip).shape, dtype=np.int64)
    for O, I, folded, shared in members:
        nbo, nbi = _ceil(O, np.minimum(O, Op)), _ceil(I, np.minimum(I, Ip))
        bo, bi = _ceil(O, nbo), _ceil(I, nbi)
        rows, cols = _ceil(O, bo), _ceil(I, bi)  # the grid of the evened-out blocks
        kept = np.minimum(cols, _ceil(Ip, bi)) if folded else cols
        plain = rows * kept * ROUTING_SCALARS_PER_BLOCK
        if shared:
            plain = np.where(Op < O, kept * ROUTING_SCALARS_PER_BLOCK + rows * PRODUCT_SCALARS_PER_ROW, plain)
        total = total + plain
    return total


def _grid(members, window: int, allowance: float | None):
    """(Op, Ip, pool numel, routing) of the candidate shapes: for every Ip breakpoint and every Op
    interval between breakpoints (routing is constant inside one), the largest Op that fits
    ``allowance`` (None: the interval's first Op, for the smallest cost)."""
    Ip = _breakpoints([I for _, I, _, _ in members])[:, None]  # (nI, 1)
    starts = _breakpoints([O for O, _, _, _ in members])  # Op at which some block count changes
    O_max = max(O for O, _, _, _ in members)
    starts = starts[starts <= O_max]
    ends = np.append(starts[1:] - 1, np.iinfo(np.int64).max // 4)[None, :]  # the last interval is open
    starts = starts[None, :]
    route = routing(members, starts, Ip)  # (nI, nO): constant across each Op interval
    if allowance is None:
        Op = np.broadcast_to(starts, route.shape)
    else:
        fit = np.floor((allowance - route) / (Ip * window)).astype(np.int64)
        Op = np.where(fit >= starts, np.minimum(fit, ends), 0)  # 0: nothing in this interval fits
    return Op, np.broadcast_to(Ip, Op.shape), Op * Ip * window, route


def best_shape(members, window: tuple[int, int], allowance: float):
    """The (Op, Ip) of the largest pool whose elements plus routing fit ``allowance`` (fewest routing
    scalars among equal pools), or None when no shape does."""
    Op, Ip, pool, route = _grid(members, math.prod(window), allowance)
    ok = Op > 0
    if not ok.any():
        return None
    score = np.where(ok, pool * (1 << 20) - route, -1)  # largest pool first, then least routing
    i = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(Op[i]), int(Ip[i])


def min_cost(members, window: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
    """(pool elements, routing scalars, (Op, Ip)) of the shape with the smallest pool + routing."""
    Op, Ip, pool, route = _grid(members, math.prod(window), None)
    i = np.unravel_index(int(np.argmin(pool + route)), pool.shape)
    return int(pool[i]), int(route[i]), (int(Op[i]), int(Ip[i]))


def describe_dense(parts: list[tuple[str, int, str]], limit: int = 4) -> str:
    """``parts`` [(name, parameters, reason)] as the largest few, grouped by reason."""
    parts = sorted(parts, key=lambda p: -p[1])
    shown = ", ".join(f"{name} ({n:,}: {reason})" for name, n, reason in parts[:limit])
    rest = sum(n for _, n, _ in parts[limit:])
    more = f", and {len(parts) - limit} more ({rest:,})" if len(parts) > limit else ""
    return shown + more
