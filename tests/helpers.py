"""What every nesc test shares: tolerances (defined here and nowhere else), numeric comparisons against
eager PyTorch or an independent computation, pass invariants, graph-structure queries, an independent
per-element reference of the sampler, and small hand-built models.

Numbers compared to an *independent* computation, never to the code under test run a second time.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.infra.pass_base import PassResult

import nesc
from nesc.models import get_spec
from nesc.core.modules import EpitomeSampler
from nesc.core.sampling import Geometry, to_param_layout

REGENERATE = torch.ops.nesc.regenerate.default

# ----------------------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


EXACT = Tol(0.0, 0.0)  # same function on the same inputs: bit for bit
CLOSE = Tol(1e-5, 1e-6)  # float32, same math, possibly another kernel or summation order
F64 = Tol(1e-10, 1e-12)  # float64 against an independent float64 reference
MIN_SNR_DB = 80.0  # a lossy step that should lose (almost) nothing: least squares of representable weights
BUDGET_RTOL = 0.02  # a plan stores its parameter budget within 2%
BYTES_RTOL = 0.05  # a frozen model stores dense bytes / ratio within 5%
# A lowered model (ONNX Runtime, TVM) against eager PyTorch, float32: max abs error <= BACKEND_REL * max |output|.
# Other kernels and summation orders over convolutions hundreds of terms deep; 1e-4 leaves ~100x margin.
BACKEND_REL = 1e-4
# An ONNX file's size ratio (dense file / compressed file) against the ratio of the tensors it stores:
# the graph itself (nodes, names, shapes; 0.1-0.5 MB for the registry models, more nodes for more
# regenerated layers) is in both files but weighs 4x more in the compressed one. 10% holds for models
# whose dense file is >= 1 MiB (measured: 3-8% below); smaller ones are dominated by the graph.
ONNX_FILE_RATIO_RTOL = 0.10


def assert_close(actual: Tensor, expected: Tensor, tol: Tol = CLOSE, what: str = "") -> None:
    """``actual`` equals ``expected`` within ``tol`` (EXACT means torch.equal), shapes and dtypes included."""
    assert isinstance(actual, Tensor) and isinstance(expected, Tensor), (type(actual), type(expected))
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if tol == EXACT:
        if not torch.equal(actual, expected):
            diff = (actual.double() - expected.double()).abs().max().item()
            raise AssertionError(f"{what}: not bit-identical (max abs diff {diff:.3g})")
        return
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{what}: {m}")


def assert_number_close(actual: float, expected: float, tol: Tol = CLOSE, what: str = "") -> None:
    assert math.isclose(actual, expected, rel_tol=tol.rtol, abs_tol=tol.atol), f"{what}: {actual} != {expected}"


def relative_error_db(error: float) -> float:
    """A relative error ||x - y|| / ||y|| as a signal-to-noise ratio in dB."""
    return math.inf if error == 0 else -20 * math.log10(error)


def snr_db(actual: Tensor, expected: Tensor) -> float:
    """Signal-to-noise ratio of ``actual`` as an approximation of ``expected``, in dB."""
    noise = (actual.double() - expected.double()).pow(2).sum().item()
    signal = expected.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def assert_snr(actual: Tensor, expected: Tensor, min_db: float = MIN_SNR_DB, what: str = "") -> None:
    db = snr_db(actual, expected)
    assert db >= min_db, f"{what}: SNR {db:.1f} dB < {min_db} dB"


# ----------------------------------------------------------------------------------- pass invariants


def check_pass(result: PassResult, *, modified: bool) -> fx.GraphModule:
    """A pass returned a PassResult that says honestly whether it changed the graph, and the graph lints."""
    assert isinstance(result, PassResult), f"a pass must return a PassResult, got {type(result).__name__}"
    assert result.modified is modified, f"PassResult.modified is {result.modified}, expected {modified}"
    result.graph_module.graph.lint()
    return result.graph_module


def graph_signature(gm: fx.GraphModule) -> list[tuple]:
    """The graph as (op, target, args) tuples: equal signatures mean an untouched graph."""
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


# ---------------------------------------------------------------------------------------- structure


def call_function_targets(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def call_modules_of(gm: fx.GraphModule, cls: type) -> list[tuple[fx.Node, nn.Module]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls):
            out.append((n, gm.get_submodule(n.target)))
    return out


def sampler_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, EpitomeSampler]]:
    return call_modules_of(gm, EpitomeSampler)


def regenerate_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is REGENERATE]


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- eager comparisons


def run(module: nn.Module, inputs: tuple, *, train: bool = False, seed: int = 0) -> Tensor:
    """One forward in the given mode, from a fixed seed (dropout masks), without autograd."""
    module.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return module(*inputs)


def assert_matches_eager(
    gm: fx.GraphModule, reference: nn.Module, inputs: tuple, *, train: bool = False, tol: Tol = CLOSE, seed: int = 0
) -> Tensor:
    """``gm`` and the eager ``reference`` agree in the same mode from the same seed: outputs, and (in
    training mode) every buffer the reference updates, e.g. batch-norm running statistics."""
    got = run(gm, inputs, train=train, seed=seed)
    want = run(reference, inputs, train=train, seed=seed)
    assert_close(got, want, tol, f"output ({'train' if train else 'eval'} mode)")
    for name, buf in reference.named_buffers():
        assert_close(gm.get_buffer(name), buf, tol, f"buffer {name}")
    return got


def sampled_weights(gm: fx.GraphModule) -> dict[str, Tensor]:
    """Weight name -> the weight ``gm`` uses in eval mode, read from its samplers or frozen
    ``nesc.regenerate`` nodes (in the parameter's own layout)."""
    out = {}
    with torch.no_grad():
        for node, sampler in sampler_nodes(gm):
            was = sampler.training
            sampler.eval()
            out[sampler.weight_name] = sampler(gm.get_parameter(node.args[0].target)).clone()
            sampler.train(was)
        for node in regenerate_nodes(gm):
            pool, starts, fracs, scale, *rest = node.args
            fetch = lambda n: (
                gm.get_parameter(n.target) if n.target.startswith("nesc_pool") else gm.get_buffer(n.target)
            )  # noqa: E731
            out[node.meta[nesc.core.names.SAMPLED_WEIGHT]] = REGENERATE(
                fetch(pool), fetch(starts), fetch(fracs), fetch(scale), *rest)
    return out


def dense_twin(gm: fx.GraphModule, model: nn.Module) -> nn.Module:
    """A copy of the eager ``model`` holding ``gm``'s current state: the weights ``gm`` samples in place
    of the compressed ones, and ``gm``'s values of every other parameter and buffer (which training
    may have changed). The independent dense computation a transformed graph must equal."""
    twin = copy.deepcopy(model)
    weights = sampled_weights(gm)
    assert weights, "the graph samples no weight"
    state = dict(gm.named_parameters()) | dict(gm.named_buffers())
    with torch.no_grad():
        for name, t in list(twin.named_parameters()) + list(twin.named_buffers()):
            value = weights.get(name, state.get(name))
            assert value is not None, f"{name} is neither sampled nor kept by the graph"
            assert t.shape == value.shape, f"{name}: graph has {tuple(value.shape)}, model {tuple(t.shape)}"
            t.copy_(value)
    return twin


# --------------------------------------------------------------- the sampler, element by element


def naive_regenerate(pool: Tensor, starts: Tensor, scale: float, geometry: Geometry) -> Tensor:
    """DESIGN.md's sampling rule, one weight element at a time, in float64.

    W[o, i, u, v] = scale * sum over the 2^4 corners c of prod_d w_d(c) * P[wrap/clamp(floor(s) + offset + c)]
    with block (j, k) = (o // bo, i // bi) and its real start s = starts[j, k]; channel axes wrap
    modulo (Op, Ip), spatial starts clamp to [0, K - k] and spatial reads clamp to the pool's edge.
    """
    O, I, kh, kw = geometry.shape
    Op, Ip, Kh, Kw = geometry.pool
    bo, bi = geometry.block
    P = pool.detach().double()
    W = torch.zeros(O, I, kh, kw, dtype=torch.float64)
    for o, i in itertools.product(range(O), range(I)):
        (j, a), (k, b) = divmod(o, bo), divmod(i, bi)
        s = [float(v) for v in starts[j, k]]
        s[2] = min(max(s[2], 0.0), Kh - kh)
        s[3] = min(max(s[3], 0.0), Kw - kw)
        base = [math.floor(v) for v in s]
        frac = [v - f for v, f in zip(s, base)]
        for u, v in itertools.product(range(kh), range(kw)):
            acc = 0.0
            for c in itertools.product((0, 1), repeat=4):
                weight = math.prod(frac[d] if c[d] else 1.0 - frac[d] for d in range(4))
                po = (base[0] + a + c[0]) % Op
                pi = (base[1] + b + c[1]) % Ip
                py = min(base[2] + u + c[2], Kh - 1)
                px = min(base[3] + v + c[3], Kw - 1)
                acc += weight * float(P[po, pi, py, px])
            W[o, i, u, v] = scale * acc
    return to_param_layout(W, geometry.layout)


# ----------------------------------------------------------------------------------- small models


class StageNet(nn.Module):
    """Conv3x3 stem + BN + ReLU, a 3x3 conv, a 1x1 conv and a linear on channels-last features (all
    at 8x8 resolution, so ``per_stage`` shares one pool across three layer types), dropout and a head."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(2 * width, 2 * width, 1, bias=False)
        self.mix = nn.Linear(2 * width, 2 * width)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(2 * width, classes)

    def features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))  # (B, w, H, W)
        x = F.relu(self.conv3(x))  # (B, 2w, H, W)
        x = self.conv1(x)  # (B, 2w, H, W)
        return self.mix(x.permute(0, 2, 3, 1))  # (B, H, W, 2w)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x).mean((1, 2))  # (B, 2w)
        return self.head(self.drop(x))  # (B, classes)


class ShapeBranchNet(StageNet):
    """StageNet with Python control flow on a shape: symbolic_trace fails, torch.export does not."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] > 16:
            x = F.avg_pool2d(x, 2)
        return super().forward(x)


class UnpackNet(StageNet):
    """StageNet that unpacks the input's shape and loops over it: symbolic_trace fails on range(H)."""

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        y = self.features(x)  # (B, H, W, 2w)
        pooled = sum(y[:, row].mean(1) for row in range(H)) / H  # (B, 2w)
        return self.head(self.drop(pooled.reshape(B, -1)))


def stage_net_inputs(batch: int = 4, size: int = 8, seed: int = 0) -> tuple[Tensor]:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


# Compress every weight of a small model: thresholds and keep-dense preferences off.
COMPRESS_ALL = dict(min_params=0, keep_first=False, keep_classifier=False)


# -------------------------------------------------------------------------- registry models, cached


@functools.lru_cache(maxsize=None)
def registry_inputs(name: str, batch: int = 2) -> tuple[Tensor, ...]:
    return get_spec(name).example_inputs(batch, test=True)


def registry_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return get_spec(name).create()


@functools.lru_cache(maxsize=None)
def analysed_registry(name: str) -> fx.GraphModule:
    """capture + functionalize + find_weights of a registry model: the input of plan_pools. Shared;
    plan_pools only writes gm.meta, so tests may run it on this graph again and again."""
    from nesc.passes.find_weights import find_weights
    from nesc.passes.functionalize import functionalize

    gm = nesc.capture(registry_model(name), registry_inputs(name))
    functionalize(gm)
    find_weights(gm)
    return gm


@functools.lru_cache(maxsize=None)
def _transformed_registry(name: str) -> tuple[nn.Module, fx.GraphModule]:
    model = registry_model(name)
    init = "dense" if name in DENSE_INIT_MODELS else "random"
    return model, nesc.transform(model, registry_inputs(name), ratio=4, init=init)


# Registry models transformed with the default least-squares fit to their dense weights; the others
# start from random pools, which costs nothing (the fit of resnet18_cifar alone takes 4-30 s here).
DENSE_INIT_MODELS = {"mlp", "cnn1d"}


def transformed_registry(name: str) -> tuple[nn.Module, fx.GraphModule]:
    """(dense model, trainable GraphModule at ratio 4), fresh copies of a cached transform; pools are
    fitted to the dense weights for ``DENSE_INIT_MODELS`` and random for the others."""
    model, gm = _transformed_registry(name)
    return copy.deepcopy(model), copy.deepcopy(gm)


# ----------------------------------------------------------------------------- compiled backends

def assert_backend_close(actual, expected: Tensor, what: str = "") -> None:
    """``actual`` (numpy or torch) matches eager ``expected`` within ``BACKEND_REL`` of the output scale."""
    got = torch.as_tensor(actual)
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    scale = expected.detach().abs().max().item()
    err = (got.double() - expected.detach().double()).abs().max().item()
    assert err <= BACKEND_REL * max(scale, 1e-30), f"{what}: max abs error {err:.3g} > {BACKEND_REL} x {scale:.3g}"
