"""passes.find_weights (analysis): every weight-bearing op in both capture forms, with its 4-D shape,
layout, op kind and MAdd (checked against hand computations); every other parameter listed dense with a
reason; the graph untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import nesc
from helpers import (
    CLOSE,
    COMPRESS_ALL,
    analysed_registry,
    assert_close,
    check_pass,
    dense_twin,
    graph_signature,
    run,
)
from nesc.core import names
from nesc.passes.find_weights import WeightInfo, find_weights, weight_infos
from nesc.passes.functionalize import functionalize


class Zoo(nn.Module):
    """One of every weight form nesc samples. ``force_export`` star-unpacks a shape so that
    symbolic_trace fails and the aten forms (aten.conv2d, aten.linear, aten.matmul, aten.mm) are seen."""

    def __init__(self, force_export: bool = False) -> None:
        super().__init__()
        self.force_export = force_export
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.gr = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(32, 32, 1)
        self.bn = nn.BatchNorm2d(32)
        self.w_conv = nn.Parameter(torch.randn(32, 32, 3, 3) * 0.05)
        self.w_lin = nn.Parameter(torch.randn(24, 32) * 0.1)
        self.w_mm = nn.Parameter(torch.randn(24, 20) * 0.1)
        self.w_mm3 = nn.Parameter(torch.randn(20, 16) * 0.1)
        self.w_mm4 = nn.Parameter(torch.randn(16, 12) * 0.1)
        self.lin = nn.Linear(12, 10)
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x, s):
        if self.force_export:
            B, *_ = x.shape
        s = self.c1(s).mean(-1)  # (B, 8)
        x = self.bn(self.pw(self.gr(self.dw(self.c2(x)))))  # (B, 32, 8, 8)
        x = F.conv2d(x, self.w_conv, padding=1).mean((2, 3))  # (B, 32)
        x = F.linear(x, self.w_lin)  # (B, 24)
        x = x @ self.w_mm  # (B, 20)
        x = torch.mm(x, self.w_mm3)  # (B, 16)
        x = torch.matmul(x.unsqueeze(1), self.w_mm4).squeeze(1)  # (B, 12) via (B, 1, 16) @ (16, 12)
        return self.lin(x) * self.scale + s.sum(-1, keepdim=True)  # (B, 10)


ZOO_INPUTS = (torch.randn(2, 3, 8, 8), torch.randn(2, 4, 10))

# weight -> (op, layout, (O, I, kh, kw), MAdd per example by hand: output elements x I x kh x kw)
ZOO_EXPECTED = {
    "c1.weight": ("conv1d", "conv1d", (8, 4, 1, 3), 8 * 10 * 4 * 3),
    "c2.weight": ("conv2d", "conv2d", (16, 3, 3, 3), 16 * 64 * 3 * 9),
    "dw.weight": ("conv2d_dw", "conv2d", (16, 1, 3, 3), 16 * 64 * 1 * 9),
    "gr.weight": ("conv2d_group", "conv2d", (32, 4, 3, 3), 32 * 64 * 4 * 9),
    "pw.weight": ("conv2d", "conv2d", (32, 32, 1, 1), 32 * 64 * 32),
    "w_conv": ("conv2d", "conv2d", (32, 32, 3, 3), 32 * 64 * 32 * 9),
    "w_lin": ("linear", "linear", (24, 32, 1, 1), 24 * 32),
    "w_mm": ("matmul", "linear_t", (20, 24, 1, 1), 20 * 24),
    "w_mm3": ("matmul", "linear_t", (16, 20, 1, 1), 16 * 20),
    "w_mm4": ("matmul", "linear_t", (12, 16, 1, 1), 12 * 16),
    "lin.weight": ("linear", "linear", (10, 12, 1, 1), 10 * 12),
}
ZOO_MODULE_TYPE = {"c1.weight": "Conv1d", "dw.weight": "Conv2d", "w_conv": "Zoo", "w_mm": "Zoo", "lin.weight": "Linear"}


def _analyse(model: nn.Module, inputs: tuple):
    gm = functionalize(nesc.capture(model, inputs)).graph_module
    before = graph_signature(gm)
    gm = check_pass(find_weights(gm), modified=False)
    assert graph_signature(gm) == before, "an analysis pass changed the graph"
    return gm


@pytest.mark.parametrize("force_export", [False, True], ids=["symbolic_trace", "export"])
def test_every_weight_form_is_found_with_shape_layout_op_and_madd(force_export: bool) -> None:
    torch.manual_seed(0)
    gm = _analyse(Zoo(force_export), ZOO_INPUTS)
    assert gm.meta[names.CAPTURE] == ("export" if force_export else "symbolic_trace")
    infos = {i.weight_name: i for i in weight_infos(gm)}
    assert set(infos) == set(ZOO_EXPECTED)
    for name, (op, layout, shape, madd) in ZOO_EXPECTED.items():
        i = infos[name]
        assert (i.op, i.layout, i.shape, i.madd) == (op, layout, shape, madd), name
        assert i.state == "dense" and i.numel == torch.Size(shape).numel()
    for name, cls in ZOO_MODULE_TYPE.items():
        assert infos[name].module_type == cls, name
    assert infos["c2.weight"].module_name == "c2" and infos["w_conv"].module_name == ""
    assert [i.order for i in weight_infos(gm)] == list(range(len(ZOO_EXPECTED)))
    assert infos["c2.weight"].in_shape == (3, 8, 8) and infos["c2.weight"].channel_dim == 1
    assert infos["w_lin"].in_shape == (32,) and infos["w_lin"].channel_dim == -1
    assert infos["c1.weight"].kernel == "1x3"


@pytest.mark.parametrize("force_export", [False, True], ids=["symbolic_trace", "export"])
def test_the_weight_info_sits_on_the_op_that_consumes_the_parameter(force_export: bool) -> None:
    gm = _analyse(Zoo(force_export), ZOO_INPUTS)
    aten = torch.ops.aten
    allowed = {
        F.conv1d,
        F.conv2d,
        F.linear,
        torch.matmul,
        torch.mm,
        torch.conv1d,
        torch.conv2d,
        aten.conv1d.default,
        aten.conv2d.default,
        aten.linear.default,
        aten.matmul.default,
        aten.mm.default,
    }
    nodes = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if names.WEIGHT in node.meta:
            info: WeightInfo = node.meta[names.WEIGHT]
            assert node.target in allowed or node.target.__name__ == "matmul", node.target
            w = nodes[info.weight_node]
            assert w.op == "get_attr" and w.target == info.weight_name
            assert w in node.all_input_nodes


@pytest.mark.parametrize("force_export", [False, True], ids=["symbolic_trace", "export"])
def test_other_parameters_are_listed_dense_with_reasons(force_export: bool) -> None:
    model = Zoo(force_export)
    gm = _analyse(model, ZOO_INPUTS)
    dense = {d.name: d for d in gm.meta[names.DENSE_PARAMS]}
    all_params = dict(model.named_parameters())
    assert set(dense) == set(all_params) - set(ZOO_EXPECTED)
    for name, d in dense.items():
        assert d.numel == all_params[name].numel() and d.reason, name
        if name.endswith(".bias") and not name.startswith("bn"):
            assert "bias" in d.reason, (name, d.reason)
    assert "batch" in dense["bn.weight"].reason.lower(), dense["bn.weight"].reason
    assert "mul" in dense["scale"].reason, dense["scale"].reason


class AddmmNet(nn.Module):
    def __init__(self, force_export: bool) -> None:
        super().__init__()
        self.force_export = force_export
        self.w = nn.Parameter(torch.randn(20, 24))  # (I, O) as stored
        self.b = nn.Parameter(torch.zeros(24))

    def forward(self, x):
        if self.force_export:
            B, *_ = x.shape
        return torch.addmm(self.b, x, self.w)  # (B, 24)


@pytest.mark.parametrize(
    "force_export",
    [
        pytest.param(True, id="export"),
        pytest.param(False, id="symbolic_trace"),
    ],
)
def test_addmm_against_a_parameter(force_export: bool) -> None:
    gm = _analyse(AddmmNet(force_export), (torch.randn(2, 20),))
    (info,) = weight_infos(gm)
    assert (info.weight_name, info.op, info.layout, info.shape, info.madd) == (
        "w",
        "matmul",
        "linear_t",
        (24, 20, 1, 1),
        480,
    )
    assert {d.name for d in gm.meta[names.DENSE_PARAMS]} == {"b"}


class TransposedMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(48, 64) * 0.1)  # stored (O, I), used as x @ w.t()
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        return self.head(x @ self.w.t())  # (B, 4)


def test_matmul_against_a_transposed_parameter_has_the_parameters_shape() -> None:
    # Reported (I, O) with the wrong MAdd when this suite was written; kept as a regression test.
    gm = _analyse(TransposedMatmul(), (torch.randn(2, 64),))
    info = next(i for i in weight_infos(gm) if i.weight_name == "w")
    assert (info.op, info.layout, info.shape, info.madd) == ("matmul", "linear", (48, 64, 1, 1), 48 * 64)


def test_transform_samples_a_transposed_matmul_weight() -> None:
    torch.manual_seed(0)
    model, x = TransposedMatmul(), (torch.randn(2, 64),)
    gm = nesc.transform(model, x, init="random", ratio=2, min_params=0, overrides={"head": None})
    assert_close(run(gm, x), run(dense_twin(gm, model), x), CLOSE, "x @ sampled(w).t()")


def _flop_madd_per_example(model: nn.Module, inputs: tuple) -> int:
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2 // inputs[0].shape[0]  # a multiply-add is two flops


class OneOp(nn.Module):
    """One weight-bearing op against a parameter; ``force_export`` makes symbolic_trace fail."""

    def __init__(self, fn, weight_shape: tuple[int, ...], force_export: bool) -> None:
        super().__init__()
        self.fn, self.force_export = fn, force_export
        self.w = nn.Parameter(torch.randn(weight_shape) * 0.1)

    def forward(self, x):
        if self.force_export:
            B, *_ = x.shape
        return self.fn(x, self.w)


# form -> (op, weight shape, input shape, op kind, layout, (O, I, kh, kw) view): every overload of the
# conv / transposed conv / linear / matmul / einsum / embedding families against a parameter.
OVERLOADS = {
    "conv2d_same": (lambda x, w: F.conv2d(x, w, padding="same"), (8, 3, 3, 3), (2, 3, 6, 6), "conv2d", "conv2d", (8, 3, 3, 3)),
    "conv2d_valid": (lambda x, w: F.conv2d(x, w, padding="valid"), (8, 3, 3, 3), (2, 3, 6, 6), "conv2d", "conv2d", (8, 3, 3, 3)),
    "conv1d_same": (lambda x, w: F.conv1d(x, w, padding="same"), (8, 4, 3), (2, 4, 10), "conv1d", "conv1d", (8, 4, 1, 3)),
    "conv3d": (lambda x, w: F.conv3d(x, w, padding=1), (8, 3, 3, 3, 3), (2, 3, 4, 4, 4), "conv3d", "conv2d", (8, 3, 9, 3)),
    "conv3d_same": (lambda x, w: F.conv3d(x, w, padding="same"), (8, 3, 3, 3, 3), (2, 3, 4, 4, 4), "conv3d", "conv2d",
                    (8, 3, 9, 3)),
    "conv_transpose1d": (lambda x, w: F.conv_transpose1d(x, w, stride=2), (4, 8, 3), (2, 4, 10), "conv_transpose1d",
                         "conv1d", (4, 8, 1, 3)),
    "conv_transpose2d": (lambda x, w: F.conv_transpose2d(x, w, padding=1), (4, 8, 3, 3), (2, 4, 5, 5), "conv_transpose2d",
                         "conv2d", (4, 8, 3, 3)),
    "conv_transpose3d": (lambda x, w: F.conv_transpose3d(x, w), (4, 8, 2, 2, 2), (2, 4, 3, 3, 3), "conv_transpose3d",
                         "conv2d", (4, 8, 4, 2)),
    "linear": (lambda x, w: F.linear(x, w), (12, 16), (2, 16), "linear", "linear", (12, 16, 1, 1)),
    "linear_of_transpose": (lambda x, w: F.linear(x, w.t()), (16, 12), (2, 16), "linear", "linear", (16, 12, 1, 1)),
    "bmm": (lambda x, w: torch.bmm(x, w), (2, 16, 12), (2, 5, 16), "matmul", "linear", (32, 12, 1, 1)),
    "einsum": (lambda x, w: torch.einsum("bi,io->bo", x, w), (16, 12), (2, 16), "einsum", "linear", (16, 12, 1, 1)),
    "einsum_list": (lambda x, w: torch.einsum("bsi,oi->bso", [x, w]), (12, 16), (2, 5, 16), "einsum", "linear",
                    (12, 16, 1, 1)),
    "embedding": (lambda x, w: F.embedding(x, w), (50, 8), (2, 5), "embedding", "linear", (50, 8, 1, 1)),
}


def _overload_inputs(form: str) -> tuple:
    shape = OVERLOADS[form][2]
    return (torch.randint(0, 50, shape),) if form == "embedding" else (torch.randn(shape),)


@pytest.mark.parametrize("force_export", [False, True], ids=["symbolic_trace", "export"])
@pytest.mark.parametrize("form", list(OVERLOADS))
def test_every_overload_is_found_with_the_multiply_adds_flop_counter_counts(form: str, force_export: bool) -> None:
    torch.manual_seed(0)
    fn, w_shape, _, op, layout, shape = OVERLOADS[form]
    model, x = OneOp(fn, w_shape, force_export), _overload_inputs(form)
    gm = _analyse(model, x)
    assert gm.meta[names.CAPTURE] == ("export" if force_export else "symbolic_trace")
    (info,) = weight_infos(gm)
    assert (info.weight_name, info.op, info.layout, info.shape) == ("w", op, layout, shape)
    assert info.numel == model.w.numel()
    assert info.madd == _flop_madd_per_example(model, x), form
    assert gm.meta[names.DENSE_PARAMS] == []


def test_export_forms_of_the_overloads_are_the_aten_overloads_torch_records() -> None:
    aten = torch.ops.aten
    seen = set()
    for form in OVERLOADS:
        gm = _analyse(OneOp(OVERLOADS[form][0], OVERLOADS[form][1], True), _overload_inputs(form))
        seen |= {n.target for n in gm.graph.nodes if names.WEIGHT in n.meta}
    expected = {aten.conv2d.padding, aten.conv1d.padding, aten.conv3d.default, aten.conv3d.padding,
                aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
                aten.linear.default, aten.bmm.default, aten.einsum.default, aten.embedding.default}
    assert expected <= seen, expected - seen


def test_transposed_convolution_modules_are_sampled_weights() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 4, 3, stride=2), nn.Conv2d(4, 2, 1))
    x = (torch.randn(2, 3, 8, 8),)
    gm = _analyse(model, x)
    infos = {i.weight_name: i for i in weight_infos(gm)}
    assert infos["1.weight"].op == "conv_transpose2d" and infos["1.weight"].shape == (8, 4, 3, 3)
    assert sum(i.madd for i in infos.values()) == _flop_madd_per_example(model, x)


# ------------------------------------------------------------------ weights computed from parameters


class StdConv(nn.Module):
    """Weight standardisation as BiT writes it: batch norm over each output filter of the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8, 3, 3))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, 16, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), padding=1)


def _weight_norm_conv() -> nn.Module:
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 16, 3, padding=1)))


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, memory):
        return self.attn(x, memory, memory)[0]


# model, inputs -> {parameter: (op kinds of the ops that read it, computed?)}, parameters left dense
COMPUTED = {
    "weight_standardisation": (StdConv, (torch.randn(2, 8, 6, 6),), {"weight": ({"conv2d"}, True)}, set()),
    "weight_norm": (_weight_norm_conv, (torch.randn(2, 8, 10),),
                    {"0.parametrizations.weight.original1": ({"conv1d"}, True)},
                    {"0.parametrizations.weight.original0", "0.bias"}),
    "mha_cross": (CrossAttention, (torch.randn(2, 5, 16), torch.randn(2, 7, 16)),
                  {"attn.in_proj_weight": ({"linear"}, True), "attn.out_proj.weight": ({"linear"}, False)},
                  {"attn.in_proj_bias", "attn.out_proj.bias"}),
    "encoder_layer": (lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                      (torch.randn(2, 5, 16),),
                      {"self_attn.in_proj_weight": ({"linear"}, False), "self_attn.out_proj.weight": ({"linear"}, False),
                       "linear1.weight": ({"linear"}, False), "linear2.weight": ({"linear"}, False)},
                      {"self_attn.in_proj_bias", "self_attn.out_proj.bias", "linear1.bias", "linear2.bias",
                       "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"}),
}


@pytest.mark.parametrize("case", list(COMPUTED))
def test_a_weight_computed_from_a_parameter_is_that_parameter(case: str) -> None:
    torch.manual_seed(0)
    build, x, expected, dense = COMPUTED[case]
    gm = _analyse(build().eval(), x)
    found: dict[str, tuple[set, bool]] = {}
    for i in weight_infos(gm):
        ops, computed = found.get(i.weight_name, (set(), False))
        found[i.weight_name] = (ops | {i.op}, computed or bool(i.computed))
    assert found == expected
    assert {d.name for d in gm.meta[names.DENSE_PARAMS]} == dense


def test_cross_attention_reads_two_slices_of_the_packed_projection() -> None:
    gm = _analyse(CrossAttention().eval(), COMPUTED["mha_cross"][1])
    infos = [i for i in weight_infos(gm) if i.weight_name == "attn.in_proj_weight"]
    assert len(infos) == 2 and {i.shape for i in infos} == {(48, 16, 1, 1)}  # the whole (3E, E) parameter
    assert all("split" in i.computed for i in infos)
    # q from 5 query positions (E x E), k and v from 7 memory positions (2E x E) per example
    assert sorted(i.madd for i in infos) == sorted([5 * 16 * 16, 7 * 32 * 16])


class SumOfWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        return F.linear(x, self.a + self.b)


def test_a_weight_computed_from_two_equal_parameters_is_left_dense_rather_than_guessed() -> None:
    gm = _analyse(SumOfWeights(), (torch.randn(2, 16),))
    assert weight_infos(gm) == []
    assert {(d.name, d.reason) for d in gm.meta[names.DENSE_PARAMS]} == {("a", "input of add"), ("b", "input of add")}


class TiedEmbedding(nn.Module):
    def __init__(self, force_export: bool = False) -> None:
        super().__init__()
        self.force_export = force_export
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        if self.force_export:
            B, *_ = ids.shape
        return self.head(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("force_export", [False, True], ids=["symbolic_trace", "export"])
def test_a_tied_embedding_and_head_are_one_weight_read_by_two_ops(force_export: bool) -> None:
    gm = _analyse(TiedEmbedding(force_export), (torch.randint(0, 50, (2, 5)),))
    assert gm.meta[names.CAPTURE] == ("export" if force_export else "symbolic_trace")
    infos = weight_infos(gm)
    assert [(i.weight_name, i.op) for i in infos] == [("embed.weight", "embedding"), ("embed.weight", "linear")]
    assert {i.shape for i in infos} == {(50, 16, 1, 1)} and infos[0].madd == 0
    assert gm.meta[names.DENSE_PARAMS] == []


def test_needs_the_capture_input_specs() -> None:
    gm = nesc.capture(nn.Linear(4, 4), (torch.randn(1, 4),))
    del gm.meta[names.INPUT_SPECS]
    with pytest.raises(nesc.PassOrderError, match="nesc.capture"):
        find_weights(gm)


# ------------------------------------------------------------------ registry models, by hand

# (model, weight) -> (op, shape, MAdd per example) computed by hand from the architecture
REGISTRY_EXPECTED = {
    ("resnet18_cifar", "stem.conv.weight"): ("conv2d", (64, 3, 3, 3), 64 * 32 * 32 * 3 * 9),
    ("resnet18_cifar", "layer2.0.conv1.weight"): ("conv2d", (128, 64, 3, 3), 128 * 16 * 16 * 64 * 9),
    ("resnet18_cifar", "layer4.0.downsample.0.weight"): ("conv2d", (512, 256, 1, 1), 512 * 4 * 4 * 256),
    ("resnet18_cifar", "fc.weight"): ("linear", (10, 512, 1, 1), 10 * 512),
    ("vit_tiny", "blocks.0.attn.qkv.weight"): ("linear", (576, 192, 1, 1), 65 * 576 * 192),
    ("vit_tiny", "patch_embed.weight"): ("conv2d", (192, 3, 4, 4), 192 * 8 * 8 * 3 * 16),
    ("cnn1d", "conv2.0.weight"): ("conv1d", (64, 32, 1, 3), 64 * 20 * 32 * 3),
    ("mlp", "fc1.weight"): ("linear", (512, 784, 1, 1), 512 * 784),
}


@pytest.mark.parametrize("model, weight", list(REGISTRY_EXPECTED))
def test_registry_weights_match_hand_computation(model: str, weight: str) -> None:
    infos = {i.weight_name: i for i in weight_infos(analysed_registry(model))}
    i = infos[weight]
    assert (i.op, i.shape, i.madd) == REGISTRY_EXPECTED[model, weight]


def test_mobilenet_depthwise_convs_are_found() -> None:
    ops = [i.op for i in weight_infos(analysed_registry("mobilenetv2"))]
    assert ops.count("conv2d_dw") == 17 and ops[-1] == "linear"


# -------------------------------------------------------------------- after transform / freeze


def test_refresh_after_transform_and_freeze_reports_sampled_then_frozen_weights() -> None:
    torch.manual_seed(0)
    model = Zoo()
    gm = nesc.transform(model, ZOO_INPUTS, init="random", **COMPRESS_ALL)
    infos = {i.weight_name: i for i in weight_infos(gm)}
    assert set(infos) == set(ZOO_EXPECTED)
    assert {i.state for i in infos.values()} == {"sampled"}
    frozen = nesc.freeze(gm)
    frozen_infos = {i.weight_name: i for i in weight_infos(frozen)}
    assert {i.state for i in frozen_infos.values()} == {"frozen"}
    for name, (op, layout, shape, madd) in ZOO_EXPECTED.items():
        for i in (infos[name], frozen_infos[name]):
            assert (i.op, i.layout, i.shape, i.madd) == (op, layout, shape, madd), (name, i.state)


class PositionEmbedding(nn.Module):
    """A ViT's position embedding: a parameter added to the activations, read by no weight op."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.pos = nn.Parameter(torch.randn(1, 5, 16))

    def forward(self, x):  # (B, 5, 16)
        return self.proj(x + self.pos)


def test_a_parameter_added_to_activations_is_dense_with_that_reason() -> None:
    gm = _analyse(PositionEmbedding(), (torch.randn(2, 5, 16),))
    assert [i.weight_name for i in weight_infos(gm)] == ["proj.weight"]
    reasons = {d.name: d.reason for d in gm.meta[names.DENSE_PARAMS]}
    assert reasons["pos"] == "used with activations by add, not read by a conv, linear, matmul or embedding"
