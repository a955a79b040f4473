"""nesc.summary / nesc.report: one row per weight at every stage (captured, trainable, frozen), reasons
on dense rows, totals that agree with nesc.stored_params, and a table that renders."""

from __future__ import annotations

import math

import pytest
import torch

import nesc
from helpers import (
    BUDGET_RTOL,
    CLOSE,
    COMPRESS_ALL,
    StageNet,
    assert_number_close,
    num_params,
    stage_net_inputs,
    transformed_registry,
)
from nesc.core import names
from nesc.report import Report

WEIGHTS = ["stem.weight", "conv3.weight", "conv1.weight", "mix.weight", "head.weight"]


@pytest.fixture(scope="module")
def stages():
    """(dense model, captured, trainable, frozen) of StageNet with two layers left dense."""
    torch.manual_seed(0)
    model = StageNet()
    x = stage_net_inputs()
    gm = nesc.transform(model, x, init="random", min_params=2000)  # stem (864) and head (640) stay dense
    return model, nesc.capture(model, x), gm, nesc.freeze(gm)


def _rows(report: Report) -> dict:
    return {r.name: r for r in report.rows}


def _check_rows(model, gm, states: set[str]) -> None:
    rows = _rows(nesc.summary(gm, print_table=False))
    assert list(rows) == WEIGHTS
    assert {r.state for r in rows.values()} == states
    for name, r in rows.items():
        assert r.params == model.get_parameter(name).numel()
        assert tuple(r.shape) == tuple(model.get_parameter(name).shape)
        assert r.madd > 0


def test_rows_for_every_weight_trainable_and_frozen(stages) -> None:
    model, _, gm, frozen = stages
    _check_rows(model, gm, {"dense", "sampled"})
    _check_rows(model, frozen, {"dense", "frozen"})


def test_rows_for_every_weight_of_a_captured_graph(stages) -> None:
    model, captured, _, _ = stages
    _check_rows(model, captured, {"dense"})


def test_dense_rows_carry_reasons_and_sampled_rows_their_pool(stages) -> None:
    _, _, gm, frozen = stages
    for gm_ in (gm, frozen):
        rows = _rows(nesc.summary(gm_, print_table=False))
        assert rows["stem.weight"].reason == "small: 864 < min_params=2000"
        assert rows["head.weight"].reason == "small: 640 < min_params=2000"
        assert rows["stem.weight"].pool == "" and rows["stem.weight"].stored == 864
        plan = gm.meta[names.PLAN]
        for name in ("conv3.weight", "conv1.weight", "mix.weight"):
            r = rows[name]
            pool_name, geometry = plan.layers[name]
            assert r.pool == pool_name and tuple(r.pool_shape) == plan.pools[pool_name].shape
            assert r.reason == "" and r.regen_madd > 0
            # stored: an equal share of the pool plus, per block, the 4 trainable start coordinates
            # (trainable) or the routing map's 8 scalars (frozen)
            share = math.prod(plan.pools[pool_name].shape) / len(plan.pools[pool_name].members)
            per_block = 8 if gm_ is frozen else 4
            assert_number_close(r.stored, per_block * geometry.num_blocks + share, CLOSE, name)


def test_totals_agree_with_stored_params_when_frozen(stages) -> None:
    model, _, _, frozen = stages
    report = nesc.summary(frozen, print_table=False)
    assert report.dense_params == num_params(model)
    assert report.stored_params == nesc.stored_params(frozen)
    other = sum(params for _, params in report.other_dense.values())
    assert_number_close(sum(r.stored for r in report.rows) + other, report.stored_params, CLOSE, "rows vs total")
    assert_number_close(report.ratio, num_params(model) / nesc.stored_params(frozen), CLOSE, "ratio")
    assert report.madd == sum(r.madd for r in report.rows)


def test_totals_agree_with_stored_params_when_trainable(stages) -> None:
    _, _, gm, _ = stages
    report = nesc.summary(gm, print_table=False)
    other = sum(params for _, params in report.other_dense.values())
    assert_number_close(sum(r.stored for r in report.rows) + other, report.stored_params, CLOSE, "rows vs total")


def test_captured_model_reports_everything_dense(stages) -> None:
    model, captured, _, _ = stages
    report = nesc.summary(captured, print_table=False)
    assert report.stored_params == report.dense_params == num_params(model)
    assert not report.pools and report.ratio == 1


def test_other_dense_parameters_are_grouped_by_reason(stages) -> None:
    _, _, gm, _ = stages
    report = nesc.summary(gm, print_table=False)
    # bn.weight + bn.bias (2 x 32), mix.bias + head.bias (64 + 10)
    assert sum(t for t, _ in report.other_dense.values()) == 4
    assert sum(p for _, p in report.other_dense.values()) == 64 + 74
    assert any("bias" in reason for reason in report.other_dense)


def test_str_renders_the_table(stages) -> None:
    _, _, gm, frozen = stages
    for gm_ in (gm, frozen):
        report = nesc.summary(gm_, print_table=False)
        text = str(report)
        for name in WEIGHTS:
            assert name in text
        assert "small: 864 < min_params=2000" in text
        assert f"{report.stored_params:,}" in text and f"{report.dense_params:,}" in text
        assert "total" in text


def test_summary_prints_when_asked(stages, capsys) -> None:
    _, _, gm, _ = stages
    nesc.summary(gm)
    out = capsys.readouterr().out
    assert "28,266" in out and f"{nesc.stored_params(gm):,}" in out


def test_to_dict_is_plain_data(stages) -> None:
    import json

    _, _, _, frozen = stages
    d = nesc.summary(frozen, print_table=False).to_dict()
    back = json.loads(json.dumps(d))
    assert [r["name"] for r in back["rows"]] == WEIGHTS
    assert back["stored_params"] == nesc.stored_params(frozen)


def test_shared_pool_rows_say_how_many_share() -> None:
    torch.manual_seed(0)
    gm = nesc.transform(StageNet(), stage_net_inputs(), init="random", ratio=2, policy="global", **COMPRESS_ALL)
    rows = _rows(nesc.summary(gm, print_table=False))
    assert {r.pool for r in rows.values()} == {"nesc_pool_0"}
    assert {r.shares_with for r in rows.values()} == {4}


def test_registry_model_report_totals(tmp_path) -> None:
    model, gm = transformed_registry("resnet18_cifar")
    report = nesc.summary(gm, print_table=False)
    assert report.dense_params == num_params(model)
    assert len(report.rows) == 21  # 20 convs (incl. 3 downsample) + fc
    assert report.rows[0].reason and report.rows[-1].reason  # first conv and classifier kept dense
    assert abs(report.ratio - 4) <= BUDGET_RTOL * 4


class _TiedAttention(torch.nn.Module):
    """A tied embedding + head and a cross-attention whose packed projection two ops read as slices."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(40, 32)
        self.attn = torch.nn.MultiheadAttention(32, 2, batch_first=True)
        self.head = torch.nn.Linear(32, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids, memory):
        return self.head(self.attn(self.embed(ids), memory, memory, need_weights=False)[0])


@pytest.mark.parametrize("stage", ["captured", "frozen"])
def test_a_weight_read_by_several_ops_reports_the_multiply_adds_of_all_of_them(stage: str) -> None:
    # Per example, by hand: the head (5 positions x 32 x 40), q (5 x 32 x 32), k and v (7 x 64 x 32).
    torch.manual_seed(0)
    model, x = _TiedAttention().eval(), (torch.randint(0, 40, (2, 5)), torch.randn(2, 7, 32))
    gm = nesc.capture(model, x) if stage == "captured" else nesc.freeze(nesc.transform(model, x, ratio=2, **COMPRESS_ALL))
    rows = _rows(nesc.summary(gm, print_table=False))
    assert rows["embed.weight"].madd == 5 * 32 * 40  # the lookup is free; the tied head is not
    assert rows["attn.in_proj_weight"].madd == 5 * 32 * 32 + 7 * 64 * 32  # q from the query; k, v from the memory
    assert rows["attn.out_proj.weight"].madd == 5 * 32 * 32
    assert set(rows) == {"embed.weight", "attn.in_proj_weight", "attn.out_proj.weight"}
