"""nesc.compile and CompiledModel: parity with eager PyTorch, what the parameters are, exported files,
the target table (host, aarch64 cross build, CUDA source), tuning configuration and its cache, and the
``nesc compile`` command line."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nesc
from helpers import assert_backend_close, registry_inputs, sampled_weights
from tvm_deploy_cases import SMALL_MODELS, compiled_registry, eager, frozen_registry

from nesc.backends.tvm import runtime, targets, tune
from nesc.backends.tvm.adapter import host_target
from nesc.backends.tvm.build import compile
from nesc.cli import USAGE_ERROR, main
from nesc.core import names
from nesc.core.config import NESConfig
from nesc.core.errors import ConfigError, NescError
from nesc.passes.reuse import fold_channels

EM_AARCH64 = 183  # ELF e_machine of 64-bit ARM


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_compiled_matches_frozen_model(name: str) -> None:
    _, frozen = frozen_registry(name)
    inputs = registry_inputs(name)
    assert_backend_close(compiled_registry(name)(*inputs), eager(frozen, inputs), name)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_dynamic_batch_build_runs_every_batch_size(name: str) -> None:
    _, frozen = frozen_registry(name)
    compiled = compiled_registry(name, dynamic_batch=True)
    assert compiled.input_specs[0].shape[0] is None
    for batch in (2, 1, 5):
        inputs = registry_inputs(name, batch)
        assert_backend_close(compiled(*inputs), eager(frozen, inputs), f"{name} batch {batch}")


class _Fold(nn.Module):
    def forward(self, x):
        return fold_channels(x, 31, -1)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_reduction_with_one_vector_lane_compiles_exactly(batch: int) -> None:
    # A 31-wide output (no divisor 2..16) at batch 1 leaves the tile loops as the epilogue's only
    # loops; vectorising one of them made TVM sum serially reduced values wrongly (every output 93x).
    x = torch.randn(batch, 62)
    assert_backend_close(compile(_Fold(), (x,))(x), eager(_Fold(), (x,)), f"fold batch {batch}")


@pytest.mark.parametrize("batch", [1, 2])
def test_folded_reuse_model_compiles_with_parity(batch: int) -> None:
    # passes.reuse rewrites the frozen graph (a channel fold before narrower convs and linears).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(24 * 16, 37)).eval()
    x = torch.randn(batch, 16, 4, 4)
    frozen = nesc.freeze(nesc.transform(model, (x,), NESConfig(ratio=4, reuse=True, init="random", min_params=0,
                                                                keep_first=False, keep_classifier=False)))
    assert any(v.startswith("folded") for v in frozen.meta[names.REUSE].values()), frozen.meta[names.REUSE]
    assert_backend_close(compile(frozen, (x,))(x), eager(frozen, (x,)), f"reuse batch {batch}")


def test_static_build_refuses_another_batch_size() -> None:
    compiled = compiled_registry("mlp")  # built for registry_inputs' batch
    batch = compiled.input_specs[0].shape[0]
    assert isinstance(batch, int)
    with pytest.raises(NescError, match="rebuild with matching example inputs"):
        compiled(*registry_inputs("mlp", batch + 1))


def test_tuning_needs_a_static_batch() -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        compile(nn.Linear(2, 2), (torch.randn(1, 2),), tune=1, dynamic_batch=True)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_compiled_dense_model_matches_eager(name: str) -> None:
    model, _ = frozen_registry(name)
    inputs = registry_inputs(name)
    assert_backend_close(compiled_registry(name, dense=True)(*inputs), eager(model, inputs), f"dense {name}")


def test_numpy_and_torch_inputs_give_the_same_output() -> None:
    compiled = compiled_registry("mlp")
    (x,) = registry_inputs("mlp", 2)
    np.testing.assert_array_equal(compiled(x), compiled(x.numpy()))


# ------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_parameters_are_pools_routes_and_dense_leftovers(name: str) -> None:
    """The compiled model's parameters are the frozen model's pools and routing maps, exactly, plus at
    most what stayed dense (with batch-norm statistics, which ``stored_bytes`` leaves out; a lowering
    may fold or drop some of it); no regenerated weight is among them."""
    _, frozen = frozen_registry(name)
    compiled = compiled_registry(name)
    by_kind = compiled.bytes_by_kind()
    pools = sum(p.numel() * p.element_size() for n, p in frozen.named_parameters() if n.startswith("nesc_pool"))
    # the gains (``scale``, one float64 per layer) are compiled in as constants, not parameters
    routes = sum(b.numel() * b.element_size() for n, b in frozen.get_submodule("nesc_routes").named_buffers()
                 if not n.endswith("scale"))
    assert by_kind["pool"] == pools > 0
    assert by_kind["route"] == routes > 0
    statistics = sum(b.numel() * b.element_size() for n, b in frozen.named_buffers() if not n.startswith("nesc_routes"))
    assert by_kind["dense"] <= nesc.stored_bytes(frozen) - pools - routes + statistics
    for weight in sampled_weights(frozen):
        assert weight not in compiled.params, f"regenerated weight {weight} is a parameter of the compiled model"


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_epitome_model_stores_less_than_dense(name: str) -> None:
    epitome, dense = compiled_registry(name), compiled_registry(name, dense=True)
    assert set(dense.kinds.values()) == {"dense"}
    assert epitome.param_bytes < dense.param_bytes / 2  # ratio 4, minus what stayed dense


# ----------------------------------------------------------------------------------------- export


def test_export_writes_library_and_safetensors_parameters(tmp_path: Path) -> None:
    compiled = compiled_registry("cnn1d")
    files = compiled.export_library(tmp_path / "cnn1d.so")
    assert files.library.read_bytes()[:4] == b"\x7fELF"
    params, meta = runtime.read_params(files.library)
    assert list(params) == list(compiled.params)
    for name, a in compiled.params.items():
        np.testing.assert_array_equal(params[name], a)
    assert meta["kinds"] == compiled.kinds
    assert meta["target"]["name"] == "llvm" and '"kind":"llvm"' in meta["target"]["tvm"]
    assert files.params_bytes < compiled.param_bytes + 64 * 1024  # the arrays plus a JSON header
    assert files.total_bytes == files.library_bytes + files.params_bytes


def test_export_rejects_a_path_that_is_not_a_shared_library(tmp_path: Path) -> None:
    with pytest.raises(nesc.InputError, match=r"must end in \.so"):
        compiled_registry("mlp").export_library(tmp_path / "model.tar")
    with pytest.raises(nesc.InputError, match="does not exist"):
        compiled_registry("mlp").export_library(tmp_path / "missing" / "model.so")


@pytest.mark.parametrize(
    "inputs, message",
    [
        ((), r"takes 1 input\(s\) \(\w+\); got 0"),
        ((np.zeros((2, 1, 28, 28), np.float64),), "dtype float64, expected float32"),
        ((np.zeros((2, 28, 28), np.float32),), r"shape 2x28x28, expected 2x1x28x28"),
    ],
)
def test_bad_inputs_are_rejected(inputs: tuple, message: str) -> None:
    with pytest.raises(nesc.NescError, match=message):
        compiled_registry("mlp")(*inputs)


def test_bad_example_inputs_are_rejected() -> None:
    with pytest.raises(nesc.InputError, match=r"nesc.compile: example_inputs\[0\] is a ndarray, expected a torch.Tensor"):
        compile(nn.Linear(2, 2), (np.zeros((1, 2)),))
    with pytest.raises(nesc.InputError, match="example input 0 must be a torch.Tensor with a batch dimension"):
        compile(nn.Linear(2, 2), (torch.tensor(1.0),))


# ---------------------------------------------------------------------------------------- targets


def test_unknown_target_lists_the_valid_ones() -> None:
    with pytest.raises(targets.TargetError, match=r"unknown target 'arm'.*aarch64.*cuda.*llvm") as info:
        compile(nn.Linear(2, 2), (torch.randn(1, 2),), target="arm")
    assert isinstance(info.value, nesc.NescError)


def test_target_table_builds_dict_targets() -> None:
    assert targets.get_target("llvm").tvm_target().kind.name == "llvm"
    # the llvm row is the host target the lowering tests build for (one definition, in the adapter)
    assert compiled_registry("mlp").tvm_target == str(host_target()) == str(targets.get_target("llvm").tvm_target())
    assert "aarch64" in str(targets.get_target("aarch64").tvm_target())
    assert targets.get_target("cuda").tvm_target().kind.name == "cuda"


@pytest.mark.skipif(shutil.which(targets.AARCH64_GCC) is None,
                    reason="needs Debian's gcc-aarch64-linux-gnu (apt-get install gcc-aarch64-linux-gnu)")
def test_aarch64_cross_build_is_an_arm64_elf(tmp_path: Path) -> None:
    compiled = compiled_registry("cnn1d", "aarch64")
    files = compiled.export_library(tmp_path / "cnn1d-arm64.so")
    header = files.library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2 and header[5] == 1  # 64-bit, little endian
    assert struct.unpack_from("<H", header, 18)[0] == EM_AARCH64
    assert files.params.is_file()
    with pytest.raises(targets.TargetError, match="cannot run on this machine"):
        compiled(*registry_inputs("cnn1d"))


def test_cuda_build_emits_cuda_kernels() -> None:
    """What can be checked without a GPU: TVM generates CUDA C for every kernel of the model."""
    compiled = compiled_registry("mlp", "cuda")
    source = compiled.cuda_source()
    assert source.count("__global__") >= 3  # at least the regeneration and the matrix products
    assert 'extern "C" __global__' in source
    if not targets.get_target("cuda").runs_here():
        with pytest.raises(targets.TargetError, match="cannot run on this machine"):
            compiled(*registry_inputs("mlp"))
    else:  # pragma: no cover - only where a GPU is present
        _, frozen = frozen_registry("mlp")
        inputs = registry_inputs("mlp")
        assert_backend_close(compiled(*inputs), eager(frozen, inputs), "mlp on CUDA")


# ----------------------------------------------------------------------------------------- tuning


@pytest.mark.parametrize("tune_arg, expected", [
    (None, None), (64, tune.TuneConfig(trials=64)), ("64", tune.TuneConfig(trials=64)),
    ("90s", tune.TuneConfig(seconds=90.0)), (tune.TuneConfig(seconds=5), tune.TuneConfig(seconds=5)),
])
def test_tune_argument_forms(tune_arg, expected) -> None:
    assert tune.as_tune_config(tune_arg) == expected


@pytest.mark.parametrize("bad", [0, -3, True, "fast", 2.5, tune.TuneConfig])
def test_bad_tune_arguments_are_rejected(bad) -> None:
    with pytest.raises(nesc.ConfigError, match="tune must be|trials must be"):
        tune.as_tune_config(bad)


def test_tune_config_needs_exactly_one_budget() -> None:
    with pytest.raises(nesc.ConfigError, match="exactly one"):
        tune.TuneConfig(trials=4, seconds=10)
    with pytest.raises(nesc.ConfigError, match="exactly one"):
        tune.TuneConfig()


def _tiny_mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), (torch.randn(2, 16),)


def test_kernels_in_the_cache_are_not_tuned_again(tmp_path: Path) -> None:
    """The cache lookup without a tuning run: the database already knows every kernel of the model
    (as after an earlier compile), so compiling with a budget runs no trial and still builds."""
    from nesc.backends.tvm.adapter import relax, s_tir
    from nesc.backends.tvm.lower import lower

    model, inputs = _tiny_mlp()
    target = targets.get_target("llvm").tvm_target()
    with target:
        fused = relax.get_pipeline("zero")(lower(model, inputs, dynamic_batch=False).mod)
    database = tune._database(tune.cache_folder(tmp_path, target))
    for task in s_tir.meta_schedule.relax_integration.extract_tasks(fused, target):
        database.commit_workload(task.dispatched[0])
    compiled = compile(model, inputs, tune=8, cache_dir=tmp_path)
    assert compiled.tuning.trials == 0 and compiled.tuning.tuned == []
    assert compiled.tuning.reused and set(compiled.tuning.reused) <= set(compiled.tuning.kernels)
    assert compiled.input_specs[0].shape == (2, 16)  # tuned builds have a static batch
    assert_backend_close(compiled(*inputs), eager(model, inputs), "compiled from the cache")


@pytest.mark.slow
def test_tuning_is_cached_and_reused(tmp_path: Path) -> None:
    """A real MetaSchedule run (one trial: minutes on a busy 2-core machine), then a second compile
    of the same model that finds every kernel in the cache and runs no trial."""
    model, inputs = _tiny_mlp()
    first = compile(model, inputs, tune=1, cache_dir=tmp_path)
    assert first.tuning.tuned and first.tuning.trials >= 1 and not first.tuning.reused
    assert first.input_specs[0].shape == (2, 16)  # tuned builds have a static batch
    second = compile(model, inputs, tune=1, cache_dir=tmp_path)
    assert second.tuning.tuned == [] and second.tuning.trials == 0
    assert sorted(second.tuning.reused) == sorted(first.tuning.tuned)
    assert_backend_close(second(*inputs), eager(model, inputs), "tuned model")


# ------------------------------------------------------------------------------------ command line


@pytest.fixture()
def _pipe_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)


def test_cli_compile_registry_model(tmp_path: Path, capsys: pytest.CaptureFixture, _pipe_width) -> None:
    out_path = tmp_path / "cnn1d.so"
    code = main(["compile", "cnn1d", "-o", str(out_path), "--input-size", "1", "48", "--compare-dense",
                 "--dynamic-batch"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out_path.is_file() and runtime.params_path(out_path).is_file()
    assert "dense float32" in out and "smaller" in out and "the dense model built the same way" in out
    deployed = runtime.load(out_path)
    x = np.random.default_rng(0).standard_normal((3, 1, 48)).astype(np.float32)
    assert deployed(x).shape == (3, 10)


def test_cli_compile_saved_artifact(tmp_path: Path, capsys: pytest.CaptureFixture, _pipe_width) -> None:
    _, frozen = frozen_registry("mlp")
    artifact = tmp_path / "mlp.nesc"
    nesc.save(frozen, artifact)
    code = main(["compile", str(artifact), "-o", str(tmp_path / "mlp.so"), "--batch", "4"])
    _, err = capsys.readouterr()
    assert code == 0, err
    inputs = registry_inputs("mlp", 4)
    deployed = runtime.load(tmp_path / "mlp.so")
    assert_backend_close(deployed(*inputs), eager(frozen, inputs), "mlp from its .nesc artifact")


@pytest.mark.parametrize("argv, message", [
    (["compile", "mlp", "-o", "x.so", "--target", "arm"], "unknown target 'arm'"),
    (["compile", "mlpp", "-o", "x.so"], "did you mean 'mlp'"),
    (["compile", "mlp", "-o", "x.so", "--tune", "soon"], "tune must be"),
    (["compile", "mlp", "-o", "x.so", "--batch", "0"], "--batch must be"),
    (["compile", "mlp", "-o", "x.txt"], "must end in .so"),
    (["compile", "saved.nesc", "-o", "x.so", "--compare-dense"], "--compare-dense needs a registry model"),
])
def test_cli_compile_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture, _pipe_width) -> None:
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == USAGE_ERROR
    assert err.startswith("error: ") and message in err and "Traceback" not in err
