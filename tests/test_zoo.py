"""A representative part of the zoo (``benchmarks/bench_zoo.py``): public architectures built from
small configs by the zoo's one generic recipe, through transform (ratio 4), a train step, freeze and
save/load, each against the model before it. The fast set covers a text encoder with keyword inputs,
a decoder and a convolutional image model; the heavy ones (encoder-decoder, audio, windowed
attention) also go through ONNX and TVM and are marked slow. torchvision's models (full size, 64x64
images) run where torchvision imports (the torch 2.14 job, ``.ci/torch214``) and skip elsewhere: the
smallest one in the fast set, one per family of the rest marked slow. The whole zoo's results are in
``benchmarks/results/zoo.md``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import nesc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_zoo  # noqa: E402  (benchmarks/ is not a package)


def _imports(name: str) -> str | None:
    """Why ``name`` does not import here, or None (torchvision fails beside torch 2.13's CPU build)."""
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure skips
        return f"{name} does not import: {type(e).__name__}: {e}"
    return None


_NO_HF, _NO_TV = _imports("transformers"), _imports("torchvision")
_hf = pytest.mark.skipif(_NO_HF is not None, reason=str(_NO_HF))
_tv = pytest.mark.skipif(_NO_TV is not None, reason=str(_NO_TV))

FAST = [pytest.param(k, marks=_hf) for k in ("bert", "gpt2", "resnet")] + [pytest.param("tv_squeezenet1_1", marks=_tv)]
SLOW = [pytest.param(k, marks=_hf) for k in ("t5", "whisper", "swin", "wav2vec2", "deberta-v2", "wavlm", "bit")] + [
    pytest.param(f"tv_{k}", marks=_tv) for k in ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
                                                  "vit_b_16", "convnext_tiny", "densenet121", "shufflenet_v2_x0_5",
                                                  "swin_t")]


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


@_hf
def test_small_config_recipe_knows_no_model_names() -> None:
    """The recipe shrinks by attribute name: any config with the usual attributes gets small."""
    import transformers

    config = bench_zoo.small_config(transformers.AutoConfig.for_model("bert"))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 2)
    assert config.vocab_size == bench_zoo.SMALL["vocab_size"]
    stages = bench_zoo.small_config(transformers.AutoConfig.for_model("resnet"))
    assert list(stages.depths) == [1] * len(stages.depths) and list(stages.hidden_sizes[:2]) == [16, 32]


@_tv
def test_torchvision_builds_at_the_zoo_image_size() -> None:
    """A ViT takes ``image_size`` (64: 16 patches of 16), a CNN refuses it and is built without."""
    vit, (x,), _ = bench_zoo.build(_entry("tv_vit_b_16"))
    assert vit.image_size == bench_zoo.TV_SIZE and x.shape == (bench_zoo.BATCH, 3, bench_zoo.TV_SIZE, bench_zoo.TV_SIZE)
    with torch.no_grad():
        assert vit(x).shape == (bench_zoo.BATCH, 10)
    assert {e["key"] for e in bench_zoo.candidates(False, {"tv"})} == {f"tv_{n}" for n in bench_zoo.TV_DEFAULT}


def test_the_reachable_ratio_is_read_from_a_plan_error() -> None:
    assert bench_zoo.reachable("cannot be met: ..., so at most 3.69x is reachable. 18,242 of") == 3.69
    assert bench_zoo.reachable("nothing is left for the pools; ... At most 3.09x is reachable: 8,714,116") == 3.09
    assert bench_zoo.reachable("ratio=4 cannot be met") is None
