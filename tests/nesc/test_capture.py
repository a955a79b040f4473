"""nesc.capture (and transform's use of it): symbolic_trace first, torch.export when tracing fails;
outputs equal eager; train()/eval() switch dropout and batch norm on both paths; the user's model is
never touched; one clear error when neither path can capture, another for bad example inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import nesc
from helpers import (
    CLOSE,
    COMPRESS_ALL,
    EXACT,
    ShapeBranchNet,
    StageNet,
    UnpackNet,
    analysed_registry,
    assert_close,
    assert_matches_eager,
    call_modules_of,
    dense_twin,
    registry_inputs,
    registry_model,
    run,
    stage_net_inputs,
)
from nesc.core import names
from nesc.core.modules import EpitomeSampler
from nesc.capture import ExportedBatchNorm, ModeDropout
from nesc.models import get_spec, list_models


class StarUnpackNet(StageNet):
    """Star-unpacks a proxy (``B, *rest = x.shape``): symbolic_trace cannot iterate a Proxy."""

    def forward(self, x):
        B, *rest = x.shape
        return self.head(self.drop(self.features(x).reshape(B, -1, self.head.in_features).mean(1)))


EXPORT_MODELS = {"shape_branch": ShapeBranchNet, "unpack": UnpackNet, "star_unpack": StarUnpackNet}
ALL_SMALL = {"plain": StageNet, **EXPORT_MODELS}
EXPECTED_PATH = {"plain": "symbolic_trace", "shape_branch": "export", "unpack": "export", "star_unpack": "export"}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return ALL_SMALL[kind]()


# ------------------------------------------------------------------------------- capture paths


@pytest.mark.parametrize("name", list_models())
def test_registry_models_are_symbolically_traced(name: str) -> None:
    gm = analysed_registry(name)  # capture + functionalize + find_weights, shared with the plan tests
    assert gm.meta[names.CAPTURE] == "symbolic_trace"
    assert gm.meta[names.INPUT_SPECS] == [((2, *get_spec(name).test_input_shape), "float32")]


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "resnet18_cifar", "vit_tiny", "resnet18"])
def test_registry_captures_equal_eager(name: str) -> None:
    x = registry_inputs(name)
    assert_close(run(analysed_registry(name), x), run(registry_model(name), x), EXACT, name)


@pytest.mark.parametrize("kind", ALL_SMALL)
def test_capture_path_and_outputs(kind: str) -> None:
    model, x = _model(kind), stage_net_inputs()
    gm = nesc.capture(model, x)
    assert isinstance(gm, fx.GraphModule)
    assert gm.meta[names.CAPTURE] == EXPECTED_PATH[kind]
    assert gm.meta[names.INPUT_SPECS] == [((4, 3, 8, 8), "float32")]
    assert gm.meta["nesc_module_types"]["conv3"] is nn.Conv2d
    gm.graph.lint()
    assert_close(run(gm, x), run(model, x), EXACT, f"{kind}, eval")
    assert_matches_eager(gm, copy.deepcopy(model), x, train=True, tol=EXACT)


@pytest.mark.parametrize("kind", EXPORT_MODELS)
def test_export_path_is_a_plain_graph_module_with_mode_aware_bn_and_dropout(kind: str) -> None:
    gm = nesc.capture(_model(kind), stage_net_inputs())
    # A plain fx.GraphModule (fx makes one class per instance), not the exporter's module that refuses train()
    assert isinstance(gm, fx.GraphModule) and type(gm).__mro__[1] is fx.GraphModule
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.batch_norm.default not in targets and torch.ops.aten.dropout.default not in targets
    assert len(call_modules_of(gm, ExportedBatchNorm)) == 1 and len(call_modules_of(gm, ModeDropout)) == 1
    assert torch.ops.aten.conv2d.default in targets and torch.ops.aten.linear.default in targets


@pytest.mark.parametrize("kind", EXPORT_MODELS)
def test_export_capture_serves_another_batch_size(kind: str) -> None:
    model = _model(kind)
    gm = nesc.capture(model, stage_net_inputs(batch=4))
    x3 = stage_net_inputs(batch=3, seed=1)
    assert_close(run(gm, x3), run(model, x3), EXACT, "batch 3")


# --------------------------------------------------------------------- train / eval on both paths


@pytest.mark.parametrize("kind", ["plain", "shape_branch", "unpack"])
def test_transformed_graph_switches_dropout_and_batch_norm(kind: str) -> None:
    model, x = _model(kind), stage_net_inputs()
    gm = nesc.transform(model, x, init="random", **COMPRESS_ALL)
    assert gm.meta[names.CAPTURE] == EXPECTED_PATH[kind]
    twin = dense_twin(gm, model)  # the eager model holding the weights gm samples

    # train: batch statistics, running-stat updates and dropout masks, all as in eager
    nbt = gm.get_buffer("bn.num_batches_tracked").clone()
    mean = gm.get_buffer("bn.running_mean").clone()
    out1 = assert_matches_eager(gm, twin, x, train=True, seed=1)
    assert gm.get_buffer("bn.num_batches_tracked") == nbt + 1
    assert not torch.equal(gm.get_buffer("bn.running_mean"), mean), "train mode did not update running stats"
    out2 = assert_matches_eager(gm, twin, x, train=True, seed=2)
    assert not torch.equal(out1, out2), "train mode: dropout draws no masks"

    # eval: deterministic, running statistics, buffers frozen
    frozen_stats = gm.get_buffer("bn.running_var").clone()
    e1 = assert_matches_eager(gm, twin, x, train=False, seed=1)
    e2 = assert_matches_eager(gm, twin, x, train=False, seed=2)
    assert_close(e1, e2, EXACT, "eval mode is deterministic")
    assert_close(gm.get_buffer("bn.running_var"), frozen_stats, EXACT, "eval mode updated running stats")
    # eval really uses the running statistics: perturbing them changes the output
    with torch.no_grad():
        gm.get_buffer("bn.running_mean").add_(1.0)
    assert not torch.equal(run(gm, x), e1), "eval output ignores running statistics"


@pytest.mark.parametrize("training", [True, False])
def test_capture_keeps_the_models_mode(training: bool) -> None:
    model = _model("shape_branch").train(training)
    assert nesc.capture(model, stage_net_inputs()).training is training
    assert nesc.transform(model, stage_net_inputs(), init="random").training is training


class BatchNormNet(nn.Module):
    def __init__(self, **bn) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, **bn)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        B, *_ = x.shape  # forces the export path
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize(
    "bn",
    [
        pytest.param({}, id="momentum_0.1"),
        pytest.param({"track_running_stats": False}, id="no_running_stats"),
        pytest.param({"momentum": None}, id="cumulative_average"),
    ],
)
def test_export_path_batch_norm_variants_train_like_eager(bn: dict) -> None:
    torch.manual_seed(0)
    model, x = BatchNormNet(**bn), stage_net_inputs()
    gm = nesc.capture(model, x)
    assert gm.meta[names.CAPTURE] == "export"
    ref = copy.deepcopy(model)
    for step in range(2):
        assert_matches_eager(gm, ref, (x[0] + step,), train=True)
    assert_matches_eager(gm, ref, x, train=False)


@pytest.mark.parametrize(
    "dropout",
    [
        pytest.param(nn.Dropout, id="Dropout"),
        pytest.param(nn.Dropout2d, id="Dropout2d"),
        pytest.param(nn.AlphaDropout, id="AlphaDropout"),
    ],
)
def test_export_path_every_dropout_kind_follows_train(dropout: type) -> None:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.drop = dropout(0.5)

        def forward(self, x):
            B, *_ = x.shape
            return self.drop(self.conv(x))

    torch.manual_seed(0)
    model, x = Net(), stage_net_inputs()
    gm = nesc.capture(model, x)
    assert_matches_eager(gm, copy.deepcopy(model), x, train=True, seed=3)
    assert not torch.equal(run(gm, x, train=True, seed=3), run(gm, x, train=False)), "train mode has no dropout"


class FunctionalDropoutNet(nn.Module):
    """timm-style: dropout through F.dropout(..., training=self.training), not an nn.Dropout module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.dropout(F.relu(self.fc1(x)), 0.5, self.training))


def test_symbolic_path_functional_dropout_follows_eval() -> None:
    torch.manual_seed(0)
    model, x = FunctionalDropoutNet(), (torch.randn(4, 16),)
    gm = nesc.capture(model, x)
    assert gm.meta[names.CAPTURE] == "symbolic_trace"
    assert_matches_eager(gm, copy.deepcopy(model), x, train=False, seed=1)


# ------------------------------------------------------------------------- the user's model


@pytest.mark.parametrize("kind", ["plain", "shape_branch"])
def test_transform_leaves_the_users_model_untouched(kind: str) -> None:
    model, x = _model(kind), stage_net_inputs()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    out_before = run(copy.deepcopy(model), x)

    gm = nesc.transform(model, x, init="dense", **COMPRESS_ALL)
    run(gm, x, train=True)  # training the transformed graph must not reach the user's model either

    assert model.training, "transform changed the model's mode"
    assert [n for n, _ in model.named_parameters()] == names
    assert all(a is b for a, b in zip(model.parameters(), params)), "parameters were replaced"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert_close(after[k], before[k], EXACT, k)
    assert_close(run(model, x), out_before, EXACT, "the user's model computes what it did")
    assert not any(n.startswith("nesc_") for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------------- errors


class ItemGate(nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:  # a Python decision on a tensor value
            return x * 2
        return x


class NumpyAct(nn.Module):
    def forward(self, x):
        return torch.from_numpy(np.tanh(x.detach().numpy()))


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.inner = inner

    def forward(self, x):
        return self.inner(self.conv(x))


@pytest.mark.parametrize("inner, cls", [(ItemGate, "ItemGate"), (NumpyAct, "NumpyAct")])
def test_uncapturable_model_raises_one_capture_error_naming_module_and_both_reasons(inner, cls, capsys) -> None:
    with pytest.raises(nesc.CaptureError) as info:
        nesc.capture(Wrapper(inner()), (torch.randn(1, 3, 4, 4),))
    msg = str(info.value)
    assert "Wrapper" in msg, "the model is not named"
    assert cls in msg, f"the failing module class {cls} is not named: {msg}"
    assert "symbolic_trace" in msg and "export" in msg, "both capture paths' reasons must be given"
    reasons = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in msg.splitlines() if ":" in line}
    assert reasons.get("torch.fx.symbolic_trace") and reasons.get("torch.export.export"), f"a reason is missing: {msg}"
    assert "torch.where" in msg or "torch.cond" in msg, "no advice on how to fix"


def test_item_failure_is_located_in_the_submodule() -> None:
    with pytest.raises(nesc.CaptureError, match=r"failure is in inner \(ItemGate\)"):
        nesc.capture(Wrapper(ItemGate()), (torch.randn(1, 3, 4, 4),))


@pytest.mark.parametrize(
    "inputs, words",
    [
        ((torch.randn(1, 4, 8, 8),), ["StageNet", "(1, 4, 8, 8)", "channels"]),
        ((torch.randn(1, 3, 8, 8).long(),), ["StageNet", "int64"]),
        ((), ["non-empty tuple"]),
        ((np.zeros((1, 3, 8, 8), dtype=np.float32),), ["example_inputs[0]", "ndarray", "torch.Tensor"]),
        ("x", ["tuple", "(x,)"]),
    ],
)
def test_wrong_example_inputs_raise_input_error(inputs, words: list[str]) -> None:
    with pytest.raises(nesc.InputError) as info:
        nesc.capture(StageNet(), inputs)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_wrong_inputs_through_transform_raise_input_error_and_do_not_touch_bn_stats() -> None:
    model = StageNet()
    before = model.bn.running_mean.clone()
    with pytest.raises(nesc.InputError):
        nesc.transform(model, (torch.randn(2, 5, 8, 8),))
    nesc.capture(model, stage_net_inputs())
    assert_close(model.bn.running_mean, before, EXACT, "checking inputs updated the user's BN stats")


def test_a_single_tensor_is_accepted_as_inputs() -> None:
    (x,) = stage_net_inputs()
    assert nesc.capture(StageNet(), x).meta[names.INPUT_SPECS] == [((4, 3, 8, 8), "float32")]


def test_capture_rejects_a_non_module() -> None:
    with pytest.raises(nesc.InputError, match="nn.Module"):
        nesc.capture(lambda x: x, stage_net_inputs())


class _SampledInside(nn.Module):
    """torch.nn modules symbolic_trace keeps as leaves but whose weights nesc samples."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.up = nn.ConvTranspose1d(8, 8, 3)
        self.vol = nn.Conv3d(8, 4, 1)
        self.norm = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1))

    def forward(self, ids):
        h = self.norm(self.up(self.embed(ids).transpose(1, 2)))  # (B, 8, L + 2)
        return self.vol(h[..., None, None]).flatten(1)


def test_symbolic_trace_goes_inside_modules_whose_weights_nesc_samples() -> None:
    model, ids = _SampledInside(), (torch.randint(0, 20, (2, 5)),)
    gm = nesc.capture(model, ids)
    assert gm.meta[names.CAPTURE] == "symbolic_trace"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == []
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"embed.weight", "up.weight", "vol.weight", "norm.parametrizations.weight.original1"} <= reads
    assert_close(gm(*ids), model(*ids), EXACT, "traced through vs eager")


def test_attention_modules_are_traced_through_by_export() -> None:
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = (torch.randn(2, 5, 16),)
    gm = nesc.capture(model, x)
    assert gm.meta[names.CAPTURE] == "export"  # its shape checks defeat symbolic_trace
    assert "self_attn.in_proj_weight" in {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert_close(gm(*x), model(*x), CLOSE, "exported vs eager")


def _wrapped_attention(x: torch.Tensor, qkv: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """A function torch.fx.wrap keeps opaque that reads weights (as torchvision's shifted_window_attention)."""
    q, k, v = F.linear(x, qkv).chunk(3, dim=-1)
    return F.linear(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v, proj)


torch.fx.wrap("_wrapped_attention")


class _WrappedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(16, 48, bias=False), nn.Linear(16, 16, bias=False), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_wrapped_attention(x, self.qkv.weight, self.proj.weight).mean(1))


def test_a_wrapped_function_that_reads_weights_sends_capture_to_export() -> None:
    model, x = _WrappedAttention().eval(), (torch.randn(2, 5, 16),)
    traced = fx.symbolic_trace(model)  # what symbolic_trace alone gives: one opaque call reading both weights
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [_wrapped_attention]
    gm = nesc.capture(model, x)
    assert gm.meta[names.CAPTURE] == "export"
    assert {"qkv.weight", "proj.weight"} <= {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert _wrapped_attention not in {n.target for n in gm.graph.nodes}
    assert_close(gm(*x), model(*x), CLOSE, "exported vs eager")
    sampled = nesc.transform(model, x, ratio=2, min_params=16, keep_classifier=True)
    assert {"qkv.weight", "proj.weight"} <= {m.weight_name for m in sampled.modules() if isinstance(m, EpitomeSampler)}


def test_an_embedding_that_renormalises_its_table_stays_a_module() -> None:
    model, ids = nn.Sequential(nn.Embedding(20, 8, max_norm=1.0), nn.Flatten()), (torch.randint(0, 20, (2, 5)),)
    gm = nesc.capture(model, ids)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    report = nesc.summary(gm, print_table=False)
    assert any("max_norm" in reason for reason in report.other_dense), report.other_dense


# ------------------------------------------------------------------------------- keyword inputs


class _KeywordNet(nn.Module):
    """A forward with optional keyword inputs, a branch on whether one is given, and a reshape."""

    def __init__(self, shape_branch: bool = True):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.shape_branch = shape_branch

    def forward(self, ids, mask=None, scale=None, bias=None):
        h = self.proj(self.embed(ids))  # (B, L, 8)
        if mask is not None:
            h = h * mask[..., None]
        if bias is not None:
            h = h + bias
        if self.shape_branch and h.shape[1] > 3:  # a decision on a shape: symbolic_trace fails, export guards
            h = h.transpose(1, 2).reshape(h.shape[0], -1)
        return {"out": h}


@pytest.mark.parametrize("kind", ["symbolic", "export"])
def test_keyword_inputs_are_taken_by_name_in_forward_order(kind: str) -> None:
    torch.manual_seed(0)
    model = _KeywordNet(shape_branch=kind == "export").eval()
    length = 5
    ids, mask, bias = torch.randint(0, 20, (2, length)), torch.ones(2, length), torch.randn(8)
    kwargs = {"bias": bias, "mask": mask}  # given out of order, one parameter (scale) left out
    gm = nesc.capture(model, (ids,), kwargs)
    assert gm.meta[names.CAPTURE] == ("export" if kind == "export" else "symbolic_trace")
    assert [s for s, _ in gm.meta[names.INPUT_SPECS]] == [(2, length), (2, length), (8,)]  # ids, mask, bias
    want = model(ids, **kwargs)["out"]
    assert_close(gm(ids, mask=mask, bias=bias)["out"], want, EXACT, "by keyword")
    assert_close(gm(ids, mask, bias)["out"], want, EXACT, "positionally, in forward's order")


def test_export_capture_serves_other_batch_sizes_and_sequence_lengths() -> None:
    torch.manual_seed(0)
    model = _KeywordNet().eval()
    gm = nesc.capture(model, (torch.randint(0, 20, (2, 6)),), {"mask": torch.ones(2, 6, dtype=torch.long)})
    assert gm.meta[names.CAPTURE] == "export"
    for batch, length in [(1, 4), (5, 11)]:  # length > 3: the branch export took
        ids, mask = torch.randint(0, 20, (batch, length)), torch.randint(0, 2, (batch, length))
        assert_close(gm(ids, mask=mask)["out"], model(ids, mask=mask)["out"], EXACT, f"({batch}, {length})")


def test_bad_keyword_inputs_are_input_errors() -> None:
    with pytest.raises(nesc.InputError, match="example_kwargs must be a dict"):
        nesc.capture(_KeywordNet(), (torch.zeros(2, 3, dtype=torch.long),), [torch.ones(2, 3)])
    with pytest.raises(nesc.InputError, match=r"example_kwargs\['mask'\] is a float"):
        nesc.capture(_KeywordNet(), (torch.zeros(2, 3, dtype=torch.long),), {"mask": 1.0})


def test_exported_views_become_reshapes() -> None:
    """A view recorded under one input layout fails under another; a reshape never does."""
    model = _KeywordNet().eval()
    gm = nesc.capture(model, (torch.randint(0, 20, (2, 6)),))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.view.default not in targets and torch.ops.aten.reshape.default in targets
    from nesc.capture import views_as_reshapes

    assert views_as_reshapes(gm) is False  # nothing left to rewrite


class _MaskThroughKwargs(nn.Module):
    """FNet's forward: the attention mask arrives through ``**kwargs``; ``if x.shape[-1] > 1`` sends
    symbolic_trace to export, where torch 2.13 refuses dynamic shapes for such an input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x, **kwargs):  # x (B, S, 16), kwargs["attention_mask"] (B, S)
        if x.shape[-1] > 1:
            x = x * 1.0
        return self.linear(x) * kwargs["attention_mask"].unsqueeze(-1)


def test_a_keyword_input_that_forward_takes_through_var_kwargs_is_captured():
    torch.manual_seed(0)
    model = _MaskThroughKwargs().eval()
    x, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    gm = nesc.capture(model, (x,), {"attention_mask": mask})
    assert gm.meta[names.CAPTURE] == "export"
    with torch.no_grad():
        assert_close(gm(x, mask), model(x, attention_mask=mask), EXACT, "capture")
