"""nesc.export_onnx: one ONNX file that stores pools and routing maps (not weights), runs in onnxruntime
at any batch size like the frozen model in eager PyTorch, imports into TVM without folding, and is
about 1/ratio the size of the dense model's file; a default onnxruntime session folds the
regeneration once and runs the dense model's graph. Plus the failure modes: an unsupported op, a step
that folds the weights back, bad arguments."""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKEND_REL,
    COMPRESS_ALL,
    ONNX_FILE_RATIO_RTOL,
    regenerate_nodes,
    registry_inputs,
    registry_model,
    run,
    transformed_registry,
)
from nesc.backends import onnx as onnx_backend
from nesc.backends.onnx.decompose_products import decompose_gather_products, gather_products_aten
from nesc.backends.onnx.regenerate import decompose_regenerate_onnx, regenerate_rows
from product_cases import PRODUCT_MODELS, gather_nodes, products_registry
from nesc.models import get_spec, list_models
from torch import nn

import nesc
from nesc.core import names
from nesc.core.errors import InputError
from nesc.core.sampling import Geometry, regenerate_indexed, split_starts

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'nesc[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'nesc[onnx]'")

# Registry models that cannot be exported, with the reason. Empty: every model exports.
EXCLUDED: dict[str, str] = {}
# Exporting takes 3-20 s a model on one core (efficientnet_b0 and mobilenetv2 the longest); the others
# run with -m slow (the whole file: ~3.5 min). Fast ones cover a conv net and an MLP.
FAST = {"cnn1d", "mlp"}
# A dense file under 1 MiB is dominated by the graph, not the weights (see ONNX_FILE_RATIO_RTOL).
# Below this dense file size the graph (nodes, names, shapes) is a large share of the compressed file,
# so the file ratio says little about the stored tensors (cnn1d: 130 KB of weights, ~20 KB of graph).
SMALL_FILE_BYTES = 2**20


def _param(name: str, fast=FAST):
    return name if name in fast else pytest.param(name, marks=pytest.mark.slow)


MODELS = [_param(n) for n in list_models() if n not in EXCLUDED]

_DIR = Path(tempfile.mkdtemp(prefix="nesc-onnx-tests-"))


@functools.cache
def _frozen(name: str):
    model, gm = transformed_registry(name)
    return model.eval(), nesc.freeze(gm)


@functools.cache
def _exported(name: str) -> onnx_backend.OnnxExport:
    _, frozen = _frozen(name)
    return nesc.export_onnx(frozen, registry_inputs(name), _DIR / f"{name}.onnx")


@functools.cache
def _dense_exported(name: str) -> Path:
    model, _ = _frozen(name)
    return onnx_backend.export_dense_onnx(model, registry_inputs(name), _DIR / f"{name}_dense.onnx")


def _ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its own constant folding warns about CastLike nodes
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    return session.run(None, {inp.name: x.numpy()})[0]


def _assert_backend_close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    want = want.numpy()
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= BACKEND_REL * scale, f"{what}: max abs error {err:.3g} > {BACKEND_REL} x output scale {scale:.3g}"


def _module_tensors(frozen) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in list(frozen.named_parameters()) + list(frozen.named_buffers())}


def test_every_registry_model_is_exported_or_excluded_with_a_reason() -> None:
    assert set(EXCLUDED) <= set(list_models()), "an exclusion names a model that is not registered"
    assert all(EXCLUDED.values())
    assert FAST & set(list_models()) == FAST and len(FAST) < len(list_models())


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_matches_the_frozen_model_at_two_batch_sizes(name: str) -> None:
    _, frozen = _frozen(name)
    report = _exported(name)
    spec = get_spec(name)
    for batch in (2, 5):  # exported at batch 2; 5 proves the batch dimension is symbolic
        x = spec.example_inputs(batch, test=True, seed=batch)[0]
        _assert_backend_close(_ort_run(report.path, x), run(frozen, (x,)), f"{name} batch {batch}")


@pytest.mark.parametrize("name", MODELS)
def test_the_file_stores_pools_and_routing_maps_not_weights(name: str) -> None:
    _, frozen = _frozen(name)
    report = _exported(name)
    model = onnx.load(str(report.path))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    module = _module_tensors(frozen)
    # Every initializer is one of the module's tensors, under its name; every pool and routing map is one.
    assert set(inits) <= set(module), set(inits) - set(module)
    assert all(inits[n] == module[n] for n in inits)
    pools = {n for n in module if n.startswith("nesc_pool_")}
    assert pools and pools <= set(inits), pools - set(inits)
    # A routing map is stored under its name, or shared with an equal one (the exporter stores equal
    # tensors once: routing maps of unshifted starts all have zero fractions).
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    state = frozen.state_dict()
    for route in (n for n in module if n.startswith("nesc_routes.")):
        assert route in values or any(np.array_equal(v, state[route].numpy()) for v in values.values()), route
    # No compressed weight is stored, and the file's tensors add up to what the module holds.
    assert not {regen.meta[names.SAMPLED_WEIGHT] for regen in regenerate_nodes(frozen)} & set(inits)
    held = sum(t.numel() * t.element_size() for t in list(frozen.parameters()) + list(frozen.buffers()))
    stored = onnx_backend.tensor_bytes(model)
    # At most what the module holds plus the small folded index constants; less where equal routing maps
    # are stored once and for buffers the eval graph never reads (batch norm's num_batches_tracked).
    assert stored <= held * (1 + onnx_backend.CONSTANT_ALLOWANCE) + onnx_backend.CONSTANT_SLACK_BYTES
    assert report.tensor_bytes == stored and report.expected_bytes == held
    assert report.stored_bytes == nesc.stored_bytes(frozen)
    # The weights are computed: gathers of the pools' rows, in one file with a symbolic batch; no CastLike
    # (onnxruntime's constant folder cannot run it: resolve_cast_like).
    assert {"Gather", "Conv" if name != "mlp" else "Gemm"} <= set(report.ops) and "CastLike" not in report.ops
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == onnx_backend.BATCH
    assert not list(report.path.parent.glob(report.path.name + ".*")), "a side file (.data) was written"
    assert report.file_bytes == report.path.stat().st_size and report.opset == onnx_backend.DEFAULT_OPSET
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {report.opset}


@pytest.mark.parametrize("name", [_param(n, fast={"cnn1d"}) for n in list_models() if n not in EXCLUDED])
def test_tvm_imports_the_file_with_pools_and_routes_as_its_parameters(name: str) -> None:
    pytest.importorskip("tvm", reason="the tvm extra is not installed: pip install 'nesc[tvm]'")
    from tvm.relax.frontend.onnx import from_onnx

    report = _exported(name)
    model = onnx.load(str(report.path))
    mod = from_onnx(model, keep_params_in_input=True)  # without it, TVM folds the regeneration at import
    params = mod["main"].params[len(model.graph.input):]  # the graph inputs come first
    # TVM's parameters are exactly the file's initializers (the module's pools, routing maps and dense
    # tensors), with their small shapes: nothing was folded into a dense weight at import.
    shapes = sorted(tuple(int(d) for d in p.ty.shape) for p in params)
    assert shapes == sorted(tuple(t.dims) for t in model.graph.initializer)
    pools = [t for t in model.graph.initializer if t.name.startswith("nesc_pool_")]
    assert pools and all(tuple(t.dims) in shapes for t in pools)


# ------------------------------------------------------------------------------------ onnxruntime folds once


def _optimized(path: Path, regenerate: str = "once") -> onnx.ModelProto:
    """The graph onnxruntime runs for ``path`` (after its optimizations, written by the session)."""
    out = path.with_name(f"{path.stem}.{regenerate}.optimized.onnx")
    onnx_backend.ort_session(path, regenerate=regenerate, threads=1, optimized_model_path=out)
    return onnx.load(str(out))


def _numel(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


@pytest.mark.parametrize("name", MODELS)
def test_a_default_session_folds_the_regeneration_once_into_the_dense_graph(name: str) -> None:
    """Not a timing test: the graph onnxruntime runs for the compressed file (its defaults) is the one it
    runs for the dense file: the same ops (no Gather, Mod, Slice of the regeneration left), no pool or
    routing map, as many weight elements: every weight was computed once, at session creation."""
    report, dense_path = _exported(name), _dense_exported(name)
    folded, dense = _optimized(report.path), _optimized(dense_path)
    ops = lambda m: sorted(n.op_type for n in m.graph.node)
    assert ops(folded) == ops(dense), (name, ops(folded), ops(dense))
    assert not [t.name for t in folded.graph.initializer if t.name.startswith(("nesc_pool_", "nesc_routes."))]
    assert _numel(folded) == _numel(dense)
    # regenerate="per_call" keeps the regeneration (memory-lean): the pools are what the session holds.
    per_call = _optimized(report.path, "per_call")
    assert {t.name for t in per_call.graph.initializer} >= {n for n in _module_tensors(_frozen(name)[1])
                                                             if n.startswith("nesc_pool_")}
    assert _numel(per_call) < _numel(dense) and "Gather" in ops(per_call)


def _with_fractions(frozen, seed: int = 0):
    """A copy of ``frozen`` whose routing maps have fractions in [0, 1) along every axis a window can move
    (freshly transformed models start at integer starts: zero fractions, no interpolation)."""
    frozen = copy.deepcopy(frozen)
    gen = torch.Generator().manual_seed(seed)
    for node in regenerate_nodes(frozen):
        pool, fracs = frozen.get_parameter(node.args[0].target), frozen.get_buffer(node.args[2].target)
        geometry = Geometry(tuple(node.args[4]), tuple(pool.shape), tuple(node.args[5]), node.args[6])
        mask = torch.tensor(geometry.active, dtype=fracs.dtype)
        fracs.copy_(torch.rand(fracs.shape, generator=gen) * mask)
    return frozen


class MixedKernels(nn.Module):
    """A 3x3 conv, a 1x1 conv, a conv1d and a linear layer: with one global pool (3x3), the last three
    read windows that move along the pool's spatial axes too."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(32, 32, 1)
        self.c3, self.fc = nn.Conv1d(32, 16, 3), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.c1(x))))  # (B, 32, H, W)
        x = F.relu(self.c3(x.mean(-1)))  # (B, 16, H - 2)
        return self.fc(x.mean(-1))  # (B, 10)


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "mixed"])
def test_fractional_routes_interpolate_in_onnxruntime_in_both_modes(name: str) -> None:
    if name == "mixed":
        x = torch.randn(2, 8, 6, 6)
        gm = nesc.transform(MixedKernels(), (x,), init="random", ratio=2, policy="global", **COMPRESS_ALL)
        frozen, inputs, fresh = nesc.freeze(gm), (x,), lambda b: torch.randn(b, 8, 6, 6)
        assert any(Geometry(tuple(n.args[4]), tuple(frozen.get_parameter(n.args[0].target).shape), tuple(n.args[5]),
                            n.args[6]).active[2] for n in regenerate_nodes(frozen)), "no spatially moving window"
    else:
        frozen, inputs = _frozen(name)[1], registry_inputs(name)
        fresh = lambda b: get_spec(name).example_inputs(b, test=True, seed=b)[0]
    frozen = _with_fractions(frozen)
    path = nesc.export_onnx(frozen, inputs, _DIR / f"{name}_fractions.onnx", overwrite=True).path
    x = fresh(3)
    want = run(frozen, (x,))
    for regenerate in onnx_backend.REGENERATE:
        session = onnx_backend.ort_session(path, regenerate=regenerate)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        _assert_backend_close(got, want, f"{name} with fractional routes, regenerate={regenerate}")


# (layout, weight (O, I, kh, kw), pool (Op, Ip, Kh, Kw), block): channel-only windows (the grouped-conv
# form) and spatially moving ones (the separable form), blocks that overhang the weight, one-row pools.
GEOMETRIES = [
    ("conv2d", (20, 12, 3, 3), (7, 5, 3, 3), (7, 5)),
    ("conv2d", (20, 12, 3, 3), (7, 5, 5, 5), (3, 4)),
    ("conv2d", (20, 1, 3, 3), (7, 1, 3, 3), (6, 1)),
    ("conv2d", (20, 12, 1, 1), (7, 5, 3, 1), (7, 5)),
    ("conv1d", (20, 12, 1, 5), (7, 5, 1, 5), (7, 5)),
    ("conv1d", (20, 12, 1, 3), (1, 5, 3, 5), (1, 4)),
    ("linear", (33, 17, 1, 1), (7, 5, 1, 1), (7, 5)),
    ("linear", (33, 17, 1, 1), (7, 5, 3, 3), (1, 1)),
    ("linear_t", (33, 17, 1, 1), (7, 5, 1, 1), (3, 5)),
    ("linear_t", (33, 17, 1, 1), (7, 5, 2, 3), (7, 2)),
]


@pytest.mark.parametrize("layout, shape, pool, block", GEOMETRIES)
def test_the_onnx_regeneration_is_regenerate_indexed(layout, shape, pool, block) -> None:
    geometry = Geometry(shape, pool, block, layout)
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(pool, generator=gen)
    starts, fracs = split_starts(torch.rand(*geometry.grid, 4, generator=gen) * 40, geometry)
    want = regenerate_indexed(p, starts, fracs, 0.7, geometry)
    got = regenerate_rows(p, starts, fracs, 0.7, shape, block, layout)
    assert got.shape == want.shape == geometry.param_shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_onnx_lowering_replaces_every_regenerate_node() -> None:
    _, frozen = _frozen("cnn1d")
    x = registry_inputs("cnn1d")
    result = decompose_regenerate_onnx(copy.deepcopy(frozen))
    assert result.modified and not regenerate_nodes(result.graph_module)
    assert [n.target for n in result.graph_module.graph.nodes].count(regenerate_rows) == len(regenerate_nodes(frozen))
    torch.testing.assert_close(run(result.graph_module, x), run(frozen, x), rtol=1e-5, atol=1e-6)
    assert not decompose_regenerate_onnx(result.graph_module).modified


def test_cast_like_becomes_cast_where_the_target_type_is_known() -> None:
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("CastLike", ["x", "like"], ["a"]), helper.make_node("CastLike", ["x", "unknown"], ["b"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
              helper.make_tensor_value_info("unknown", onnx.TensorProto.UNDEFINED, None)],
        [helper.make_tensor_value_info("a", onnx.TensorProto.INT64, [2])],
        [onnx.numpy_helper.from_array(np.zeros(1, dtype=np.int64), "like")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    onnx_backend.resolve_cast_like(model)
    cast, kept = model.graph.node
    assert cast.op_type == "Cast" and list(cast.input) == ["x"] and helper.get_attribute_value(cast.attribute[0]) == 7
    assert kept.op_type == "CastLike"  # no type known for its target: left as it is


@pytest.mark.parametrize("kwargs, match", [({"regenerate": "never"}, "regenerate must be one of"),
                                           ({"threads": 0}, "threads must be a positive int")])
def test_bad_session_arguments_are_input_errors(kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        onnx_backend.ort_session(_exported("cnn1d").path, **kwargs)


# ------------------------------------------------------------------------------------ product maps


@functools.cache
def _products_exported(name: str) -> onnx_backend.OnnxExport:
    _, frozen = products_registry(name)
    return nesc.export_onnx(frozen, registry_inputs(name), _DIR / f"{name}_products.onnx")


def test_the_products_decomposition_is_the_op_bit_for_bit() -> None:
    _, frozen = products_registry("resnet_fmnist")
    x = get_spec("resnet_fmnist").example_inputs(3, test=True, seed=1)
    want = run(frozen, x)
    result = decompose_gather_products(frozen)
    assert result.modified and not gather_nodes(result.graph_module)
    assert {n.target for n in result.graph_module.graph.nodes} >= {gather_products_aten}
    result.graph_module.graph.lint()
    assert torch.equal(run(result.graph_module, x), want)
    assert not decompose_gather_products(result.graph_module).modified  # nothing left to rewrite


@pytest.mark.parametrize("name", PRODUCT_MODELS)
def test_product_map_models_export_compressed_with_onnxruntime_parity(name: str) -> None:
    _, frozen = products_registry(name)
    report = _products_exported(name)
    for batch in (2, 5):
        x = get_spec(name).example_inputs(batch, test=True, seed=batch)[0]
        _assert_backend_close(_ort_run(report.path, x), run(frozen, (x,)), f"{name} with product maps, batch {batch}")
    # Compressed: the file's tensors are the module's (pools, routing and product maps, what stayed
    # dense) plus the small folded aranges; the product maps are stored, not folded into indices.
    model = onnx.load(str(report.path))
    module = _module_tensors(frozen)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert set(inits) <= set(module) and all(inits[n] == module[n] for n in inits)
    values = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    state = frozen.state_dict()
    for node in gather_nodes(frozen):
        for attr in node.args[1:3]:
            assert attr.target in inits or any(np.array_equal(v, state[attr.target].numpy()) for v in values), attr
    held = sum(t.numel() * t.element_size() for t in list(frozen.parameters()) + list(frozen.buffers()))
    assert report.tensor_bytes <= held * (1 + onnx_backend.CONSTANT_ALLOWANCE) + onnx_backend.CONSTANT_SLACK_BYTES
    assert "Gather" in report.ops and "CastLike" not in report.ops
    assert not [n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")]  # no custom op left


# ------------------------------------------------------------------------------------ size


@pytest.mark.parametrize("name", [_param(n, fast={"mlp"}) for n in list_models() if n not in EXCLUDED])
def test_file_size_follows_the_compression_ratio(name: str) -> None:
    dense_model, _ = _frozen(name)
    report, dense_path = _exported(name), _dense_exported(name)
    dense_held = sum(p.numel() * p.element_size() for p in list(dense_model.parameters()) + list(dense_model.buffers()))
    ratio = dense_held / report.expected_bytes  # what the modules hold, measured in PyTorch
    assert ratio > 3  # ratio 4 of the parameters, batch-norm statistics in both
    # The dense file stores the dense module's tensors (the compressed file's are checked against its
    # module in test_the_file_stores_pools_and_routing_maps_not_weights): every weight matrix and kernel
    # (random, all distinct), at most everything; fresh norms' equal statistics may be stored once.
    weights = sum(p.numel() * p.element_size() for p in dense_model.parameters() if p.dim() >= 2)
    assert weights <= onnx_backend.tensor_bytes(onnx.load(str(dense_path))) <= dense_held * 1.01
    dense_file = dense_path.stat().st_size
    if dense_file < SMALL_FILE_BYTES:
        pytest.skip(f"{name}: dense file {dense_file:,} bytes < {SMALL_FILE_BYTES:,}: the graph dominates, "
                    f"file ratio not asserted (tensors checked above)")
    file_ratio = dense_file / report.file_bytes
    # Symmetric: the graph pulls the ratio down; equal routing maps stored once (zero fractions of
    # unshifted starts) push it up.
    assert abs(file_ratio / ratio - 1) <= ONNX_FILE_RATIO_RTOL, (file_ratio, ratio)


def test_the_report_measures_the_dense_export_when_given_the_dense_model() -> None:
    model, frozen = _frozen("cnn1d")
    report = nesc.export_onnx(frozen, registry_inputs("cnn1d"), _DIR / "with_dense.onnx", dense=model)
    dense_path = _dense_exported("cnn1d")
    # The same export (value names may differ between runs: compare sizes within 1%).
    assert report.dense_file_bytes == pytest.approx(dense_path.stat().st_size, rel=0.01)
    assert report.dense_tensor_bytes == onnx_backend.tensor_bytes(onnx.load(str(dense_path)))
    assert report.file_ratio == report.dense_file_bytes / report.file_bytes > 2


# ------------------------------------------------------------------------------------ failures


class TwoUnsupportedOps(nn.Module):
    """A conv net with a median pooling (aten.median.dim) and a prototype head (aten._cdist_forward):
    neither has an ONNX translation in torch.onnx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.proj = nn.Linear(32, 32)
        self.prototypes = nn.Parameter(torch.randn(10, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))  # (B, 32, H, W)
        x = x.flatten(2).median(dim=-1).values  # (B, 32)
        return -torch.cdist(self.proj(x), self.prototypes)  # (B, 10)


def test_unsupported_ops_are_named_in_one_error_before_translation(monkeypatch) -> None:
    x = torch.randn(2, 3, 8, 8)
    frozen = nesc.freeze(nesc.transform(TwoUnsupportedOps(), (x,), init="random", ratio=2, **COMPRESS_ALL))
    assert regenerate_nodes(frozen)
    monkeypatch.setattr(onnx_backend, "translate", lambda *a: pytest.fail("translated despite unsupported ops"))
    with pytest.raises(onnx_backend.OnnxExportError) as info:
        # dynamic_batch=False: torch.export cannot keep the batch symbolic through cdist's shape checks.
        nesc.export_onnx(frozen, (x,), _DIR / "unsupported.onnx", dynamic_batch=False)
    message = str(info.value)
    assert "2 op(s)" in message
    # median is in the captured graph; _cdist_forward only appears once cdist is decomposed.
    assert "aten::median.dim: 1 call(s) at median" in message and "aten::_cdist_forward: 1 call(s)" in message
    assert "Replace the modules" in message
    assert not (_DIR / "unsupported.onnx").exists()


def test_a_step_that_folds_the_weights_back_is_caught(monkeypatch) -> None:
    import onnxsim

    # onnxsim with its defaults treats initializers as constants and folds every regenerated weight.
    monkeypatch.setattr(onnx_backend, "simplify_model", lambda m: onnxsim.simplify(m)[0])
    _, frozen = _frozen("mlp")
    path = _DIR / "folded.onnx"
    with pytest.raises(onnx_backend.OnnxExportError, match=r"folded back into a dense constant.*Largest tensors"):
        nesc.export_onnx(frozen, registry_inputs("mlp"), path)
    assert not path.exists()


def test_without_simplification_the_file_still_stores_only_pools_and_routes() -> None:
    _, frozen = _frozen("cnn1d")
    report = nesc.export_onnx(frozen, registry_inputs("cnn1d"), _DIR / "raw.onnx", simplify=False)
    assert not report.simplified and report.tensor_bytes <= report.expected_bytes * 1.01 + 1024
    x = get_spec("cnn1d").example_inputs(3, test=True, seed=3)[0]
    _assert_backend_close(_ort_run(report.path, x), run(frozen, (x,)), "cnn1d unsimplified")


def test_a_batch_of_one_exports_with_a_symbolic_batch() -> None:
    _, frozen = _frozen("cnn1d")
    x1 = get_spec("cnn1d").example_inputs(1, test=True)
    report = nesc.export_onnx(frozen, x1[0], _DIR / "batch1.onnx")
    x = get_spec("cnn1d").example_inputs(4, test=True, seed=4)[0]
    _assert_backend_close(_ort_run(report.path, x), run(frozen, (x,)), "cnn1d exported at batch 1")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"opset": 13}, r"opset must be an int from 18"),
        ({"example_inputs": [np.zeros(3)]}, r"export_onnx: example_inputs\[0\] is a ndarray, expected a torch.Tensor"),
        ({"example_inputs": ()}, r"export_onnx: example_inputs must be a tensor or a non-empty tuple"),
        ({"path": _DIR}, r"is a directory"),
        ({"path": _DIR / "missing" / "m.onnx"}, r"does not exist"),
        ({"frozen": registry_model("cnn1d")}, r"takes a frozen nesc model"),
    ],
)
def test_bad_arguments_are_input_errors(kwargs, match) -> None:
    _, frozen = _frozen("cnn1d")
    args = {"frozen": frozen, "example_inputs": registry_inputs("cnn1d"), "path": _DIR / "bad.onnx"} | kwargs
    with pytest.raises(InputError, match=match):
        nesc.export_onnx(args.pop("frozen"), args.pop("example_inputs"), args.pop("path"), **args)


def test_constants_become_tensor_valued_for_importers_that_read_only_value() -> None:
    """TVM's importer fails with "no value in Constant" on Constant(value_ints=...); nesc rewrites them."""
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["shape"], value_ints=[2, 3]),
         helper.make_node("Constant", [], ["half"], value_float=0.5),
         helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("Mul", ["r", "half"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    model = onnx_backend.constants_as_nodes(model, keep=set())
    assert [a.name for n in model.graph.node if n.op_type == "Constant" for a in n.attribute] == ["value", "value"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x.reshape(2, 3) * 0.5)


# ------------------------------------------------------------------------------------ writing


def test_an_existing_file_is_kept_and_refused_before_any_work(monkeypatch) -> None:
    from nesc.core.errors import OutputError

    _, frozen = _frozen("mlp")
    path = _DIR / "existing.onnx"
    path.write_bytes(b"an older export")
    monkeypatch.setattr(onnx_backend, "lower", lambda *a: pytest.fail("worked before checking the path"))
    with pytest.raises(OutputError, match=r"ONNX file .*existing\.onnx' already exists; pass overwrite=True"):
        nesc.export_onnx(frozen, registry_inputs("mlp"), path)
    assert path.read_bytes() == b"an older export"
    (_DIR / "link.onnx").symlink_to(path)
    with pytest.raises(OutputError, match="is a symbolic link"):
        nesc.export_onnx(frozen, registry_inputs("mlp"), _DIR / "link.onnx", overwrite=True)
    assert path.read_bytes() == b"an older export"


def test_overwrite_replaces_the_file_whole() -> None:
    _, frozen = _frozen("mlp")
    path = _DIR / "replaced.onnx"
    path.write_bytes(b"an older export")
    report = nesc.export_onnx(frozen, registry_inputs("mlp"), path, overwrite=True)
    onnx.checker.check_model(onnx.load(str(report.path)))
    assert report.file_bytes == path.stat().st_size > len(b"an older export")
    assert not list(_DIR.glob(".replaced.onnx.*"))  # no temporary file left


def test_a_full_disk_leaves_no_file_behind(monkeypatch, tmp_path: Path) -> None:
    import errno

    from nesc.core.errors import OutputError

    def save_model(model, name, **kwargs):  # part of the file written, then the disk is full
        Path(name).write_bytes(b"half a protobuf")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", save_model)
    model = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    with pytest.raises(OutputError, match="the disk is full"):
        onnx_backend.save(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


class _FusedAttention(nn.Module):
    """``scaled_dot_product_attention`` followed by ``transpose(1, 2).contiguous().view``: a view that
    holds for the fused CPU kernel's output layout (export drops the ``contiguous``) but not for the
    layout the exporter's decompositions give attention."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        B, S, _ = x.shape  # (B, S, 16)
        q, k, v = self.qkv(x).view(B, S, 3, 2, 8).permute(2, 0, 3, 1, 4)  # each (B, 2, S, 8)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).contiguous().view(B, S, -1))


def test_attention_followed_by_a_view_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _FusedAttention().eval(), (torch.randn(2, 6, 16),)
    frozen = nesc.freeze(nesc.transform(model, x, ratio=2, min_params=100))
    nesc.export_onnx(frozen, x, tmp_path / "m.onnx")
    session = onnx_backend.ort_session(tmp_path / "m.onnx", threads=1)
    x3 = torch.randn(3, 6, 16)
    (got,) = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
    with torch.no_grad():
        want = frozen(x3)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


class _PadThenMaxPool(nn.Module):
    """BiT's stem: a conv, a zero Pad, then MaxPool (whose own padding would be -inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)

    def forward(self, x):
        return F.max_pool2d(F.pad(self.conv(x), (1, 1, 1, 1), value=0.0), 3, 2)


@pytest.mark.parametrize("regenerate", ["once", "per_call"])
def test_a_zero_pad_before_max_pool_keeps_its_zeros_in_onnxruntime(regenerate: str, tmp_path: Path) -> None:
    """onnxruntime's Pad_Fusion would fold the Pad into MaxPool's -inf padding; ort_session disables it.
    Outputs that are exactly 0 are border windows whose real values are all negative: there the pad's
    0 is the maximum, and a fused MaxPool would return a negative value instead."""
    torch.manual_seed(0)
    model, x = _PadThenMaxPool().eval(), torch.randn(2, 3, 10, 10)
    frozen = nesc.freeze(nesc.transform(model, (x,), ratio=2, min_params=100, keep_first=False))
    nesc.export_onnx(frozen, (x,), tmp_path / "m.onnx")
    assert "Pad" in [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    session = onnx_backend.ort_session(tmp_path / "m.onnx", regenerate=regenerate, threads=1)
    with torch.no_grad():
        want = frozen(x)
    assert int((want == 0).sum()) > 0  # the case the fusion gets wrong occurs
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, want.numpy(), rtol=BACKEND_REL, atol=BACKEND_REL * float(want.abs().max()))
