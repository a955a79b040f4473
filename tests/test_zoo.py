"""A representative part of the zoo (``benchmarks/bench_zoo.py``): public architectures built from
small configs by the zoo's one generic recipe, through transform (ratio 4), a train step, freeze and
save/load, each against the model before it. The fast set covers a text encoder with keyword inputs,
a decoder and a convolutional image model; the heavy ones (encoder-decoder, audio, windowed
attention) also go through ONNX and TVM and are marked slow. The whole zoo's results are in
``benchmarks/results/zoo.md``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import nesc

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_zoo  # noqa: E402  (benchmarks/ is not a package)

FAST = ["bert", "gpt2", "resnet"]
SLOW = ["t5", "whisper", "swin", "wav2vec2"]


def _entry(key: str) -> dict:
    (entry,) = [e for e in bench_zoo.candidates(False, {key}) if e["key"] == key]
    return entry


def _outputs(module, args, kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        return bench_zoo.leaves(module(*args, **kwargs))


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor], tol: float, what: str) -> None:
    assert len(got) == len(want), what
    assert bench_zoo.rel_diff([g.numpy() for g in got], want) <= tol, what


def _through_core_stages(key: str, tmp_path: Path):
    model, args, kwargs = bench_zoo.build(_entry(key))
    dense = sum(p.numel() for p in model.parameters())
    gm = nesc.transform(model, args, example_kwargs=kwargs, ratio=bench_zoo.RATIO)
    gm.train()
    loss = bench_zoo.leaves(gm(*args, **kwargs))[0].float().pow(2).mean()
    loss.backward()
    torch.optim.SGD(gm.parameters(), lr=1e-3).step()
    assert torch.isfinite(loss)
    frozen = nesc.freeze(gm.eval())
    assert dense / nesc.stored_params(frozen) == pytest.approx(bench_zoo.RATIO, rel=0.02)
    want = _outputs(frozen, args, kwargs)
    _assert_same(_outputs(gm, args, kwargs), want, bench_zoo.FREEZE_TOL, f"{key}: freeze")
    nesc.save(frozen, tmp_path / "m.nesc")
    flat = args + tuple(kwargs.values())
    _assert_same(_outputs(nesc.load(tmp_path / "m.nesc"), flat, {}), want, bench_zoo.FREEZE_TOL, f"{key}: save/load")
    return frozen, flat, want


@pytest.mark.parametrize("key", FAST)
def test_zoo_model_transform_train_freeze_save_load(key: str, tmp_path: Path) -> None:
    _through_core_stages(key, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("key", SLOW)
def test_zoo_model_every_stage(key: str, tmp_path: Path) -> None:
    frozen, flat, want = _through_core_stages(key, tmp_path)
    from nesc.backends.onnx import ort_session

    nesc.export_onnx(frozen, flat, tmp_path / "m.onnx")
    session = ort_session(tmp_path / "m.onnx", threads=1)
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), flat)})
    assert bench_zoo.rel_diff([o for o in got if o.dtype.kind == "f"], want) <= bench_zoo.BACKEND_TOL
    compiled = nesc.compile(frozen, flat)
    got = compiled(*flat)
    got = got if isinstance(got, (tuple, list)) else (got,)
    assert bench_zoo.rel_diff([o for o in got if o.dtype.kind == "f"], want) <= bench_zoo.BACKEND_TOL


def test_small_config_recipe_knows_no_model_names() -> None:
    """The recipe shrinks by attribute name: any config with the usual attributes gets small."""
    config = bench_zoo.small_config(transformers.AutoConfig.for_model("bert"))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 2)
    assert config.vocab_size == bench_zoo.SMALL["vocab_size"]
    stages = bench_zoo.small_config(transformers.AutoConfig.for_model("resnet"))
    assert list(stages.depths) == [1] * len(stages.depths) and list(stages.hidden_sizes[:2]) == [16, 32]
