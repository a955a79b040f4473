"""Default TVM schedules read off the blocks: the ``pointwise`` rule (a 1x1 conv's lanes along output
channels, for 16-lane registers), a depthwise conv's padded input computed per tile, the activation
after a batch norm in the conv's epilogue, and a pad after the epilogue in a pass of its own. Every
case is checked against eager PyTorch on the compiled module, and for the rule its functions got
(a rule that raises falls back silently to a slower one)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import BACKEND_REL

tvm_adapter = pytest.importorskip("nesc.backends.tvm.adapter", reason="needs the tvm extra")

from nesc.backends.tvm import targets  # noqa: E402
from nesc.backends.tvm.adapter import relax, s_tir, tvm  # noqa: E402
from nesc.backends.tvm.lower import lower  # noqa: E402
from nesc.backends.tvm.schedule import fuse, register_lanes, schedule_module  # noqa: E402
from nesc.backends.tvm.schedule_layout import deinterleave, pad_interior  # noqa: E402
from nesc.backends.tvm.schedule_primitives import MAX_INNER, VECTOR_LANES  # noqa: E402

TARGET = targets.get_target("llvm").tvm_target()


def build(model: nn.Module, x: torch.Tensor, lanes: int, dynamic: bool = False):
    """(run(x) -> numpy, {function: rule}, scheduled module) for ``model`` lowered at ``x``."""
    low = lower(model, (x,), dynamic_batch=dynamic)
    mod, rules = schedule_module(fuse(low.mod, TARGET), lanes)
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    params = [tvm.runtime.tensor(v) for v in low.params.values()]

    def run(inp: torch.Tensor) -> np.ndarray:
        out = vm["main"](tvm.runtime.tensor(inp.numpy()), *params)
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    return run, rules, mod


def assert_matches(got: np.ndarray, model: nn.Module, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max()), 1e-12)
    err = float(np.abs(got - want).max())
    assert err <= BACKEND_REL * scale, f"{what}: max abs error {err:.3g} > {BACKEND_REL} x output scale {scale:.3g}"


def conv_bn(ci: int, co: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Module:
    """conv -> batch norm (statistics away from their defaults) -> ReLU6, MobileNetV2's unit."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(ci, co, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(co),
                          nn.ReLU6()).eval()
    with torch.no_grad():
        block[1].running_mean.uniform_(-0.5, 0.5)
        block[1].running_var.uniform_(0.5, 1.5)
        block[1].weight.uniform_(0.5, 1.5)
    return block


def pad_shares_the_conv_loop(mod) -> bool:
    """Whether the conv function's pad block and its reduction share their outermost loop."""
    func = next(f for k, f in mod.functions_items() if "conv" in k.name_hint)
    sch, script = s_tir.Schedule(func), func.script()
    update = next(n for n in ("group_conv2d_nchw_update", "conv2d_nchw_update") if f'"{n}"' in script)
    pad = re.search(r'T\.sblock\("(pad_temp[^"]*)"\)', script).group(1)  # a vector tail renames it
    outer = [sch.get(sch.get_loops(sch.get_sblock(b))[0]) for b in (pad, update)]
    return outer[0].same_as(outer[1])


def conv_rules(rules: dict[str, str]) -> set[str]:
    return {v for k, v in rules.items() if "conv" in k}


def test_register_lanes_follow_the_target():
    assert register_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "znver1"})) == VECTOR_LANES
    assert register_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == MAX_INNER
    aarch64 = tvm.target.Target(targets.aarch64_llvm())
    assert register_lanes(aarch64) == VECTOR_LANES


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("ci, co, hw", [(24, 32, 14), (40, 48, 7)])
def test_pointwise_rule_runs_lanes_along_output_channels(ci, co, hw, batch, dynamic):
    # 14 x 14 and 7 x 7 fill no whole 8-lane register: with 16-lane registers the conv gets ``pointwise``
    model, x = conv_bn(ci, co), torch.randn(batch, ci, hw, hw)
    run, rules, mod = build(model, x, MAX_INNER, dynamic)
    assert conv_rules(rules) == {"pointwise"}, rules
    script = next(f for k, f in mod.functions_items() if "conv" in k.name_hint).script()
    assert f"T.int64({hw * hw})" in script  # H and W as one axis
    assert "weight_global" in script  # the transposed panel of the weight
    assert_matches(run(x), model, x, f"pointwise {ci}->{co} at {hw}x{hw}, batch {batch}")


def test_pointwise_rule_without_epilogue_and_with_a_residual_add():
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(32, 32, 1, bias=False)

        def forward(self, x):
            return self.conv(x) + x

    for model in (nn.Conv2d(16, 32, 1, bias=False).eval(), Residual().eval()):
        x = torch.randn(2, model.conv.in_channels if isinstance(model, Residual) else 16, 7, 7)
        run, rules, _ = build(model, x, MAX_INNER)
        assert conv_rules(rules) == {"pointwise"}, rules
        assert_matches(run(x), model, x, type(model).__name__)


@pytest.mark.parametrize("ci, co, hw, why", [
    (24, 32, 28, "28 x 28 = 784 fills whole registers: tiled's own lanes"),
    (24, 40, 14, "40 output channels are no multiple of 16 lanes"),
])
def test_pointwise_rule_gives_way_to_tiled(ci, co, hw, why):
    model, x = conv_bn(ci, co), torch.randn(1, ci, hw, hw)
    run, rules, _ = build(model, x, MAX_INNER)
    assert conv_rules(rules) == {"tiled"}, (why, rules)
    assert_matches(run(x), model, x, why)


def test_eight_lane_targets_keep_the_tiled_rule():
    model, x = conv_bn(24, 32), torch.randn(1, 24, 14, 14)
    run, rules, _ = build(model, x, VECTOR_LANES)
    assert conv_rules(rules) == {"tiled"}, rules
    assert_matches(run(x), model, x, "1x1 conv, 8 lanes")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch", [1, 2])
def test_depthwise_padded_input_is_computed_per_tile(stride, batch):
    model, x = conv_bn(16, 16, 3, stride, groups=16), torch.randn(batch, 16, 28, 28)
    run, rules, mod = build(model, x, VECTOR_LANES)
    assert conv_rules(rules) == {"tiled"}, rules
    # the pad block sits inside the conv's parallel loop (one loop nest), not in a pass of its own
    assert pad_shares_the_conv_loop(mod)
    assert_matches(run(x), model, x, f"depthwise stride {stride}, batch {batch}")


def test_a_dense_conv_keeps_its_padded_input_as_one_pass():
    # a dense 3x3 conv sums over input channels: per tile, every tile would pad all of them again
    model, x = conv_bn(8, 16, 3), torch.randn(1, 8, 16, 16)
    run, rules, mod = build(model, x, VECTOR_LANES)
    assert not pad_shares_the_conv_loop(mod)
    assert_matches(run(x), model, x, "dense 3x3 conv")


def test_the_activation_after_a_batch_norm_runs_in_the_conv_epilogue():
    model, x = conv_bn(16, 24), torch.randn(1, 16, 8, 8)
    run, rules, _ = build(model, x, VECTOR_LANES)
    assert not any("clip" in k and "conv" not in k for k in rules), rules  # no pass of its own
    assert any("conv" in k and "clip" in k for k in rules), rules
    assert_matches(run(x), model, x, "conv + batch norm + ReLU6")


class PadAfter(nn.Module):
    """conv -> ReLU -> channels padded (as a product map wraps them), fused into one function: the pad
    writes a larger tensor than the conv, and its border must be written too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return F.pad(F.relu(self.conv(x)), (0, 0, 0, 0, 0, 5), value=0.5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_pad_after_the_epilogue_writes_its_border(dynamic):
    torch.manual_seed(0)
    model, x = PadAfter().eval(), torch.randn(2, 8, 12, 12)
    run, rules, _ = build(model, x, VECTOR_LANES, dynamic)
    assert conv_rules(rules) == {"tiled"}, rules
    assert any("pad" in k and "conv" in k for k in rules), rules  # one function: conv, relu, pad
    assert_matches(run(x), model, x, "conv + relu + pad")


@pytest.mark.parametrize("stride, want", [(1, (1, 29)), (2, (1, 14))])
def test_pad_interior_is_where_every_column_phase_reads_the_input(stride, want):
    # 28 columns padded by 1 on each side: 30, of which [1, 29) read the input; split into 2 phases of
    # 15 (stride 2), x' in [1, 14) reads it in both phases (x' = 0 of phase 0 and x' = 14 of phase 1 are
    # the border)
    model = nn.Conv2d(8, 8, 3, stride, 1, groups=8, bias=False).eval()
    low = lower(model, (torch.randn(1, 8, 28, 28),), dynamic_batch=False)
    func = next(f for k, f in fuse(low.mod, TARGET).functions_items() if "conv" in k.name_hint)
    sch = s_tir.Schedule(func)
    pad, conv = sch.get_sblock("pad_temp"), sch.get_sblock("group_conv2d_nchw")
    assert deinterleave(sch, pad, conv) == (stride == 2)
    assert pad_interior(sch, pad) == want


def test_a_block_without_a_bounds_test_has_no_pad_interior():
    model = nn.Conv2d(8, 8, 1, bias=False).eval()  # a zero-width pad: a plain copy
    low = lower(model, (torch.randn(1, 8, 8, 8),), dynamic_batch=False)
    func = next(f for k, f in fuse(low.mod, TARGET).functions_items() if "conv" in k.name_hint)
    sch = s_tir.Schedule(func)
    assert pad_interior(sch, sch.get_sblock("pad_temp")) is None


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("ci, hw, stride", [(32, 4, 1), (16, 8, 2)])
def test_a_conv_with_rows_of_four_reads_its_input_through_im2col(ci, hw, stride, dynamic):
    # a 4 x 4 output fills no 8-lane register along its rows but does as one axis of 16: the input is
    # copied with the window unrolled, and H x W of the conv's reads are contiguous
    model, x = conv_bn(ci, 24, 3, stride), torch.randn(2, ci, hw, hw)
    run, rules, mod = build(model, x, VECTOR_LANES, dynamic)
    assert conv_rules(rules) == {"tiled"}, rules
    script = next(f for k, f in mod.functions_items() if "conv" in k.name_hint).script()
    assert "pad_temp_reindex" in script and "T.int64(16)" in script
    assert_matches(run(x), model, x, f"3x3 conv stride {stride} to 4 x 4")


def test_rows_of_whole_registers_need_no_im2col():
    model, x = conv_bn(8, 16, 3), torch.randn(1, 8, 8, 8)
    run, rules, mod = build(model, x, VECTOR_LANES)
    assert "reindex" not in next(f for k, f in mod.functions_items() if "conv" in k.name_hint).script()
    assert_matches(run(x), model, x, "3x3 conv at 8 x 8")


class Tokens(nn.Module):
    """A transformer's MLP on (batch, tokens, features): linear -> GELU -> linear."""

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("batch, tokens", [(1, 65), (2, 20)])
def test_panel_rule_runs_a_linear_layer_lanes_along_its_outputs(batch, tokens, dynamic):
    # 65 tokens (a ViT's 64 patches and a class token) fill no whole register along the rows: gemm
    # refuses them; the panel rule's lanes run along the 64 and 32 outputs instead
    torch.manual_seed(0)
    model, x = Tokens().eval(), torch.randn(batch, tokens, 32)
    run, rules, _ = build(model, x, MAX_INNER, dynamic)
    matmuls = {k: v for k, v in rules.items() if "matmul" in k}
    assert len(matmuls) == 2 and set(matmuls.values()) == {"panel"}, rules
    assert_matches(run(x), model, x, f"tokens {batch} x {tokens}")


@pytest.mark.parametrize("lanes, shape, features, why", [
    (MAX_INNER, (8, 32), 48, "8 rows in all: the panel's copy would cost more than it saves"),
    (MAX_INNER, (2, 20, 32), 40, "40 outputs are no multiple of 16 lanes"),
    (VECTOR_LANES, (2, 20, 32), 48, "8-lane targets keep gemm"),
])
def test_panel_rule_gives_way(lanes, shape, features, why):
    torch.manual_seed(0)
    model, x = nn.Linear(32, features).eval(), torch.randn(*shape)
    run, rules, _ = build(model, x, lanes)
    assert "panel" not in rules.values() and "none" not in rules.values(), (why, rules)
    assert_matches(run(x), model, x, why)


def test_gelu_runs_without_a_libm_call_per_element():
    torch.manual_seed(0)
    model, x = Tokens().eval(), 3 * torch.randn(1, 16, 32)  # well into erf's tails
    run, rules, mod = build(model, x, VECTOR_LANES)
    scripts = [f.script() for _, f in mod.functions_items() if hasattr(f, "script") and "gelu" in str(_)]
    assert scripts and not any("T.erf(" in s for s in scripts), rules
    assert_matches(run(x), model, x, "linear -> GELU -> linear")


def test_dot_blocks_rows_of_x_where_the_registers_hold_them():
    # 8 rows (a batch): with 32 registers, 4 rows x 4 outputs accumulate at once and every load of w
    # serves the 4 rows; with 16, one row at a time (16-lane accumulators are two registers each)
    torch.manual_seed(0)
    model, x = nn.Linear(64, 48).eval(), torch.randn(8, 64)
    unrolled = {}
    for lanes in (MAX_INNER, VECTOR_LANES):
        run, rules, mod = build(model, x, lanes)
        assert set(v for k, v in rules.items() if "matmul" in k) == {"dot"}, rules
        script = next(f for k, f in mod.functions_items() if "matmul" in k.name_hint).script()
        unrolled[lanes] = script.count("T.unroll(T.int64(4))")  # the outputs' block (and the rows')
        assert_matches(run(x), model, x, f"linear at batch 8, {lanes} lanes")
    assert unrolled[MAX_INNER] == 2 * unrolled[VECTOR_LANES], unrolled
