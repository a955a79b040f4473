"""TVM lowering: the regeneration kernels against the eager formula and an independent per-element
reference, what the lowered module stores, the default schedules, one error for every unsupported
op, and parity of compiled registry models with the frozen torch models; the same for product maps
(``nesc.gather_products``, ``NESConfig(reuse="outputs")``)."""

from __future__ import annotations

import copy
import functools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
import nesc
from helpers import BACKEND_REL, CLOSE, COMPRESS_ALL, assert_close, naive_regenerate
from product_cases import PRODUCT_MODELS, gather_nodes, products_registry

tvm_adapter = pytest.importorskip("nesc.backends.tvm.adapter", reason="needs the tvm extra")

from nesc.backends.tvm import targets  # noqa: E402
from nesc.backends.tvm.adapter import host_target, relax, relax_constants, te, tvm, var_shape  # noqa: E402
from nesc.backends.tvm.kernels import gather_products_te, regenerate_rows_te, regenerate_te, rows_form  # noqa: E402
from nesc.backends.tvm.lower import Lowered, LoweringError, lower  # noqa: E402
from nesc.backends.tvm.schedule import fuse, prepare, schedule_func, schedule_module  # noqa: E402
from nesc.backends.tvm.schedule_primitives import tile_shape  # noqa: E402
from nesc.models import get_spec, list_models  # noqa: E402
from nesc.core import names  # noqa: E402
from nesc.core.modules import GATHER_PRODUCTS, RoutingMap  # noqa: E402
from nesc.core.sampling import Geometry, regenerate_indexed, split_starts  # noqa: E402

# Exactly what nesc.compile(..., target="llvm") builds for.
TARGET = targets.get_target("llvm").tvm_target()


def test_the_test_target_is_what_compile_builds_for():
    assert str(TARGET) == str(host_target())
    assert TARGET.kind.name == "llvm" and TARGET.attrs["mcpu"] == host_target().attrs["mcpu"]


# ------------------------------------------------------------------------------ the kernels

GEOMETRIES = {
    # every axis active: channels wrap, the pool is spatially larger than the kernel
    "conv2d_all_axes": Geometry((10, 7, 3, 3), (6, 5, 5, 4), (4, 3), "conv2d"),
    # the usual case: windows move along channels only; blocks overhang the weight (10 = 4 + 4 + 2)
    "conv2d_channels": Geometry((10, 12, 3, 3), (6, 8, 3, 3), (4, 5), "conv2d"),
    "conv1d": Geometry((9, 6, 1, 5), (5, 4, 1, 5), (3, 2), "conv1d"),
    "conv1d_all_axes": Geometry((9, 6, 1, 3), (5, 4, 1, 5), (3, 2), "conv1d"),
    "linear": Geometry((20, 13, 1, 1), (7, 6, 1, 1), (5, 4), "linear"),
    "linear_t": Geometry((20, 13, 1, 1), (7, 6, 1, 1), (5, 4), "linear_t"),
    "one_block": Geometry((4, 3, 1, 1), (4, 3, 1, 1), (4, 3), "linear"),  # nothing to interpolate
}


def _routing(geometry: Geometry, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(geometry.pool, generator=g)
    starts = torch.rand(*geometry.grid, 4, generator=g) * 20 - 5  # wraps and clamps
    base, frac = split_starts(starts, geometry)
    return pool, starts, base, frac


def _run_kernel(te_func, pool_shape, geometry: Geometry, scale: float, pool, base, frac) -> torch.Tensor:
    P = te.placeholder(pool_shape, "float32", "pool")
    S = te.placeholder((*geometry.grid, 4), "int32", "starts")
    Fr = te.placeholder((*geometry.grid, 4), "float32", "fracs")
    W = te_func(P, S, Fr, scale=scale, geometry=geometry)
    func, rule = schedule_func(te.create_prim_func([P, S, Fr, W]))
    assert rule == "regenerate", rule
    return _compile_and_run(func, [pool.reshape(pool_shape), base, frac], W.shape)


def _compile_and_run(func, inputs: list[torch.Tensor], out_shape) -> torch.Tensor:
    """Build the scheduled prim func ``func`` for the CPU and run it on ``inputs``; its float32 output."""
    lib = tvm.compile(func, target=TARGET)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros([int(d) for d in out_shape], "float32"), dev)
    lib(*[tvm.runtime.tensor(t.numpy(), dev) for t in inputs], out)
    return torch.from_numpy(out.numpy())


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_regenerate_kernel_matches_eager_and_naive(name):
    geometry = GEOMETRIES[name]
    pool, starts, base, frac = _routing(geometry)
    scale = 0.7
    got = _run_kernel(regenerate_te, geometry.pool, geometry, scale, pool, base, frac)
    assert_close(got, regenerate_indexed(pool, base, frac, scale, geometry), CLOSE, f"{name} vs regenerate_indexed")
    assert_close(got.double(), naive_regenerate(pool, starts, scale, geometry), CLOSE, f"{name} vs naive")


@pytest.mark.parametrize("name", [n for n, g in GEOMETRIES.items() if rows_form(g)])
def test_rows_kernel_matches_eager(name):
    geometry = GEOMETRIES[name]
    O, I, kh, kw = geometry.shape
    Op, Ip = geometry.pool[:2]
    pool, starts, base, frac = _routing(geometry, seed=1)
    got = _run_kernel(regenerate_rows_te, (Op, Ip * kh * kw), geometry, 1.3, pool, base, frac)
    want = regenerate_indexed(pool, base, frac, 1.3, geometry)
    want = want.t() if geometry.layout == "linear_t" else want
    assert_close(got, want.reshape(O, I * kh * kw), CLOSE, name)


def test_rows_form_needs_a_fixed_kernel_window():
    assert not rows_form(GEOMETRIES["conv2d_all_axes"])
    assert rows_form(GEOMETRIES["conv2d_channels"])


# ------------------------------------------------------------------ compiling and running


def compile_lowered(low: Lowered):
    """``prepare`` + ``tvm.compile`` on llvm; returns ``run(*inputs) -> np.ndarray``."""
    ex = tvm.compile(prepare(low.mod, TARGET), TARGET)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    params = [tvm.runtime.tensor(v, dev) for v in low.params.values()]

    def run(*inputs: torch.Tensor) -> np.ndarray:
        out = vm["main"](*[tvm.runtime.tensor(x.numpy(), dev) for x in inputs], *params)
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    return run


def assert_backend_close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    want = want.detach().numpy()
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max()), 1e-12)
    err = float(np.abs(got - want).max())
    assert err <= BACKEND_REL * scale, f"{what}: max abs error {err:.3g} > {BACKEND_REL} x output scale {scale:.3g}"


class ConvZoo(nn.Module):
    """Every conv form the registry uses, small: strided, depthwise, grouped + dilated, 1x1, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.grouped = nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=2)
        self.pw = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))  # (B, 16, H/2, W/2)
        x = F.relu(self.grouped(self.dw(x)))  # (B, 32, H/2, W/2)
        x = self.pw(x).mean((2, 3))  # (B, 32)
        return self.head(x)


class Signal(nn.Module):
    """conv1d (strided, padded) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 16, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(16, 24, 3, padding=1, bias=False)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.gelu(self.c2(F.relu(self.c1(x))))  # (B, 24, L/2)
        return self.fc(x.amax(-1))


def _frozen(model: nn.Module, inputs: tuple, **config) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = nesc.transform(model, inputs, ratio=2, init="random", **config)
    return nesc.freeze(gm)


@pytest.mark.parametrize(
    "make, shape, compressed", [(ConvZoo, (2, 3, 16, 16), 5), (Signal, (2, 2, 32), 3)], ids=["conv2d", "conv1d"]
)
def test_every_conv_form_compiles_with_parity(make, shape, compressed):
    torch.manual_seed(0)
    model = make().eval()
    x = (torch.randn(shape),)
    frozen = _frozen(model, x, **COMPRESS_ALL)
    assert len(helpers.regenerate_nodes(frozen)) == compressed  # every conv and linear
    run = compile_lowered(lower(frozen, x))
    with torch.no_grad():
        for batch in (1, 2):  # one symbolic-batch module serves both
            xb = x[0][:batch]
            assert_backend_close(run(xb), frozen(xb), f"{make.__name__} batch {batch}")
            # and against the independent dense computation: the eager model with the regenerated weights
            assert_backend_close(run(xb), helpers.dense_twin(frozen, model).eval()(xb), f"{make.__name__} dense twin")


# --------------------------------------------------------------------- what the module stores


def _lowered_registry(name: str):
    model = helpers.registry_model(name).eval()
    x = helpers.registry_inputs(name, 2)
    return model, x, _frozen(model, x)


@functools.lru_cache(maxsize=None)
def _lowered(name: str):
    model, x, frozen = _lowered_registry(name)
    return model, x, frozen, lower(frozen, x)


def test_params_are_pools_routes_and_what_stayed_dense():
    model, x, frozen, low = _lowered("resnet18_cifar")
    # no dense copy of a compressed weight: parameters are exactly the stored model (+ BN statistics,
    # which stored_params leaves out because the dense model has them too), and no constants
    bn_stats = sum(b.numel() for n, b in frozen.named_buffers() if b.is_floating_point() and "nesc_routes" not in n)
    assert sum(a.size for a in low.params.values()) == nesc.stored_params(frozen) + bn_stats
    assert sum(a.size for n, a in low.params.items() if low.kinds[n] == "pool") == sum(
        p.numel() for n, p in frozen.named_parameters() if n.startswith("nesc_pool")
    )
    routes = dict(frozen.named_buffers())
    # the gains (``.scale``) are compiled in as constants, one number per layer
    assert {n for n, k in low.kinds.items() if k == "route"} == {
        n for n in routes if n.startswith("nesc_routes.") and not n.endswith(".scale")}
    sampled = set(helpers.sampled_weights(frozen))
    assert sampled and not sampled & set(low.params), "a compressed weight is a parameter of the module"
    smallest = min(w.numel() for w in helpers.sampled_weights(frozen).values())
    for mod in (low.mod, prepare(low.mod, TARGET)):
        big = [c.shape for c in relax_constants(mod) if c.size >= smallest]
        assert not big, f"weight-sized constants in the module: {big}"
    # and main takes the data inputs, then the parameters in the order of Lowered.params
    main = low.mod["main"]
    assert len(main.params) == len(low.input_names) + len(low.params)
    assert [var_shape(p) for p in main.params[1:]] == [a.shape for a in low.params.values()]


def test_dense_module_lowers_with_dense_params_only():
    model, x, _ = _lowered_registry("cnn1d")
    low = lower(model, x)
    assert set(low.kinds.values()) == {"dense"}
    assert sum(a.size for a in low.params.values()) == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point()
    )
    run = compile_lowered(low)
    with torch.no_grad():
        assert_backend_close(run(x[0]), model(x[0]), "dense cnn1d")


def _renamed(frozen: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``frozen`` in which no tensor is called nesc_*: pools are ``epitome_<k>``, the
    routing maps live under ``where``; parameters, submodule and get_attr targets renamed together."""
    gm = copy.deepcopy(frozen)
    renames = {}
    for k, name in enumerate(n for n, _ in frozen.named_parameters() if n.startswith(names.POOL_PREFIX)):
        gm.register_parameter(f"epitome_{k}", gm.get_parameter(name))
        delattr(gm, name)
        renames[name] = f"epitome_{k}"
    gm.add_submodule("where", gm.get_submodule(names.ROUTES))
    delattr(gm, names.ROUTES)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            head, _, rest = node.target.partition(".")
            node.target = renames.get(node.target, f"where.{rest}" if head == names.ROUTES else node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def test_kinds_come_from_the_graph_not_from_names():
    """A pool and a routing map are what the regenerate nodes read, whatever they are called."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = (torch.randn(2, 32),)
    frozen = _frozen(model, x, **COMPRESS_ALL)
    gm = _renamed(frozen)
    assert not [n for n in dict(gm.named_parameters()) | dict(gm.named_buffers()) if "nesc" in n]
    low = lower(gm, x)
    kinds = {k: {n for n, v in low.kinds.items() if v == k} for k in ("pool", "route", "dense")}
    assert kinds["pool"] == {"epitome_0", "epitome_1"}
    routes = {n for n, _ in gm.named_buffers() if n.startswith("where.") and not n.endswith(".scale")}  # gains: constants
    assert kinds["route"] == routes and kinds["route"]
    assert kinds["dense"] == {"0.bias", "2.bias"}
    run = compile_lowered(low)
    with torch.no_grad():
        assert_backend_close(run(x[0]), frozen(x[0]), "renamed pools and routes")


class OneSampledConv(nn.Module):
    """One conv whose weight is regenerated from a pool larger than the kernel along every axis."""

    def __init__(self, geometry: Geometry, starts: torch.Tensor, fracs: torch.Tensor) -> None:
        super().__init__()
        self.geometry = geometry
        self.pool = nn.Parameter(torch.randn(geometry.pool))
        self.routes = RoutingMap(starts, fracs, 0.7)

    def forward(self, x):
        g = self.geometry
        w = torch.ops.nesc.regenerate.default(self.pool, self.routes.starts, self.routes.fracs, self.routes.scale,
                                              list(g.shape),
                                              list(g.block), g.layout)  # (10, 7, 3, 3)
        return F.conv2d(x, w)


def test_routes_record_the_range_each_start_may_take_and_it_is_exact():
    """The range ``Lowered.routes`` records (what the deploy runtime enforces) is the padded pool's:
    starts at its top, fractions near 1, compile and agree with eager; one more would read outside."""
    geometry = GEOMETRIES["conv2d_all_axes"]  # pool (6, 5, 5, 4), kernel 3x3: y moves 0..2, x 0..1
    top = [5, 4, 2, 1]
    starts = torch.tensor(top, dtype=torch.int32).expand(*geometry.grid, 4).clone()
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(OneSampledConv(geometry, starts, torch.full((*geometry.grid, 4), 0.999)).eval())
    x = (torch.randn(2, 7, 8, 8),)
    low = lower(gm, x)
    assert low.routes == {
        "routes.starts": {"role": "starts", "pool": "pool", "pool_shape": [6, 5, 5, 4], "grid": [3, 3], "max": top},
        "routes.fracs": {"role": "fracs", "pool": "pool", "pool_shape": [6, 5, 5, 4], "grid": [3, 3]},
    }
    with torch.no_grad():
        assert_backend_close(compile_lowered(low)(x[0]), gm(x[0]), "starts at the top of their range")


# ------------------------------------------------------------------------- unsupported ops


@torch.library.custom_op("nesc_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mysterious(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.ops.nesc_test.mystery(self.a(torch.ops.nesc_test.mystery(x))))


def test_every_unsupported_op_is_listed_in_one_error():
    with pytest.raises(LoweringError) as err:
        lower(Mysterious(), (torch.randn(2, 4),))
    message = str(err.value)
    assert "2 op(s) cannot be lowered" in message
    assert message.count("nesc_test.mystery") == 2 and "CONVERTERS" in message


def test_bad_example_inputs_are_an_error():
    with pytest.raises(LoweringError, match=r"lower\(Linear\): example_inputs\[0\] is a list, expected a torch.Tensor"):
        lower(nn.Linear(2, 2), ([1.0, 2.0],))


# ----------------------------------------------------------------------- registry parity

# Compile time grows with the number of distinct layers; these are the slow ones on 2 cores.
SLOW_MODELS = {"mobilenetv2", "efficientnet_b0", "resnet18", "vit_tiny"}
UNLOWERABLE: dict[str, str] = {}  # name -> reason; every registry model lowers today


def _registry_cases():
    for name in list_models():
        if name in UNLOWERABLE:
            continue
        marks = [pytest.mark.slow] if name in SLOW_MODELS else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_registry_cases()))
def test_registry_model_parity(name):
    model, x, frozen, low = _lowered(name)
    mod = prepare(low.mod, TARGET)
    _, fresh = schedule_module(fuse(low.mod, TARGET))
    assert "none" not in fresh.values(), f"unscheduled functions: {[k for k, v in fresh.items() if v == 'none']}"
    ex = tvm.compile(mod, TARGET)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    params = [tvm.runtime.tensor(v, dev) for v in low.params.values()]
    spec = get_spec(name)
    with torch.no_grad():
        for batch in (1, 2):
            xb = spec.example_inputs(batch, test=True, seed=3)
            out = vm["main"](*[tvm.runtime.tensor(t.numpy(), dev) for t in xb], *params)
            got = (out if hasattr(out, "numpy") else out[0]).numpy()
            assert_backend_close(got, frozen(*xb), f"{name} batch {batch}")


def test_unlowerable_models_are_real_registry_models():
    assert set(UNLOWERABLE) <= set(list_models())


@pytest.mark.parametrize("batch", [1, 2])
def test_convolutions_get_the_tiled_schedule_not_a_fallback(batch: int):
    # A rule that raises falls back to a simpler (much slower) one without failing the build: check the
    # rule each conv function got. A stale loop handle in the tiled rule once sent every conv to the
    # fallback (30x slower) while parity tests still passed.
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(batch, 16, 8, 8)
    low = lower(model, (x,))
    _, rules = schedule_module(fuse(low.mod, TARGET))
    convs = {k: v for k, v in rules.items() if "conv" in k}
    assert convs and set(convs.values()) == {"tiled"}, rules


class StaticConvs(nn.Module):
    """What the static-batch conv rules read off the blocks: a stride-2 conv and a stride-2 depthwise
    conv (their padded input deinterleaved into column phases) and a 1x1 conv (H and W as one vector axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)

    def forward(self, x):
        return self.pw(F.relu6(self.dw(F.relu6(self.stem(x)))))  # (B, 24, 7, 7)


@pytest.mark.parametrize("batch", [1, 3])
def test_static_batch_rules_and_parity(batch: int):
    torch.manual_seed(0)
    convs, tokens = StaticConvs().eval(), nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 40)).eval()
    for model, x, rule in ((convs, torch.randn(batch, 3, 28, 28), "tiled"), (tokens, torch.randn(batch, 20, 24), "gemm")):
        low = lower(model, (x,), dynamic_batch=False)
        mod, rules = schedule_module(fuse(low.mod, TARGET))
        anchors = {k: v for k, v in rules.items() if "conv" in k or "matmul" in k}
        assert anchors and set(anchors.values()) == {rule}, rules
        with torch.no_grad():
            assert_backend_close(compile_lowered(low)(x), model(x), f"{type(model).__name__} batch {batch}")
    # the two strided convs read their padded input split into column phases (one more axis); the 1x1
    # conv's zero-width pad is inlined: it reads its input itself
    low = lower(convs, (torch.randn(batch, 3, 28, 28),), dynamic_batch=False)
    pads = [re.findall(r"pad_temp = T.sblock_alloc_buffer\(\((.*?\))\)", f.script())
            for k, f in schedule_module(fuse(low.mod, TARGET))[0].functions_items() if "conv" in k.name_hint]
    assert sorted(p[0].count("T.int64") for p in pads if p) == [5, 5], pads


class PointwiseBlock(nn.Module):
    """A 1x1 conv at 14 x 14 with batch norm and ReLU6 (MobileNetV2's expansion): its flat tile of 4
    lanes crosses the rows of the output, so the epilogue must see exactly the tile's elements."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 24, 1, bias=False)
        self.bn = nn.BatchNorm2d(24, affine=affine)

    def forward(self, x):
        return F.relu6(self.bn(self.conv(x)))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_pointwise_conv_flattens_rows_and_matches_torch(batch: int, affine: bool):
    torch.manual_seed(0)
    model = PointwiseBlock(affine).eval()
    with torch.no_grad():  # statistics and affine parameters away from their defaults
        for t in model.bn.parameters():
            t.uniform_(0.5, 1.5)
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(batch, 16, 14, 14)
    low = lower(model, (x,), dynamic_batch=False)
    mod, rules = schedule_module(fuse(low.mod, TARGET))
    convs = {k: f for k, f in mod.functions_items() if "conv" in k.name_hint}
    assert convs and {rules[k.name_hint] for k in convs} == {"tiled"}, rules
    script = next(iter(convs.values())).script()
    assert "T.int64(196)" in script  # H and W as one axis
    assert "pad_temp" not in script  # the zero-width pad inlined
    if affine:  # the scale is computed per channel, outside the per-element epilogue
        assert "T.sqrt" not in script.split('T.sblock("compute"')[-1]
    with torch.no_grad():
        assert_backend_close(compile_lowered(low)(x), model(x), f"pointwise block batch {batch}")


def test_pointwise_conv_without_epilogue_flattens_its_accumulator():
    # no bias, no batch norm: the accumulator's write-back block (cache_write) is flattened too
    torch.manual_seed(0)
    model, x = nn.Conv2d(16, 24, 1, bias=False).eval(), torch.randn(1, 16, 14, 14)
    low = lower(model, (x,), dynamic_batch=False)
    mod, rules = schedule_module(fuse(low.mod, TARGET))
    convs = {k: f for k, f in mod.functions_items() if "conv" in k.name_hint}
    assert convs and {rules[k.name_hint] for k in convs} == {"tiled"}, rules
    assert "T.int64(196)" in next(iter(convs.values())).script()
    with torch.no_grad():
        assert_backend_close(compile_lowered(low)(x), model(x), "bare pointwise conv")


@pytest.mark.parametrize("width, rows, want", [
    (196, 576, (4, 12)),  # whole 4-lane registers, 12 accumulators
    (112, 96, (16, 6)),  # two registers per row of the block: 6 rows
    (56, 144, (8, 12)),
    (14, 256, (7, 8)),  # no whole-register width divides 14: 7 lanes (one register), 64 accumulator elements
    (49, 960, (7, 8)),
    (3, 10, (3, 10)),
    (None, 8, (1, 8)),  # a symbolic width: scalar lanes
])
def test_tile_shape_keeps_lanes_in_whole_registers(width, rows, want):
    assert tile_shape(width, rows) == want


def test_gemm_gives_way_to_dot_for_few_rows():
    # x @ w.T with 2 rows: no vector lanes along them; the dot-product rule takes it
    X, W = te.placeholder((2, 64), name="x"), te.placeholder((32, 64), name="w")
    k = te.reduce_axis((0, 64), "k")
    Y = te.compute((2, 32), lambda i, j: te.sum(X[i, k] * W[j, k], axis=k), name="y")
    func, rule = schedule_func(te.create_prim_func([X, W, Y]))
    assert rule == "dot"
    x, w = torch.randn(2, 64), torch.randn(32, 64)
    assert_backend_close(_compile_and_run(func, [x, w], (2, 32)).numpy(), x @ w.T, "dot")
    X, W = te.placeholder((40, 64), name="x"), te.placeholder((32, 64), name="w")
    Y = te.compute((40, 32), lambda i, j: te.sum(X[i, k] * W[j, k], axis=k), name="y")
    func, rule = schedule_func(te.create_prim_func([X, W, Y]))
    assert rule == "gemm"
    x = torch.randn(40, 64)
    assert_backend_close(_compile_and_run(func, [x, w], (40, 32)).numpy(), x @ w.T, "gemm")
    # 65 rows (a ViT's tokens at batch 1): no whole registers along them, so dot again
    X = te.placeholder((65, 64), name="x")
    Y = te.compute((65, 32), lambda i, j: te.sum(X[i, k] * W[j, k], axis=k), name="y")
    func, rule = schedule_func(te.create_prim_func([X, W, Y]))
    assert rule == "dot"
    x = torch.randn(65, 64)
    assert_backend_close(_compile_and_run(func, [x, w], (65, 32)).numpy(), x @ w.T, "dot, 65 rows")


# ---------------------------------------------------------------------------------- product maps

# (products shape with None at the channel axis, dim, channels, block, rows, groups, bias)
PRODUCT_GEOMETRIES = {
    "conv2d_two_groups": ((2, None, 3, 5), 1, 10, 4, 3, 2, False),  # 10 = 4 + 4 + 2: the last row overhangs
    "conv1d_bias": ((2, None, 7), 1, 9, 3, 5, 1, True),
    "linear": ((3, None), -1, 20, 6, 7, 3, True),  # channels last: the gather runs along memory
    "one_row_pool": ((2, None, 4), 1, 5, 2, 1, 2, False),  # nothing to move along: both reads are row 0
}


def _product_map(shape, channels: int, block: int, rows: int, groups: int, bias: bool, seed: int = 0):
    """(products, starts, fracs, bias) with starts over their whole range, the top included."""
    g = torch.Generator().manual_seed(seed)
    n = -(-channels // block)
    starts = torch.stack([torch.randint(0, groups, (n,), generator=g), torch.randint(0, rows, (n,), generator=g)], 1)
    starts[0] = torch.tensor([groups - 1, rows - 1])
    fracs = torch.rand(n, generator=g)
    fracs[0] = 0.999
    products = torch.randn([groups * rows if d is None else d for d in shape], generator=g)
    return products, starts.int(), fracs, torch.randn(channels, generator=g) if bias else None


def _placeholders(tensors) -> list:
    return [te.placeholder(tuple(t.shape), str(t.dtype).removeprefix("torch."), f"t{k}") for k, t in enumerate(tensors)]


@pytest.mark.parametrize("name", list(PRODUCT_GEOMETRIES))
def test_gather_products_kernel_matches_the_op_and_gets_its_schedule(name):
    shape, dim, channels, block, rows, groups, has_bias = PRODUCT_GEOMETRIES[name]
    products, starts, fracs, bias = _product_map(shape, channels, block, rows, groups, has_bias)
    tensors = [products, starts, fracs] + ([bias] if has_bias else [])
    holders = _placeholders(tensors)
    out = gather_products_te(*holders, dim=dim % len(shape), channels=channels, block=block, rows=rows)
    func, rule = schedule_func(te.create_prim_func([*holders, out]))
    assert rule == "products", rule
    result = _compile_and_run(func, tensors, out.shape)
    want = GATHER_PRODUCTS(products, starts, fracs, bias, dim, channels, block, rows)
    assert_close(result, want, CLOSE, name)


def _flatten_relu(gathered):
    (out,) = gathered
    b, c, h, w = (int(d) for d in out.shape)
    zero = tvm.tirx.const(0.0, "float32")
    return te.compute((b, c * h * w), lambda i, k: te.max(out[i, k // (h * w), k % (h * w) // w, k % w], zero))


def _residual_add(gathered):
    left, right = gathered
    return te.compute(left.shape, lambda *i: left(*i) + right(*i))


@pytest.mark.parametrize("after", [_flatten_relu, _residual_add], ids=["flatten", "two_gathers_added"])
def test_a_gather_fused_with_what_follows_keeps_its_rule(after):
    """What FuseOps may put after a gather in one function: a reshape (other axes: the gather keeps
    its own loops) or a residual add of two product-mapped branches (both inlined)."""
    shape, _, channels, block, rows, groups, _ = PRODUCT_GEOMETRIES["conv2d_two_groups"]
    seeds = (0, 1) if after is _residual_add else (0,)
    maps = [_product_map(shape, channels, block, rows, groups, False, seed) for seed in seeds]
    tensors = [t for m in maps for t in m[:3]]
    holders = _placeholders(tensors)
    gathered = [gather_products_te(*holders[3 * k:3 * k + 3], dim=1, channels=channels, block=block, rows=rows)
                for k in range(len(maps))]
    out = after(gathered)
    func, rule = schedule_func(te.create_prim_func([*holders, out]))
    assert rule == "products", rule
    result = _compile_and_run(func, tensors, out.shape)
    eager = [GATHER_PRODUCTS(*m, 1, channels, block, rows) for m in maps]
    want = eager[0].flatten(1).relu() if after is _flatten_relu else eager[0] + eager[1]
    assert_close(result, want, CLOSE, after.__name__)


class ProductConv(nn.Module):
    """A conv run with ``groups`` x ``rows`` products (a pool of ``rows`` rows under two input routings)
    whose 10 outputs are interpolated copies of them, plus a bias: what passes.reuse emits."""

    def __init__(self, starts: torch.Tensor, fracs: torch.Tensor) -> None:
        super().__init__()
        self.pool = nn.Parameter(torch.randn(3, 5, 3, 3))
        # two groups of 3 rows, the second reading the pool's input channels from 2 on (wrapping)
        weight_starts = torch.tensor([[[0, 0, 0, 0]] * 2, [[0, 2, 0, 0]] * 2], dtype=torch.int32)  # grid (2, 2)
        self.weight_routes = RoutingMap(weight_starts, torch.zeros(2, 2, 4), 0.7)
        self.products = RoutingMap(starts, fracs)
        self.bias = nn.Parameter(torch.randn(10))

    def forward(self, x):
        w = torch.ops.nesc.regenerate.default(self.pool, self.weight_routes.starts, self.weight_routes.fracs,
                                              self.weight_routes.scale,
                                              [6, 7, 3, 3], [3, 5], "conv2d")  # (groups * rows, 7, 3, 3)
        products = F.conv2d(x, w, padding=1)  # (B, 6, H, W)
        return GATHER_PRODUCTS(products, self.products.starts, self.products.fracs, self.bias, 1, 10, 4, 3)


def test_product_map_routes_record_their_range_and_it_is_exact():
    """A product map's starts (group, row) may reach (groups - 1, rows - 1), recorded in Lowered.routes
    (what the deploy runtime enforces): at the top of the range they compile and agree with eager."""
    starts = torch.tensor([[1, 2], [0, 1], [1, 2]], dtype=torch.int32)
    gm = torch.fx.symbolic_trace(ProductConv(starts, torch.tensor([0.999, 0.5, 0.25])).eval())
    x = (torch.randn(2, 7, 6, 6),)
    low = lower(gm, x)
    common = {"pool": "pool", "grid": [3], "products": [2, 3]}
    assert {n: r for n, r in low.routes.items() if n.startswith("products.")} == {
        "products.starts": common | {"role": "product_starts", "max": [1, 2]},
        "products.fracs": common | {"role": "product_fracs"},
    }
    assert low.kinds["products.starts"] == low.kinds["products.fracs"] == "route"
    with torch.no_grad():
        for batch in (1, 2):
            assert_backend_close(compile_lowered(low)(x[0][:batch]), gm(x[0][:batch]), f"product map batch {batch}")


@functools.lru_cache(maxsize=None)
def _lowered_products(name: str):
    _, frozen = products_registry(name)
    x = helpers.registry_inputs(name, 2)
    return frozen, x, lower(frozen, x)


@pytest.mark.parametrize("name", PRODUCT_MODELS)
def test_product_map_models_compile_with_parity(name):
    frozen, _, low = _lowered_products(name)
    maps = {n.args[k].target for n in gather_nodes(frozen) for k in (1, 2)}  # get_attr of starts, fracs
    assert {n for n, r in low.routes.items() if r["role"].startswith("product_")} == maps
    assert all(low.kinds[n] == "route" for n in maps)
    run = compile_lowered(low)
    spec = get_spec(name)
    with torch.no_grad():
        for batch in (1, 2):
            xb = spec.example_inputs(batch, test=True, seed=3)
            assert_backend_close(run(*xb), frozen(*xb), f"{name} with product maps, batch {batch}")


@pytest.mark.parametrize("name", PRODUCT_MODELS)
def test_product_maps_get_their_schedule_not_a_fallback(name):
    # As for convolutions: a rule that raises falls back silently. Every gather (with the batch norm and
    # activation fused after it) gets the products rule, and no function is left unscheduled.
    _, _, low = _lowered_products(name)
    _, rules = schedule_module(fuse(low.mod, TARGET))
    gathers = {k: v for k, v in rules.items() if "nesc_gather_products" in k}
    assert gathers and set(gathers.values()) == {"products"}, rules
    assert "none" not in rules.values(), rules


class _BoolCumsum(nn.Module):
    """Counts along a bool mask as Hugging Face's packed-sequence check does: torch sums bools in int64."""

    def forward(self, x):  # (B, L)
        starts = torch.cumsum(x.diff(dim=-1) != 1, dim=-1)  # (B, L - 1) int64
        return starts.float() * 2.0


def test_cumsum_of_a_bool_tensor_is_summed_in_int64():
    x = (torch.tensor([[0, 1, 2, 0, 1, 5], [3, 4, 5, 6, 7, 8]]),)
    compiled = nesc.compile(_BoolCumsum(), x)
    np.testing.assert_array_equal(compiled(*x), _BoolCumsum()(*x).numpy())
