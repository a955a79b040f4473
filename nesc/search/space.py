"""The search space: a ``Genome`` is one point of it, a ``PlanSpace`` turns genomes into ``Plan``s.

A genome holds, for every searchable layer (a compressible weight with at least ``min_params``
elements, in graph order), a *level* and a *group*, plus one width choice:

* level 0 keeps the layer dense; level k > 0 compresses it ``LEVELS[k]`` times harder than the model's
  average (0.5 = twice the parameters of a uniform plan, 4 = a quarter);
* group 0 gives the layer its own pool; group g > 0 makes it share pool ``s<g>`` with the other layers
  of group g (a shared pool is sized from what the budget leaves, in proportion to its members);
* the width index picks a multiplier from ``widths`` (the model's ``width_mult``: a wider model
  sampled from the same budget).

``PlanSpace.plan`` solves for the absolute per-layer ratios so that the plan meets the budget: the
fixed-size pools take ``numel_i / (R * m_i)`` with one ``R`` for the model, and one pool (a shared one,
or else that of the largest compressed layer) is left to absorb the routing maps and the rounding.
Genomes are canonical (``canonical``): the same plan always has the same genome.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from nesc.capture import capture
from nesc.core.config import NESConfig
from nesc.core.errors import ConfigError
from nesc.models import get_spec
from nesc.passes import pipeline
from nesc.passes.find_weights import weight_infos

from .plan import DENSE, Plan

LEVELS: tuple[float | None, ...] = (None, 0.5, 1.0, 2.0, 4.0)  # None: dense
UNIFORM_LEVEL = LEVELS.index(1.0)
OPS = ("conv2d", "conv2d_dw", "conv2d_group", "conv1d", "linear", "matmul")
P_DENSE, P_SHARED = 0.1, 0.25  # random genomes: how often a layer stays dense / joins a shared pool


@dataclass(frozen=True)
class Genome:
    levels: tuple[int, ...]
    groups: tuple[int, ...]
    width: int = 0

    def to_json(self) -> dict:
        return {"levels": list(self.levels), "groups": list(self.groups), "width": self.width}

    @staticmethod
    def from_json(doc: dict) -> Genome:
        return Genome(tuple(int(v) for v in doc["levels"]), tuple(int(v) for v in doc["groups"]), int(doc["width"]))


@dataclass(frozen=True)
class Layer:
    name: str  # weight name
    op: str
    shape: tuple[int, int, int, int]  # (O, I, kh, kw) at width 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class PlanSpace:
    """The plan space of one registry model under one budget (``ratio`` of the width-1 dense size)."""

    def __init__(self, model: str, ratio: float, *, num_classes: int | None = None,
                 input_shape: tuple[int, ...] | None = None, widths: tuple[float, ...] = (1.0,),
                 max_groups: int = 2, min_params: int = 1024) -> None:
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 1):
            raise ConfigError(f"search ratio must be a finite number > 1, got {ratio!r}")
        if not widths or any(not (isinstance(w, (int, float)) and 0 < w <= 16) for w in widths):
            raise ConfigError(f"widths must be positive multipliers (at most 16), got {widths!r}")
        if not isinstance(max_groups, int) or max_groups < 0:
            raise ConfigError(f"max_groups must be an int >= 0, got {max_groups!r}")
        self.model, self.ratio, self.widths = model, float(ratio), tuple(float(w) for w in widths)
        self.max_groups, self.min_params = max_groups, min_params
        spec = get_spec(model)
        self.num_classes = num_classes or spec.num_classes
        self.input_shape = tuple(input_shape or spec.input_shape)
        self._sizes: dict[float, tuple[int, dict[str, int]]] = {}
        total, infos = self._measure(1.0)
        self.dense_params = total
        self.budget = round(total / self.ratio)
        self.layers = tuple(Layer(i.weight_name, i.op, i.shape) for i in infos if i.numel >= min_params)
        if not self.layers:
            raise ConfigError(f"{model} has no compressible weight with >= {min_params} elements; lower min_params")

    # ------------------------------------------------------------------------------- geometry

    def _measure(self, width: float):
        kwargs = {} if width == 1.0 else {"width_mult": width}
        model = get_spec(self.model).create(num_classes=self.num_classes, **kwargs).eval()
        gm = capture(model, (torch.zeros(2, *self.input_shape),))
        gm = pipeline.run(gm, ["functionalize", "find_weights"], NESConfig())
        infos = weight_infos(gm)
        total = sum(p.numel() for p in model.parameters())
        self._sizes[width] = (total, {i.weight_name: i.numel for i in infos})
        return total, infos

    def sizes(self, width: float) -> tuple[int, dict[str, int]]:
        """(dense parameters, {weight name: numel}) of the model at ``width``."""
        if width not in self._sizes:
            self._measure(width)
        return self._sizes[width]

    # ------------------------------------------------------------------------------- genomes

    def uniform(self) -> Genome:
        n = len(self.layers)
        return Genome((UNIFORM_LEVEL,) * n, (0,) * n, self.widths.index(1.0) if 1.0 in self.widths else 0)

    def random(self, rng: random.Random) -> Genome:
        levels, groups = [], []
        for _ in self.layers:
            dense = rng.random() < P_DENSE
            levels.append(0 if dense else rng.randrange(1, len(LEVELS)))
            shared = not dense and self.max_groups > 0 and rng.random() < P_SHARED
            groups.append(rng.randint(1, self.max_groups) if shared else 0)
        return self.canonical(Genome(tuple(levels), tuple(groups), rng.randrange(len(self.widths))))

    def mutate(self, genome: Genome, rng: random.Random, changes: int = 1) -> Genome:
        levels, groups, width = list(genome.levels), list(genome.groups), genome.width
        for _ in range(changes):
            i = rng.randrange(len(self.layers) + (len(self.widths) > 1))
            if i == len(self.layers):
                width = rng.randrange(len(self.widths))
            elif rng.random() < 0.7 or self.max_groups == 0:
                levels[i] = rng.randrange(len(LEVELS))
            else:
                groups[i] = rng.randint(0, self.max_groups)
                levels[i] = levels[i] or UNIFORM_LEVEL
        return self.canonical(Genome(tuple(levels), tuple(groups), width))

    def canonical(self, genome: Genome) -> Genome:
        """Dense layers in no group; shared layers at the uniform level (a shared pool is sized by its
        members' size, not their levels); groups renumbered by first appearance; a group of one is a
        layer of its own."""
        n = len(self.layers)
        if len(genome.levels) != n or len(genome.groups) != n or not 0 <= genome.width < len(self.widths):
            raise ConfigError(f"a genome for {self.model} needs {n} levels, {n} groups and a width index "
                              f"below {len(self.widths)}; got {genome}")
        levels = [min(max(v, 0), len(LEVELS) - 1) for v in genome.levels]
        groups = [g if levels[i] and 0 < g <= self.max_groups else 0 for i, g in enumerate(genome.groups)]
        counts = {g: groups.count(g) for g in set(groups)}
        groups = [g if counts[g] > 1 else 0 for g in groups]
        relabel: dict[int, int] = {}
        for g in groups:
            if g and g not in relabel:
                relabel[g] = len(relabel) + 1
        groups = [relabel.get(g, 0) for g in groups]
        levels = [UNIFORM_LEVEL if g else v for v, g in zip(levels, groups)]
        return Genome(tuple(levels), tuple(groups), genome.width)

    def identity(self, genome: Genome) -> tuple:
        """What decides the plan: the genome without the anchor's level (the anchor's pool is sized from
        what the budget leaves, whatever its level). Two genomes with one identity give one plan, so
        strategies compare identities, not genomes."""
        anchor = self._anchor(genome)
        levels = tuple(UNIFORM_LEVEL if i == anchor else v for i, v in enumerate(genome.levels))
        return levels, genome.groups, genome.width

    def _anchor(self, genome: Genome) -> int | None:
        """The layer whose own pool absorbs the routing maps and the rounding: none when a shared pool
        does that, else the largest layer with a pool of its own (by its width-1 size)."""
        if any(genome.groups):
            return None
        fixed = [i for i, (v, g) in enumerate(zip(genome.levels, genome.groups)) if v and not g]
        return max(fixed, key=lambda i: (self.layers[i].numel, -i)) if fixed else None

    # ------------------------------------------------------------------------------- plans

    def plan(self, genome: Genome) -> Plan:
        """The plan of ``genome``; its per-layer ratios are solved so that the whole meets the budget."""
        genome = self.canonical(genome)
        width = self.widths[genome.width]
        total, numel = self.sizes(width)
        rules: dict[str, dict | str] = {}
        fixed = [(layer.name, LEVELS[v]) for layer, v, g in zip(self.layers, genome.levels, genome.groups)
                 if v and not g]
        index = self._anchor(genome)
        anchor = None if index is None else self.layers[index].name
        compressed = sum(numel[layer.name] for layer, v in zip(self.layers, genome.levels) if v)
        avail = self.budget - (total - compressed)  # what the pools and routing maps may hold
        # One R for the model: sum_i numel_i / (R m_i) over the fixed layers + shared / R = avail.
        demand = sum(numel[n] / m for n, m in fixed if n != anchor) + (compressed - sum(numel[n] for n, _ in fixed))
        demand += numel[anchor] if anchor else 0
        base = demand / avail if avail > 0 else math.inf
        for layer, v, g in zip(self.layers, genome.levels, genome.groups):
            if not v:
                rules[layer.name] = DENSE
            elif g:
                rules[layer.name] = {"pool": f"s{g}"}
            elif layer.name == anchor:
                rules[layer.name] = {}
            else:
                ratio = base * LEVELS[v] if math.isfinite(base) else 1e6
                rules[layer.name] = {"ratio": float(f"{min(max(ratio, 1.0), 1e6):.4g}")}
        return Plan(self.model, self.budget, rules, width=width, min_params=self.min_params)

    # ------------------------------------------------------------------------------- features

    @property
    def feature_size(self) -> int:
        return len(OPS) + 5 + 3 + (self.max_groups + 1) + 1

    def features(self, genome: Genome) -> torch.Tensor:
        """``(layers, feature_size)``: per layer its geometry (op one-hot, log sizes, kernel, position)
        and its choice (dense, log2 level, group one-hot) and the model's log2 width. What the ESNAC
        LSTM reads; model-agnostic, so an embedding learned on one model reads another."""
        n, width = len(self.layers), self.widths[genome.width]
        rows = []
        for i, (layer, v, g) in enumerate(zip(self.layers, genome.levels, genome.groups)):
            O, I, kh, kw = layer.shape
            op = [float(layer.op == o) for o in OPS]
            geo = [math.log2(O) / 10, math.log2(I) / 10, kh / 7, kw / 7, i / max(n - 1, 1)]
            choice = [float(v == 0), math.log2(LEVELS[v]) / 2 if v else 0.0, math.log10(layer.numel) / 7]
            group = [float(g == k) for k in range(self.max_groups + 1)]
            rows.append(op + geo + choice + group + [math.log2(width)])
        return torch.tensor(rows, dtype=torch.float32)

    @property
    def choices(self) -> int:
        """Per layer: len(LEVELS) levels x (max_groups + 1) groups, as one categorical (for decoders)."""
        return len(LEVELS) * (self.max_groups + 1)

    def codes(self, genome: Genome) -> list[int]:
        return [v * (self.max_groups + 1) + g for v, g in zip(genome.levels, genome.groups)]

    def from_codes(self, codes: list[int], width: int) -> Genome:
        k = self.max_groups + 1
        return self.canonical(Genome(tuple(c // k for c in codes), tuple(c % k for c in codes), width))
