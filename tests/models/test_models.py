"""Every registered model: builds, traces with torch.fx, matches eager, trains, and has the right size.

Parametrised over ``list_models()`` so that a new model is tested the moment it registers. Inputs are
each spec's ``test_input_shape`` at batch 2 to keep the file fast on a small CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from nesc.models import MODELS, ModelSpec, create_model, dense_params, get_spec, list_models, register_model

BATCH = 2
ALL_MODELS = list_models()

# Every model the package is expected to ship; a file missing from models/__init__.py shows up here.
EXPECTED_MODELS = {"cnn1d", "efficientnet_b0", "mlp", "mobilenetv2", "mobilenetv2_fmnist", "resnet18", "resnet18_cifar",
                   "resnet_fmnist", "vit_tiny"}

# Parameter counts of the reference implementations (torchvision) at the default class counts.
KNOWN_PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet18_cifar": 11_173_962,  # torchvision's ResNet-18 with a 3x3 stem and a 10-way fc
    "mobilenetv2": 3_504_872,
    "efficientnet_b0": 5_288_548,
}
PARAM_COUNT_RTOL = 0.01


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # init and dropout masks draw from the global generator


def _build(name: str) -> tuple[ModelSpec, nn.Module, torch.Tensor]:
    spec = get_spec(name)
    (x,) = spec.example_inputs(BATCH, test=True)
    return spec, spec.create(), x


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the registry


def test_every_expected_model_is_registered() -> None:
    assert set(ALL_MODELS) == EXPECTED_MODELS


def test_duplicate_name_raises_and_keeps_the_original() -> None:
    original = get_spec("mlp")
    with pytest.raises(KeyError, match="already registered"):
        register_model("mlp", input_shape=(1, 28, 28), num_classes=10, family="mlp")(lambda **kw: nn.Identity())
    assert get_spec("mlp") is original
    assert len(MODELS) == len(EXPECTED_MODELS)


def test_unknown_name_raises_listing_valid_names() -> None:
    with pytest.raises(KeyError, match="unknown model 'resnet19'") as info:
        create_model("resnet19")
    for name in ALL_MODELS:
        assert name in str(info.value)



def test_dense_params_counts_the_built_model_and_leaves_the_generator_alone() -> None:
    assert dense_params("cnn1d") == _num_params(create_model("cnn1d"))
    wide = {"num_classes": 4, "width_mult": 2}
    before = torch.get_rng_state()
    assert dense_params("cnn1d", **wide) > dense_params("cnn1d")
    assert torch.equal(torch.get_rng_state(), before)
    assert dense_params("cnn1d", **wide) == _num_params(create_model("cnn1d", **wide))
    with pytest.raises(KeyError, match="unknown model 'resnet19'"):
        dense_params("resnet19")

@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"num_classes": 0}, ValueError),
        ({"input_shape": (3, 0, 32)}, ValueError),
        ({"input_shape": [3, 32, 32]}, TypeError),
        ({"test_input_shape": (3, 16)}, ValueError),
        ({"family": ""}, ValueError),
        ({"name": ""}, ValueError),
    ],
)
def test_spec_is_validated_on_construction(overrides: dict, error: type[Exception]) -> None:
    fields = dict(
        name="toy",
        factory=nn.Identity,
        input_shape=(3, 32, 32),
        num_classes=10,
        test_input_shape=(3, 32, 32),
        family="toy",
    )
    with pytest.raises(error):
        ModelSpec(**{**fields, **overrides})


@pytest.mark.parametrize("name", ALL_MODELS)
def test_example_inputs_and_targets_are_deterministic(name: str) -> None:
    spec = get_spec(name)
    (full,) = spec.example_inputs(3)
    (small,) = spec.example_inputs(BATCH, test=True, seed=1)
    assert full.shape == (3, *spec.input_shape)
    assert small.shape == (BATCH, *spec.test_input_shape)
    assert torch.equal(small, spec.example_inputs(BATCH, test=True, seed=1)[0])
    assert not torch.equal(small, spec.example_inputs(BATCH, test=True, seed=2)[0])
    targets = spec.make_targets(8, seed=3)
    assert targets.dtype == torch.int64 and targets.shape == (8,)
    assert 0 <= int(targets.min()) and int(targets.max()) < spec.num_classes
    assert torch.equal(targets, spec.make_targets(8, seed=3))


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape(name: str) -> None:
    spec, model, x = _build(name)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (BATCH, spec.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_num_classes_override(name: str) -> None:
    spec = get_spec(name)
    (x,) = spec.example_inputs(BATCH, test=True)
    with torch.no_grad():
        out = create_model(name, num_classes=7).eval()(x)
    assert out.shape == (BATCH, 7)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_symbolic_trace_matches_eager(name: str) -> None:
    _, model, x = _build(name)
    model.eval()
    gm = fx.symbolic_trace(model)
    gm.graph.lint()
    with torch.no_grad():
        # The traced graph runs the same ops in the same order: bitwise equal, not merely close.
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_weighted_module_is_a_graph_node(name: str) -> None:
    # nesc rewrites weight-bearing modules found as call_module nodes; none may hide inside a leaf.
    _, model, _ = _build(name)
    gm = fx.symbolic_trace(model)
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    weighted = {n for n, m in model.named_modules() if not list(m.children()) and list(m.parameters(recurse=False))}
    assert weighted and weighted <= called, sorted(weighted - called)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_traced_graph_follows_train_and_eval(name: str) -> None:
    _, model, x = _build(name)
    assert any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) for m in model.modules())
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        train_out = gm.train()(x)  # batch statistics and/or dropout
        eval_out = gm.eval()(x)  # running statistics, no dropout
        assert not torch.allclose(train_out, eval_out)
        torch.testing.assert_close(eval_out, gm(x), rtol=0, atol=0)  # eval is deterministic


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_gives_finite_grads_to_every_parameter(name: str) -> None:
    spec, model, x = _build(name)
    loss = F.cross_entropy(model.train()(x), spec.make_targets(BATCH))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    not_finite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient reached {missing}"
    assert not not_finite, f"non-finite gradients in {not_finite}"


@pytest.mark.parametrize("name", sorted(KNOWN_PARAM_COUNTS))
def test_param_count_matches_reference(name: str) -> None:
    got = _num_params(create_model(name))
    assert got == pytest.approx(KNOWN_PARAM_COUNTS[name], rel=PARAM_COUNT_RTOL)


def test_mobilenetv2_width_mult_shrinks_the_model() -> None:
    assert _num_params(create_model("mobilenetv2", width_mult=0.5)) < _num_params(create_model("mobilenetv2"))
