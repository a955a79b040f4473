"""nesc.search.space: genomes are canonical, and every plan the space produces meets the budget when
nesc builds it (plan_pools would raise a PlanError otherwise; the stored size is checked here too)."""

from __future__ import annotations

import random

import pytest
import torch

import nesc
from nesc.models import get_spec
from nesc.search.space import LEVELS, Genome, PlanSpace


@pytest.fixture(scope="module")
def space() -> PlanSpace:
    return PlanSpace("resnet_fmnist", 4.0, max_groups=2, min_params=1024)


def test_the_space_lists_the_large_weights_in_graph_order(space) -> None:
    names = [layer.name for layer in space.layers]
    assert names[0] == "layer1.conv1.weight" and len(names) == 7  # the stem and the classifier are small
    assert space.budget == round(space.dense_params / 4)


def test_canonical_is_idempotent_and_renumbers_groups(space) -> None:
    rng = random.Random(0)
    for _ in range(50):
        g = space.random(rng)
        assert space.canonical(g) == g
    odd = Genome((0, 1, 1, 2, 2, 3, 4), (2, 2, 0, 2, 1, 0, 0), 0)  # a dense layer in group 2; a group of one
    c = space.canonical(odd)
    assert c.groups == (0, 1, 0, 1, 0, 0, 0) and c.levels[0] == 0 and c.levels[1] == LEVELS.index(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_every_plan_meets_the_budget(space, seed) -> None:
    genome = space.uniform() if seed == 0 else space.random(random.Random(seed))
    plan = space.plan(genome)
    model = get_spec("resnet_fmnist").create()
    gm = nesc.transform(model, (torch.zeros(2, 1, 28, 28),), plan.nes_config(init="random"))
    frozen = nesc.freeze(gm)
    assert abs(nesc.stored_params(frozen) - space.budget) <= 0.02 * space.budget
    dense = {n for n, r in plan.layers.items() if r == "dense"}
    assert dense == {layer.name for layer, v in zip(space.layers, genome.levels) if v == 0}


def test_the_uniform_plan_gives_every_fixed_layer_the_same_ratio(space) -> None:
    ratios = {r["ratio"] for r in space.plan(space.uniform()).layers.values() if "ratio" in r}
    assert len(ratios) == 1


def test_features_are_one_row_per_layer_and_see_the_choices(space) -> None:
    a, b = space.uniform(), space.mutate(space.uniform(), random.Random(3), 2)
    fa, fb = space.features(a), space.features(b)
    assert fa.shape == (len(space.layers), space.feature_size)
    assert not torch.equal(fa, fb)
    assert space.from_codes(space.codes(b), b.width) == b


def test_a_wider_model_is_sampled_from_the_same_budget() -> None:
    space = PlanSpace("resnet_fmnist", 4.0, widths=(1.0, 1.5))
    genome = Genome(space.uniform().levels, space.uniform().groups, width=1)
    plan = space.plan(genome)
    assert plan.width == 1.5 and plan.param_budget == space.budget
    model = get_spec("resnet_fmnist").create(width_mult=1.5)
    gm = nesc.transform(model, (torch.zeros(2, 1, 28, 28),), plan.nes_config(init="random"))
    assert abs(nesc.stored_params(nesc.freeze(gm)) - space.budget) <= 0.02 * space.budget
    assert sum(p.numel() for p in model.parameters()) > 2 * space.dense_params  # 1.5x wide: ~2.25x the weights


def test_genomes_with_one_identity_give_one_plan(space) -> None:
    # The largest layer with its own pool absorbs the budget's remainder: its level changes nothing.
    base = space.uniform()
    anchor = max(range(len(space.layers)), key=lambda i: space.layers[i].numel)
    other = Genome(tuple(4 if i == anchor else v for i, v in enumerate(base.levels)), base.groups, base.width)
    assert other != base and space.identity(other) == space.identity(base)
    assert space.plan(other).key == space.plan(base).key
    changed = Genome(tuple(4 if i == 0 else v for i, v in enumerate(base.levels)), base.groups, base.width)
    assert space.identity(changed) != space.identity(base) and space.plan(changed).key != space.plan(base).key
