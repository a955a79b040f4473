"""nesc.serialize.ops: the allow-list of calls an artifact may make holds every op that capture + freeze
produce for the registry models and for Hugging Face models, and nothing that touches the outside."""

from __future__ import annotations

import pytest
import torch

import nesc
from nesc.models import get_spec, list_models
from nesc.serialize import ops

# Saving re-exports and rebuilds the model: the 224x224 registry models take a minute each here.
FAST = {"mlp", "cnn1d", "resnet_fmnist", "mobilenetv2_fmnist"}


def _calls(gm) -> set[str]:
    return {ops.packet_name(n.target) if hasattr(n.target, "_schema") else ops.PY_NAMES[id(n.target)]
            for n in gm.graph.nodes if n.op == "call_function"}


def _round_trip(model, inputs, tmp_path, **config):
    """(the frozen model, its artifact loaded back)."""
    frozen = nesc.freeze(nesc.transform(model.eval(), inputs, init="random", **config))
    nesc.save(frozen, tmp_path / "m.nesc")
    return frozen, nesc.load(tmp_path / "m.nesc")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in list_models()])
def test_every_registry_models_artifact_stays_inside_the_allow_list(name, tmp_path) -> None:
    spec = get_spec(name)
    torch.manual_seed(0)
    _, loaded = _round_trip(spec.create(), spec.example_inputs(2, test=True), tmp_path)
    calls = _calls(loaded)
    assert "nesc::regenerate" in calls
    assert {c for c in calls if "::" in c} <= ops.ALLOWED_OPS


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_hugging_face_artifacts_stay_inside_the_allow_list(family, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, num_labels=3))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=16, use_cache=False))
    ids = torch.randint(0, 100, (2, 8))
    _, loaded = _round_trip(model, (ids,), tmp_path, ratio=2, min_params=500)
    assert {c for c in _calls(loaded) if "::" in c} <= ops.ALLOWED_OPS


@pytest.mark.parametrize("text", ["aten::from_file.default", "aten::save.default", "aten::_foreach_add_.List",
                                  "aten::manual_seed.default", "aten::add.out", "aten::empty.memory_format",
                                  "aten::as_strided.default", "prim::device.default", "math.factorial",
                                  "operator.attrgetter", "builtins.eval", "os.system"])
def test_calls_outside_the_allow_list_do_not_resolve(text) -> None:
    with pytest.raises(LookupError):
        ops.resolve(text)


def test_in_place_ops_are_a_named_subset() -> None:
    assert ops.INPLACE_OPS <= ops.ALLOWED_OPS
    assert all(name.endswith("_") for name in ops.INPLACE_OPS)
    assert ops.resolve("aten::relu_.default") is torch.ops.aten.relu_.default


class _AxisShuffles(torch.nn.Module):
    """Window partitions written with swapaxes / movedim / mT (torchvision's MaxViT uses swapaxes)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.swapaxes(self.proj(x), 1, 2)  # (B, 32, L)
        h = torch.movedim(h, 1, -1).mT  # back to (B, 32, L)
        return h.flatten(1)


def test_axis_shuffles_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 32),)
    frozen, loaded = _round_trip(_AxisShuffles(), x, tmp_path, ratio=2, min_params=16, keep_classifier=False)
    assert {"aten::swapaxes", "aten::movedim"} <= _calls(loaded)
    torch.testing.assert_close(loaded(*x), frozen(*x), rtol=0, atol=0)


class _FourierMixing(torch.nn.Module):
    """FNet's token mixing: the real part of a 2-D FFT between two sampled linears."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.fft.fftn(self.proj(x), dim=(-2, -1)).real.mean(1))


def test_fourier_mixing_saves_and_loads(tmp_path) -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 6, 32),)
    frozen, loaded = _round_trip(_FourierMixing(), x, tmp_path, ratio=2, min_params=16, keep_classifier=False)
    torch.testing.assert_close(loaded(*x), frozen(*x), rtol=0, atol=0)
