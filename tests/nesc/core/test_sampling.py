"""nesc.core.sampling, nesc.core.wide and nesc.core.modules: the sampler equals DESIGN.md's rule
element by element, is differentiable in the pool and the start indices for every layer kind, and its
frozen custom op is the same function.

References are independent: ``helpers.naive_regenerate`` loops over every weight element and the 2^4
interpolation corners in float64; gradients are checked by finite differences (gradcheck).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CLOSE, EXACT, F64, REGENERATE, assert_close, naive_regenerate
from nesc.core.errors import ConfigError
from nesc.core.modules import EpitomeSampler, RoutingMap, TransformationLearner, set_sampling_width, start_stats
from nesc.core.sampling import (
    Geometry,
    regenerate,
    regenerate_indexed,
    split_starts,
    to_param_layout,
    window_index,
)
from nesc.core.wide import regenerate_wide, tent_weights

# name -> (weight (O, I, kh, kw), pool (Op, Ip, Kh, Kw), block (bo, bi), layout)
GEOMETRIES = {
    "conv3x3_from_5x5_pool": ((8, 6, 3, 3), (5, 4, 5, 5), (5, 4), "conv2d"),
    "conv1x1_from_3x3_pool": ((8, 6, 1, 1), (4, 3, 3, 3), (4, 3), "conv2d"),
    "depthwise": ((6, 1, 3, 3), (4, 1, 3, 3), (4, 1), "conv2d"),
    "conv1d": ((6, 4, 1, 3), (3, 2, 1, 5), (3, 2), "conv1d"),
    "linear": ((7, 5, 1, 1), (4, 3, 1, 1), (4, 3), "linear"),
    "linear_t": ((7, 5, 1, 1), (3, 2, 1, 1), (3, 2), "linear_t"),
    # pool much narrower than the layer: many blocks, channel reads wrap around the pool
    "narrow_pool_wraps": ((10, 9, 3, 3), (3, 2, 3, 3), (2, 2), "conv2d"),
}


def _gain(value: float) -> torch.Tensor:
    """A routing map's gain as the regenerate op takes it: a 0-d float64 tensor."""
    return torch.tensor(value, dtype=torch.float64)


def _random_starts(geometry: Geometry, seed: int) -> torch.Tensor:
    """Real starts over a wide range: negative and beyond the pool (channels wrap, spatial clamps)."""
    g = torch.Generator().manual_seed(seed)
    Op, Ip, Kh, Kw = geometry.pool
    span = torch.tensor([3.0 * Op, 3.0 * Ip, Kh + 1.0, Kw + 1.0], dtype=torch.float64)
    low = torch.tensor([-Op, -Ip, -1.0, -1.0], dtype=torch.float64)
    return torch.rand(*geometry.grid, 4, generator=g, dtype=torch.float64) * span + low


def _interior_starts(geometry: Geometry, seed: int) -> torch.Tensor:
    """Starts whose every coordinate is at least 0.2 from an integer and inside the spatial range,
    so the sampler is differentiable there and finite differences do not straddle a kink."""
    g = torch.Generator().manual_seed(seed)
    Op, Ip, Kh, Kw = geometry.pool
    _, _, kh, kw = geometry.shape
    whole = torch.stack(
        [
            torch.randint(-Op, 2 * Op, geometry.grid, generator=g),
            torch.randint(-Ip, 2 * Ip, geometry.grid, generator=g),
            torch.randint(0, max(Kh - kh, 1), geometry.grid, generator=g),
            torch.randint(0, max(Kw - kw, 1), geometry.grid, generator=g),
        ],
        dim=-1,
    ).double()
    return whole + 0.2 + 0.6 * torch.rand(*geometry.grid, 4, generator=g, dtype=torch.float64)


def _sample(pool: torch.Tensor, starts: torch.Tensor, scale: float, geometry: Geometry) -> torch.Tensor:
    return regenerate(pool, *split_starts(starts, geometry), scale, geometry)


# ------------------------------------------------------------------------------ the sampling rule


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_regenerate_equals_naive_per_element_reference(name: str, seed: int) -> None:
    geometry = Geometry(*GEOMETRIES[name])
    pool = torch.randn(geometry.pool, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    starts = _random_starts(geometry, seed)

    weight = _sample(pool, starts, 0.7, geometry)

    assert weight.shape == geometry.param_shape
    assert_close(weight, naive_regenerate(pool, starts, 0.7, geometry), F64, name)


@st.composite
def geometries(draw) -> Geometry:
    """Any valid geometry: weight, pool at least one kernel window, blocks that fit both, a layout
    the kernel allows."""
    layout = draw(st.sampled_from(["conv2d", "conv1d", "linear", "linear_t"]))
    kh = draw(st.integers(1, 3)) if layout == "conv2d" else 1
    kw = draw(st.integers(1, 3)) if layout in ("conv2d", "conv1d") else 1
    O, I = draw(st.integers(1, 7)), draw(st.integers(1, 6))
    Op, Ip = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    # a pool may be spatially larger than the kernel whatever the layer type (a shared pool)
    Kh, Kw = kh + draw(st.integers(0, 2)), kw + draw(st.integers(0, 2))
    bo, bi = draw(st.integers(1, min(O, Op))), draw(st.integers(1, min(I, Ip)))
    return Geometry((O, I, kh, kw), (Op, Ip, Kh, Kw), (bo, bi), layout)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)  # reproducible; writes no files
@given(geometry=geometries(), seed=st.integers(0, 2**16), scale=st.floats(0.1, 3.0))
def test_regenerate_equals_naive_reference_for_any_geometry(geometry: Geometry, seed: int, scale: float) -> None:
    pool = torch.randn(geometry.pool, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    starts = _random_starts(geometry, seed)
    assert_close(
        _sample(pool, starts, scale, geometry), naive_regenerate(pool, starts, scale, geometry), F64, str(geometry)
    )


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(geometry=geometries(), seed=st.integers(0, 2**16), scale=st.floats(0.1, 3.0))
def test_indexed_regenerate_equals_naive_reference_for_any_geometry(geometry: Geometry, seed: int, scale: float) -> None:
    # The index-arithmetic form the lowerings (ONNX, TVM) trace: same rule, checked independently.
    pool = torch.randn(geometry.pool, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    starts = _random_starts(geometry, seed)
    out = regenerate_indexed(pool, *split_starts(starts, geometry), scale, geometry)
    assert_close(out, naive_regenerate(pool, starts, scale, geometry), F64, str(geometry))


@pytest.mark.parametrize("name", GEOMETRIES)
def test_indexed_regenerate_is_bit_identical_to_eager_with_the_same_gradients(name: str) -> None:
    geometry = Geometry(*GEOMETRIES[name])
    base, frac = split_starts(_interior_starts(geometry, 3).float(), geometry)
    pool = torch.randn(geometry.pool, requires_grad=True)
    frac = frac.detach().requires_grad_()
    eager, indexed = regenerate(pool, base, frac, 0.5, geometry), regenerate_indexed(pool, base, frac, 0.5, geometry)
    assert_close(indexed, eager, EXACT, name)
    grad_out = torch.randn_like(eager)
    for got, want, what in zip(
        torch.autograd.grad(indexed, (pool, frac), grad_out),
        torch.autograd.grad(eager, (pool, frac), grad_out),
        ("pool gradient", "fraction gradient"),
    ):
        assert_close(got, want, CLOSE, f"{name}: {what}")


def test_window_index_covers_each_window_plus_one_interpolation_row_per_active_axis() -> None:
    geometry = Geometry(*GEOMETRIES["conv3x3_from_5x5_pool"])  # every axis active
    base, _ = split_starts(_random_starts(geometry, 0).float(), geometry)
    index = window_index(base, geometry)
    (nbo, nbi), (bo, bi), (kh, kw) = geometry.grid, geometry.block, geometry.shape[2:]
    assert index.shape == (nbo, nbi, bo + 1, bi + 1, kh + 1, kw + 1) and index.dtype == torch.int64
    assert int(index.min()) >= 0 and int(index.max()) < torch.Size(geometry.pool).numel()


def test_integer_starts_copy_pool_windows_exactly() -> None:
    # With integer starts no interpolation happens: each block is a verbatim (wrapped) window.
    geometry = Geometry((4, 2, 3, 3), (3, 2, 3, 3), (2, 2), "conv2d")
    pool = torch.randn(3, 2, 3, 3)
    starts = torch.tensor([[[2.0, 0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0, 0.0]]])
    weight = _sample(pool, starts, 1.0, geometry)
    assert_close(weight[:2], pool[[2, 0]], EXACT, "block 0 wraps from pool row 2 to row 0")
    assert_close(weight[2:], pool[:2][:, [1, 0]], EXACT, "block 1 wraps along the input axis")


@pytest.mark.parametrize("name", GEOMETRIES)
def test_split_starts_wraps_channels_and_clamps_space(name: str) -> None:
    geometry = Geometry(*GEOMETRIES[name])
    starts = _random_starts(geometry, 3)
    base, frac = split_starts(starts, geometry)
    ylim, xlim = geometry.start_limits

    assert base.dtype == torch.int32 and frac.dtype == starts.dtype
    assert ((frac >= 0) & (frac < 1)).all()
    assert (base[..., 0] >= 0).all() and (base[..., 0] < geometry.pool[0]).all()
    assert (base[..., 1] >= 0).all() and (base[..., 1] < geometry.pool[1]).all()
    assert (base[..., 2] <= ylim).all() and (base[..., 3] <= xlim).all() and (base >= 0).all()
    # Channel starts differ from the raw start by a multiple of the pool width; axes that cannot
    # move (a pool axis of width 1, a kernel as large as the pool) carry no fraction.
    for d, width in enumerate(geometry.pool[:2]):
        if width > 1:
            turns = (starts[..., d] - (base[..., d].double() + frac[..., d])) / width
            assert_close(turns, turns.round(), F64, f"channel axis {d} wraps by whole turns")
    for d, active in enumerate(geometry.active):
        if not active:
            assert (frac[..., d] == 0).all() and (base[..., d] == 0).all()


def test_split_starts_made_first_in_inference_mode_still_differentiates() -> None:
    """``split_starts``' clamp bounds are cached per geometry: a first call in inference mode (an eval
    loop before training) must not leave constants that a training step's clamp cannot save."""
    geometry = Geometry((7, 6, 3, 3), (5, 4, 5, 4), (5, 3), "conv2d")  # a geometry no other test uses
    with torch.inference_mode():
        split_starts(_random_starts(geometry, 0), geometry)
    starts = _random_starts(geometry, 1).requires_grad_()
    frac = split_starts(starts, geometry)[1]
    (frac * torch.arange(4, dtype=frac.dtype)).sum().backward()
    ylim, xlim = geometry.start_limits
    y, x, free = starts[..., 2], starts[..., 3], torch.ones_like(starts[..., 0])  # channels never clamp
    inside = torch.stack([free, free, (y >= 0) & (y <= ylim), (x >= 0) & (x <= xlim)], -1)
    assert_close(starts.grad, torch.arange(4, dtype=frac.dtype) * inside, F64, "gradient of the fractions")


def test_regenerate_reads_a_pool_of_any_strides() -> None:
    """Windows are strided views at the pool's own strides and storage offset: a pool that is a
    transposed, offset view of its storage gives the weight and gradient of its contiguous copy."""
    geometry = Geometry(*GEOMETRIES["conv3x3_from_5x5_pool"])
    storage = torch.randn(2, *reversed(geometry.pool), dtype=torch.float64, requires_grad=True)
    strided = storage[1].permute(3, 2, 1, 0)
    assert not strided.is_contiguous() and strided.storage_offset() > 0
    dense = strided.detach().contiguous().requires_grad_()
    base, frac = split_starts(_interior_starts(geometry, 4), geometry)
    grad_out = torch.randn(geometry.param_shape, dtype=torch.float64)
    got, want = regenerate(strided, base, frac, 0.8, geometry), regenerate(dense, base, frac, 0.8, geometry)
    assert_close(got, want, F64, "weight")
    got_grad = torch.autograd.grad(got, storage, grad_out)[0][1].permute(3, 2, 1, 0)
    assert_close(got_grad, torch.autograd.grad(want, dense, grad_out)[0], F64, "pool gradient")


# What a training step pays per sampled layer beyond its memory passes: ops dispatched (forward +
# backward of one 9-block conv weight; 205 before the windows became one strided view each).
MAX_OPS_PER_REGENERATION = 160


def test_a_regeneration_dispatches_a_bounded_number_of_ops() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    geometry = Geometry((32, 32, 3, 3), (15, 15, 3, 3), (11, 11), "conv2d")
    pool = torch.randn(geometry.pool, requires_grad=True)
    starts = _interior_starts(geometry, 6).float().requires_grad_()

    def step() -> None:
        regenerate(pool, *split_starts(starts, geometry), 0.5, geometry).sum().backward()

    step()  # constants built once per geometry are not per-step cost
    with Count():
        step()
    assert 0 < Count.calls <= MAX_OPS_PER_REGENERATION, f"{Count.calls} ops per forward + backward"


# ------------------------------------------------------------------------------------- gradients

# name -> geometry; one per layer kind nesc samples.
LAYER_KINDS = {
    "conv2d": ((6, 4, 3, 3), (4, 3, 5, 5), (4, 3), "conv2d"),
    "depthwise": ((6, 1, 3, 3), (4, 1, 4, 4), (4, 1), "conv2d"),
    "grouped": ((6, 2, 3, 3), (3, 2, 4, 5), (3, 2), "conv2d"),
    "conv1d": ((6, 4, 1, 3), (3, 3, 1, 5), (3, 3), "conv1d"),
    "linear": ((7, 5, 1, 1), (4, 3, 1, 1), (4, 3), "linear"),
    "matmul": ((7, 5, 1, 1), (4, 3, 1, 1), (4, 3), "linear_t"),
}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_sampler_gradcheck_in_pool_and_starts(kind: str) -> None:
    geometry = Geometry(*LAYER_KINDS[kind])
    pool = torch.randn(geometry.pool, dtype=torch.float64, requires_grad=True)
    starts = _interior_starts(geometry, 0).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, s: _sample(p, s, 1.3, geometry), (pool, starts))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_epitome_sampler_module_gradcheck(kind: str) -> None:
    # The trainable module itself (starts as its parameter), in float64.
    geometry = Geometry(*LAYER_KINDS[kind])
    sampler = EpitomeSampler(geometry, _interior_starts(geometry, 1), 0.8, "w").double()
    pool = torch.randn(geometry.pool, dtype=torch.float64, requires_grad=True)
    starts = sampler.starts.detach().clone().requires_grad_()

    def f(p, s):
        return torch.func.functional_call(sampler, {"starts": s}, (p,))

    assert torch.autograd.gradcheck(f, (pool, starts))
    sampler(pool).sum().backward()
    assert sampler.starts.grad is not None and sampler.starts.grad.abs().sum() > 0, "starts get no gradient"


def test_start_gradient_is_the_difference_of_neighbouring_windows_on_each_axis() -> None:
    # W is multilinear in the fractions, so dW/ds_d is W with s_d rounded up minus W with s_d
    # rounded down (other coordinates unchanged), on every axis that can move.
    geometry = Geometry((3, 2, 3, 3), (4, 3, 5, 5), (3, 2), "conv2d")
    assert all(geometry.active)
    pool = torch.randn(geometry.pool, dtype=torch.float64)
    s = torch.tensor([[[1.3, 2.6, 0.4, 1.7]]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_sample(pool, s, 1.0, geometry).sum(), s)
    for d in range(4):
        lo, hi = s.detach().clone(), s.detach().clone()
        lo[..., d] = lo[..., d].floor()
        hi[..., d] = hi[..., d].floor() + 1
        slope = naive_regenerate(pool, hi, 1.0, geometry).sum() - naive_regenerate(pool, lo, 1.0, geometry).sum()
        assert_close(grad[0, 0, d], slope, F64, f"axis {d}")


# ----------------------------------------------------------------------------- frozen custom op


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_custom_op_equals_python_function_and_its_gradients(kind: str) -> None:
    geometry = Geometry(*LAYER_KINDS[kind])
    base, frac = split_starts(_interior_starts(geometry, 2).float(), geometry)
    pool = torch.randn(geometry.pool, requires_grad=True)
    frac = frac.detach().requires_grad_()
    args = (_gain(0.5), list(geometry.shape), list(geometry.block), geometry.layout)

    out_op = REGENERATE(pool, base, frac, *args)
    out_py = regenerate(pool, base, frac, 0.5, geometry)
    assert_close(out_op, out_py, EXACT, "op vs python")

    grad_out = torch.randn_like(out_py)
    gp_op, gf_op = torch.autograd.grad(out_op, (pool, frac), grad_out)
    gp_py, gf_py = torch.autograd.grad(out_py, (pool, frac), grad_out)
    assert_close(gp_op, gp_py, CLOSE, "pool gradient")
    assert_close(gf_op, gf_py, CLOSE, "fraction gradient")
    assert gp_op.abs().sum() > 0


def _op_args(geometry: Geometry, seed: int) -> tuple:
    """Arguments of torch.ops.nesc.regenerate for ``geometry``, with float64 pool and fractions to check."""
    base, frac = split_starts(_interior_starts(geometry, seed), geometry)
    pool = torch.randn(geometry.pool, dtype=torch.float64, requires_grad=True)
    frac = frac.detach().requires_grad_()
    return (pool, base, frac, _gain(0.5), list(geometry.shape), list(geometry.block), geometry.layout)


@pytest.mark.parametrize(
    "geometry",
    [
        pytest.param(((8, 6, 3, 3), (4, 3, 3, 3), (4, 3), "conv2d"), id="conv2d_blocks_divide"),
        pytest.param(((8, 6, 1, 3), (4, 3, 1, 3), (4, 3), "conv1d"), id="conv1d_blocks_divide"),
        pytest.param(((7, 5, 1, 1), (4, 3, 1, 1), (4, 3), "linear_t"), id="linear_t_uneven"),
        pytest.param(((6, 4, 3, 3), (4, 3, 5, 5), (4, 3), "conv2d"), id="conv2d_uneven"),
        pytest.param(((7, 5, 1, 1), (4, 3, 1, 1), (4, 3), "linear"), id="linear_uneven"),
    ],
)
def test_custom_op_passes_opcheck_schema_autograd_and_fake(geometry: tuple) -> None:
    # "uneven": the block grid overhangs the weight; the real kernel must still match the fake one
    # (shape and strides), which torch.export / torch.compile trace with.
    geometry = Geometry(*geometry)
    args = _op_args(geometry, seed=4)
    torch.library.opcheck(REGENERATE, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.slow  # torch.compile's AOT tracing takes ~13 s on one core
@pytest.mark.parametrize("geometry", [((8, 6, 1, 1), (4, 3, 3, 3), (4, 3), "conv2d"),  # 1x1 conv, 3x3 pool
                                      ((160, 160, 1, 1), (130, 130, 1, 1), (130, 130), "linear")],  # large blocks
                         ids=["spatial-axes-move", "large-blocks"])
def test_custom_op_backward_traces_under_aot_autograd(geometry) -> None:
    # While AOTAutograd traces, large blocks' backward is one nesc::regenerate_backward node (its fake gives
    # the shapes), small blocks' the gather's autograd.
    args = _op_args(Geometry(*geometry), seed=5)
    torch.library.opcheck(REGENERATE, args, test_utils=("test_aot_dispatch_dynamic",))


def test_regenerate_takes_an_incoming_gradient_of_any_strides() -> None:
    """A weight read through a permuted view gets back a non-contiguous gradient; the blocks' backward
    agrees with the gather form on it. Blocks that divide the weight: no padding copy makes the
    gradient contiguous first."""
    geometry = Geometry((8, 6, 3, 3), (5, 4, 4, 5), (4, 3), "conv2d")
    pool, base, frac, scale, *_ = _op_args(geometry, seed=9)
    weights = torch.randn(geometry.shape[2], geometry.shape[3], *geometry.shape[:2], dtype=torch.float64)
    grads = []
    for fn in (regenerate, regenerate_indexed):
        loss = (fn(pool, base, frac, scale, geometry).permute(2, 3, 0, 1) * weights).sum()
        grads.append(torch.autograd.grad(loss, (pool, frac)))
    for got, want, what in zip(grads[0], grads[1], ("pool", "fractions")):
        assert_close(got, want, F64, what)


@pytest.mark.parametrize("geometry", [LAYER_KINDS["conv2d"], LAYER_KINDS["linear"],
                                      # blocks over INDEXED_BLOCK_NUMEL: the sliced path
                                      ((130, 64, 1, 1), (70, 60, 1, 1), (65, 60), "linear"),
                                      ((40, 40, 3, 3), (22, 22, 4, 3), (20, 20), "conv2d")],
                         ids=["conv2d", "linear", "large-linear", "large-conv2d"])
def test_the_backward_op_is_the_gradient_of_the_gather_form(geometry) -> None:
    """``nesc::regenerate_backward`` (the compiled backward's kernel) against autograd through
    ``regenerate_indexed``, float64; and its schema and fake kernel agree with the real one."""
    geometry = Geometry(*geometry)
    pool, base, frac, scale, *static = _op_args(geometry, seed=8)
    reference = regenerate_indexed(pool, base, frac, scale, geometry)
    grad = torch.randn_like(reference)
    gp, gf = torch.ops.nesc.regenerate_backward(grad, pool.detach(), base, frac.detach(), scale, *static)
    rp, rf = torch.autograd.grad(reference, (pool, frac), grad)
    assert_close(gp, rp, F64, "pool gradient")
    assert_close(gf, rf, F64, "fraction gradient")
    torch.library.opcheck(torch.ops.nesc.regenerate_backward.default,
                          (grad, pool.detach(), base, frac.detach(), scale, *static),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("geometry, opaque", [
    (((192, 192, 1, 1), (100, 100, 1, 1), (100, 100), "linear"), True),  # over COMPILED_GATHER_NUMEL: the ops
    (((8, 6, 3, 3), (4, 3, 3, 3), (4, 3), "conv2d"), False),  # small blocks: the gather, traced into the graph
], ids=["large-blocks", "small-blocks"])
def test_a_compiled_sampler_trains_like_eager_without_graph_breaks(geometry, opaque: bool) -> None:
    from torch.profiler import profile

    geometry = Geometry(*geometry)
    eager = EpitomeSampler(geometry, _interior_starts(geometry, 7), 0.5, "w")
    compiled = EpitomeSampler(geometry, eager.starts.detach().clone(), 0.5, "w")
    pool = torch.randn(geometry.pool)
    pools = pool.clone().requires_grad_(), pool.clone().requires_grad_()
    assert torch._dynamo.explain(compiled)(pools[1]).graph_break_count == 0
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    (eager(pools[0]) ** 2).sum().backward()
    with profile() as prof:
        (run(pools[1]) ** 2).sum().backward()
    calls = sum(e.count for e in prof.key_averages() if e.key == "nesc::regenerate_backward")
    assert (calls > 0) == opaque, f"nesc::regenerate_backward ran {calls} times"
    assert_close(pools[1].grad, pools[0].grad, CLOSE, "pool gradient")
    assert_close(compiled.starts.grad, eager.starts.grad, CLOSE, "start gradient")


def test_routing_map_stores_int32_starts_and_float_fractions() -> None:
    rm = RoutingMap(torch.tensor([[[1, 2, 0, 0]]]), torch.tensor([[[0.5, 0.25, 0.0, 0.0]]], dtype=torch.float64))
    assert rm.starts.dtype == torch.int32 and rm.fracs.dtype == torch.float32
    assert [n for n, _ in rm.named_buffers()] == ["starts", "fracs"] and not list(rm.parameters())


# ---------------------------------------------------------------------------- sampler and learner


def test_epitome_sampler_routing_is_what_eval_mode_samples() -> None:
    geometry = Geometry(*LAYER_KINDS["conv2d"])
    sampler = EpitomeSampler(geometry, _interior_starts(geometry, 6), 0.9, "conv.weight")
    pool = torch.randn(geometry.pool)
    base, frac = sampler.routing()
    assert base.dtype == torch.int32 and not frac.requires_grad
    with torch.no_grad():
        assert_close(
            REGENERATE(pool, base, frac, _gain(0.9), list(geometry.shape), list(geometry.block), "conv2d"),
            sampler.eval()(pool),
            EXACT,
            "routing map vs sampler",
        )


def test_epitome_sampler_rejects_starts_of_the_wrong_grid() -> None:
    geometry = Geometry(*LAYER_KINDS["conv2d"])
    with pytest.raises(ValueError, match=r"starts must be \(2, 2, 4\)"):
        EpitomeSampler(geometry, torch.zeros(1, 1, 4), 1.0, "w")


@pytest.mark.parametrize(
    "shape, pool, block, layout, message",
    [
        ((4, 4, 3, 3), (4, 4, 1, 1), (4, 4), "conv2d", "smaller than one kernel window"),
        ((4, 4, 1, 1), (2, 2, 1, 1), (4, 2), "linear", "must fit both"),
        ((4, 4, 1, 1), (2, 2, 1, 1), (2, 2), "conv3d", "unknown layout"),
    ],
)
def test_geometry_validates_on_construction(shape, pool, block, layout, message) -> None:
    with pytest.raises(ValueError, match=message):
        Geometry(shape, pool, block, layout)


@pytest.mark.parametrize(
    "layout, expected", [("conv2d", (3, 2, 1, 4)), ("conv1d", (3, 2, 4)), ("linear", (3, 2)), ("linear_t", (2, 3))]
)
def test_param_layouts(layout: str, expected: tuple) -> None:
    kw = 4 if layout.startswith("conv") else 1
    w4 = torch.randn(3, 2, 1, kw)
    assert Geometry((3, 2, 1, kw), (3, 2, 1, kw), (3, 2), layout).param_shape == expected
    out = to_param_layout(w4, layout)
    assert out.shape == expected
    flat = w4.reshape(3, 2, kw)
    want = {"conv2d": w4, "conv1d": flat, "linear": flat[..., 0], "linear_t": flat[..., 0].t()}[layout]
    assert_close(out, want, EXACT, layout)


def _learner(seed: int = 0) -> TransformationLearner:
    learner = TransformationLearner(in_channels=5, grid=(2, 3), channel_dim=1, momentum=0.1)
    torch.nn.init.normal_(learner.fc.weight, generator=torch.Generator().manual_seed(seed))
    return learner


def test_learner_starts_from_zero_offsets() -> None:
    learner = TransformationLearner(in_channels=5, grid=(2, 3), channel_dim=1)
    assert_close(learner.train()(torch.randn(2, 5, 4, 4)), torch.zeros(2, 3, 4), EXACT, "fresh learner")


def test_learner_train_offsets_depend_on_the_input() -> None:
    learner = _learner().train()
    x1, x2 = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4) + 1.0
    o1, o2 = learner(x1), learner(x2)
    assert o1.shape == (2, 3, 4)
    assert not torch.allclose(o1, o2), "train-mode offsets ignore the input features"
    # Offsets are a function of the batch-averaged channel features: (C,) -> fc.
    feats = x1.mean((0, 2, 3))
    assert_close(o1, learner.fc(feats).view(2, 3, 4), CLOSE, "offset = fc(mean features)")
    o1.sum().backward()
    assert learner.fc.weight.grad is not None and learner.fc.weight.grad.abs().sum() > 0


def test_learner_eval_uses_the_running_average() -> None:
    learner = _learner().train()
    x1, x2 = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    with torch.no_grad():
        o1 = learner(x1)
        o2 = learner(x2)
    expected = 0.9 * (0.1 * o1) + 0.1 * o2  # two momentum-0.1 updates of an average that starts at 0
    assert_close(learner.running_offset, expected, CLOSE, "running average")
    running = learner.running_offset.clone()
    learner.eval()
    e1, e2 = learner(torch.randn(2, 5, 4, 4)), learner(100 * torch.randn(2, 5, 4, 4))
    assert_close(e1, running, EXACT, "eval offset")
    assert_close(e2, running, EXACT, "eval offset is input-independent")
    assert_close(learner.running_offset, running, EXACT, "eval does not update the average")


def test_sampler_with_learner_train_depends_on_input_eval_uses_running_offset() -> None:
    geometry = Geometry((6, 4, 3, 3), (4, 3, 5, 5), (4, 3), "conv2d")
    learner = TransformationLearner(4, geometry.grid, channel_dim=1)
    torch.nn.init.normal_(learner.fc.weight, std=0.3, generator=torch.Generator().manual_seed(0))
    sampler = EpitomeSampler(geometry, _interior_starts(geometry, 7), 1.0, "w", learner).train()
    pool = torch.randn(geometry.pool)
    x1, x2 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6) + 2.0
    w1, w2 = sampler(pool, x1), sampler(pool, x2)
    assert not torch.allclose(w1, w2), "train-mode weights ignore the features"
    sampler.eval()
    expected = _sample(pool, sampler.starts + learner.running_offset, 1.0, geometry)
    assert_close(sampler(pool, x1), expected, EXACT, "eval with features")
    assert_close(sampler(pool), expected, EXACT, "eval without features")
    base, frac = sampler.routing()
    assert_close(regenerate(pool, base, frac, 1.0, geometry), expected, EXACT, "routing map")


def test_sampler_with_learner_without_features_uses_the_running_average() -> None:
    # A read of the weight that feeds no op with features (e.g. a tied weight's second use).
    geometry = Geometry((6, 4, 3, 3), (4, 3, 5, 5), (4, 3), "conv2d")
    learner = TransformationLearner(4, geometry.grid, channel_dim=1)
    with torch.no_grad():
        learner.running_offset.uniform_(0.1, 0.9)
    sampler = EpitomeSampler(geometry, _interior_starts(geometry, 8), 1.0, "blk.weight", learner).train()
    pool = torch.randn(geometry.pool)
    expected = _sample(pool, sampler.starts + learner.running_offset, 1.0, geometry)
    assert_close(sampler(pool), expected, EXACT, "train mode, no features")


# ------------------------------------------------------------------ wider sampling kernels (annealing)


def _naive_wide(pool: torch.Tensor, starts: torch.Tensor, scale: float, geometry: Geometry, width: float) -> torch.Tensor:
    """The tent-kernel rule one weight element at a time, in float64: along each axis the block can
    move, the rows n with |n - s| < width weigh (1 - |n - s| / width), normalised; channels wrap,
    spatial starts clamp to [0, K - k] and spatial reads to the pool's edge."""
    import itertools

    O, I, kh, kw = geometry.shape
    Op, Ip, Kh, Kw = geometry.pool
    bo, bi = geometry.block
    W = torch.zeros(O, I, kh, kw, dtype=torch.float64)

    def taps(s: float, d: int):
        if not geometry.active[d]:
            return [(0, 1.0)]
        rows = range(math.floor(s) - math.ceil(width) + 1, math.floor(s) + math.ceil(width) + 1)
        w = [(n, max(0.0, 1 - abs(n - s) / width)) for n in rows]
        total = sum(v for _, v in w)
        return [(n, v / total) for n, v in w]

    for o, i in itertools.product(range(O), range(I)):
        (j, a), (k, b) = divmod(o, bo), divmod(i, bi)
        s = [float(v) for v in starts[j, k]]
        s[2] = min(max(s[2], 0.0), Kh - kh)
        s[3] = min(max(s[3], 0.0), Kw - kw)
        for u, v in itertools.product(range(kh), range(kw)):
            acc = 0.0
            for (no, wo), (ni, wi), (ny, wy), (nx, wx) in itertools.product(*(taps(s[d], d) for d in range(4))):
                py = min(max(ny + u, 0), Kh - 1)
                px = min(max(nx + v, 0), Kw - 1)
                acc += wo * wi * wy * wx * float(pool[(no + a) % Op, (ni + b) % Ip, py, px])
            W[o, i, u, v] = scale * acc
    return to_param_layout(W, geometry.layout)


@pytest.mark.parametrize("width", [1.0, 1.7, 3.0])
@pytest.mark.parametrize("name", GEOMETRIES)
def test_wide_kernel_equals_naive_per_element_reference(name: str, width: float) -> None:
    geometry = Geometry(*GEOMETRIES[name])
    pool = torch.randn(geometry.pool, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    starts = _random_starts(geometry, 3)
    out = regenerate_wide(pool, *split_starts(starts, geometry), 0.9, geometry, width)
    assert_close(out, _naive_wide(pool, starts, 0.9, geometry, width), F64, f"{name} width {width}")


def test_tent_weights_at_width_one_are_linear_interpolation() -> None:
    f = torch.tensor([0.0, 0.25, 0.9], dtype=torch.float64)
    assert_close(tent_weights(f, 1.0), torch.stack([1 - f, f], -1), F64, "width 1")
    for width in (1.5, 2.0, 4.0):
        w = tent_weights(f, width)
        assert w.shape == (3, 2 * math.ceil(width)) and torch.allclose(w.sum(-1), torch.ones(3, dtype=torch.float64))
        assert (w >= 0).all()


@pytest.mark.parametrize("name", GEOMETRIES)
def test_wide_kernel_at_width_one_is_the_frozen_formula(name: str) -> None:
    geometry = Geometry(*GEOMETRIES[name])
    pool = torch.randn(geometry.pool, generator=torch.Generator().manual_seed(4))
    base, frac = split_starts(_random_starts(geometry, 4).float(), geometry)
    assert_close(regenerate_wide(pool, base, frac, 1.1, geometry, 1.0), regenerate(pool, base, frac, 1.1, geometry),
                 CLOSE, name)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_wide_kernel_gradcheck_in_pool_and_starts(kind: str) -> None:
    geometry = Geometry(*LAYER_KINDS[kind])
    pool = torch.randn(geometry.pool, dtype=torch.float64, requires_grad=True)
    starts = _interior_starts(geometry, 0).requires_grad_()
    sampler = EpitomeSampler(geometry, starts.detach(), 1.3, "w").double()
    sampler.width = 2.5

    def f(p, s):
        return torch.func.functional_call(sampler, {"starts": s}, (p,))

    assert torch.autograd.gradcheck(f, (pool, starts))


def test_wide_kernel_flattens_the_kink_at_integer_starts() -> None:
    # Linear interpolation: at an integer start the weight's one-sided slopes jump by a second
    # difference of pool rows (a V-shaped minimum once the pool has adapted). A tent of half-width
    # 2 or 3 averages that jump over more rows: on random pools it is at least 4x smaller.
    geometry = Geometry((2, 2, 1, 1), (16, 2, 1, 1), (2, 2), "linear")

    def weight(pool, o: float, width: float) -> torch.Tensor:
        s = torch.tensor([[[o, 0.0, 0.0, 0.0]]], dtype=torch.float64)
        return regenerate_wide(pool, *split_starts(s, geometry), 1.0, geometry, width)

    def kink(width: float) -> float:
        h, jumps = 1e-6, []
        for seed in range(20):
            pool = torch.randn(geometry.pool, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            left = (weight(pool, 5.0, width) - weight(pool, 5.0 - h, width)) / h
            right = (weight(pool, 5.0 + h, width) - weight(pool, 5.0, width)) / h
            jumps.append(float((right - left).norm()))
        return sum(jumps) / len(jumps)

    assert kink(1.0) > 4 * kink(2.0) and kink(1.0) > 4 * kink(3.0)


def test_set_sampling_width_reaches_every_sampler_and_validates() -> None:
    geometry = Geometry(*LAYER_KINDS["linear"])
    model = torch.nn.ModuleDict({"a": EpitomeSampler(geometry, torch.zeros(*geometry.grid, 4), 1.0, "a"),
                                 "b": EpitomeSampler(geometry, torch.zeros(*geometry.grid, 4), 1.0, "b")})
    set_sampling_width(model, 2.5)
    assert [m.width for m in model.values()] == [2.5, 2.5]
    with pytest.raises(ConfigError, match=">= 1"):
        set_sampling_width(model, 0.5)


def test_start_stats_measure_moves_from_the_origin() -> None:
    geometry = Geometry((4, 2, 1, 1), (2, 2, 1, 1), (2, 2), "linear")
    sampler = EpitomeSampler(geometry, torch.zeros(*geometry.grid, 4), 1.0, "w")
    model = torch.nn.ModuleDict({"s": sampler})
    assert start_stats(model) == {"start_mean_move": 0.0, "start_max_move": 0.0, "start_moved": 0.0}
    with torch.no_grad():
        sampler.starts[0, 0, 0] = 1.5  # one of 4 active coordinates (o, i of 2 blocks) changes cell
    stats = start_stats(model)
    assert stats["start_max_move"] == 1.5 and stats["start_mean_move"] == 1.5 / 4 and stats["start_moved"] == 0.25


def test_the_gain_is_a_float64_buffer_in_the_state_dict_and_survives_narrow_casts() -> None:
    """The gain determines the weight, so it is state (a checkpoint holds it), and it stays float64
    when the model is cast narrower: it multiplies a bfloat16 pool as the Python float it was did."""
    geometry = Geometry(*LAYER_KINDS["conv2d"])
    sampler = EpitomeSampler(geometry, _interior_starts(geometry, 6), 0.3, "w")
    assert sampler.state_dict()["scale"].dtype == torch.float64 and float(sampler.scale) == 0.3
    pool = torch.randn(geometry.pool)
    half = sampler.to(torch.bfloat16)
    assert half.scale.dtype == torch.float64
    with torch.no_grad():
        got = half.eval()(pool.bfloat16())
        want = regenerate_indexed(pool.bfloat16(), *sampler.routing(), 0.3, geometry)  # the path eval takes
    assert torch.equal(got, want)
    rm = RoutingMap(*sampler.routing(), sampler.scale).to(torch.float16)
    assert rm.scale.dtype == torch.float64 and "scale" in rm.state_dict()


def test_the_sampling_width_travels_in_the_state_dict_and_is_checked() -> None:
    geometry = Geometry(*LAYER_KINDS["conv2d"])
    a, b = (EpitomeSampler(geometry, _interior_starts(geometry, 6), 0.3, "w") for _ in range(2))
    set_sampling_width(a, 2.5)
    b.load_state_dict(a.state_dict())
    assert b.width == 2.5
    state = a.state_dict() | {"_extra_state": torch.tensor(float("nan"))}
    with pytest.raises(ConfigError, match="sampling width"):
        b.load_state_dict(state)
