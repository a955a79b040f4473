"""runtime.py: an exported model runs in a fresh process with tvm and numpy only (torch cannot even be
imported there), with parity; broken or mismatched files are refused with a clear error."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import nesc
from helpers import BACKEND_REL, assert_backend_close, registry_inputs
from product_cases import products_registry
from tvm_deploy_cases import RUNTIME_FILE, compiled_registry, eager, frozen_registry, run_torch_free

from nesc.backends.tvm import runtime

@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cnn1d compiled for this CPU and exported: (folder with cnn1d.so + cnn1d.params.safetensors)."""
    folder = tmp_path_factory.mktemp("deployed")
    compiled_registry("cnn1d", dynamic_batch=True).export_library(folder / "cnn1d.so")
    return folder / "cnn1d.so"


def _reference(tmp_path: Path, batch: int) -> tuple[Path, Path, np.ndarray]:
    _, frozen = frozen_registry("cnn1d")
    inputs = registry_inputs("cnn1d", batch)
    want = eager(frozen, inputs).numpy()
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    np.save(tmp_path / "y.npy", want)
    return tmp_path / "x.npy", tmp_path / "y.npy", want


def test_runs_in_a_process_without_torch(exported: Path, tmp_path: Path) -> None:
    _, frozen = frozen_registry("cnn1d")
    inputs = registry_inputs("cnn1d", 3)
    library = tmp_path / "cnn1d.so"
    shutil.copy(exported, library)
    shutil.copy(runtime.params_path(exported), runtime.params_path(library))
    done = run_torch_free(library, inputs, eager(frozen, inputs), BACKEND_REL, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok (3, 10)")


def test_a_copy_of_the_runtime_needs_its_schema_next_to_it(exported: Path, tmp_path: Path) -> None:
    """On a device: runtime.py and deploy_schema.py side by side run the model; runtime.py alone says
    which file is missing."""
    shutil.copy(RUNTIME_FILE, tmp_path / "runtime.py")
    done = subprocess.run([sys.executable, str(tmp_path / "runtime.py"), str(exported)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "needs deploy_schema.py next to runtime.py" in done.stderr
    shutil.copy(RUNTIME_FILE.with_name("deploy_schema.py"), tmp_path / "deploy_schema.py")
    done = subprocess.run([sys.executable, str(tmp_path / "runtime.py"), str(exported)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "output 1x10 float32" in done.stdout, done.stderr[-3000:]


# The deployment bar: these registry models, compiled and exported, run torch-free with parity.
DEPLOYED_MODELS = ("mlp", "cnn1d", "mobilenetv2", "resnet18", "efficientnet_b0")
FAST_DEPLOYED = ("mlp", "cnn1d")  # the big three compile for minutes: slow-marked, same code path


@pytest.mark.parametrize(
    "name", [n if n in FAST_DEPLOYED else pytest.param(n, marks=pytest.mark.slow) for n in DEPLOYED_MODELS]
)
def test_registry_model_deploys_and_runs_without_torch(name: str, tmp_path: Path) -> None:
    _, frozen = frozen_registry(name)
    inputs = registry_inputs(name, 1)  # static batch 1: an edge deployment
    library = tmp_path / f"{name}.so"
    nesc.compile(frozen, inputs).export_library(library)
    done = run_torch_free(library, inputs, eager(frozen, inputs), BACKEND_REL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok (1, ")


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])  # products along dim -1 (with the bias) and dim 1
def test_product_map_model_deploys_and_runs_without_torch(name: str, tmp_path: Path) -> None:
    _, frozen = products_registry(name)
    inputs = registry_inputs(name, 3)
    library = tmp_path / f"{name}.so"
    compiled = nesc.compile(frozen, inputs, dynamic_batch=True)
    assert {r["role"] for r in compiled.routes.values()} >= {"product_starts", "product_fracs"}
    compiled.export_library(library)
    done = run_torch_free(library, inputs, eager(frozen, inputs), BACKEND_REL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok (3, ")


def test_command_line_runs_the_model(exported: Path, tmp_path: Path) -> None:
    x, _, want = _reference(tmp_path, batch=2)
    out = tmp_path / "out.npy"
    done = subprocess.run([sys.executable, str(RUNTIME_FILE), str(exported), "--input", str(x), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "output 2x10 float32" in done.stdout
    assert_backend_close(np.load(out), torch.from_numpy(want), "runtime.py --output")


def test_load_in_process(exported: Path) -> None:
    model = runtime.load(exported)
    _, frozen = frozen_registry("cnn1d")
    inputs = registry_inputs("cnn1d", 4)
    assert_backend_close(model(inputs[0].numpy()), eager(frozen, inputs), "runtime.load")
    assert model.kinds == compiled_registry("cnn1d", dynamic_batch=True).kinds
    assert model.param_bytes == compiled_registry("cnn1d", dynamic_batch=True).param_bytes
    assert model.artifact_bytes == exported.stat().st_size + runtime.params_path(exported).stat().st_size


def test_missing_parameters_file_is_explained(exported: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "cnn1d.so"
    shutil.copy(exported, lonely)
    with pytest.raises(runtime.DeployError, match=r"parameters file .*cnn1d\.params\.safetensors.* not found"):
        runtime.load(lonely)


def test_library_from_another_build_is_refused(exported: Path, tmp_path: Path) -> None:
    other = tmp_path / "cnn1d.so"
    other.write_bytes(exported.read_bytes() + b"\0")  # any other build: its hash differs
    shutil.copy(runtime.params_path(exported), runtime.params_path(other))
    with pytest.raises(runtime.DeployError, match="written for another build"):
        runtime.load(other)


def test_foreign_safetensors_file_is_refused(exported: Path, tmp_path: Path) -> None:
    library = tmp_path / "cnn1d.so"
    shutil.copy(exported, library)
    save_file({"w": np.zeros(3, np.float32)}, str(runtime.params_path(library)))
    with pytest.raises(runtime.DeployError, match="is not a nesc-tvm v3 parameters file"):
        runtime.load(library)


def test_errors_are_nesc_errors_inside_nesc() -> None:
    assert issubclass(runtime.DeployError, nesc.NescError)


def test_command_line_error_exits_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(RUNTIME_FILE), str(tmp_path / "none.so")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("error: compiled library") and "Traceback" not in done.stderr


def test_command_line_output_never_replaces_a_file(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.npy"
    out.write_bytes(b"keep me")
    done = subprocess.run([sys.executable, str(RUNTIME_FILE), str(exported), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "File exists" in done.stderr and "Traceback" not in done.stderr
    assert out.read_bytes() == b"keep me"
    for content in (b"not an array", b""):  # garbage, and an empty file (numpy raises EOFError)
        bad = tmp_path / "x.npy"
        bad.write_bytes(content)
        done = subprocess.run([sys.executable, str(RUNTIME_FILE), str(exported), "--input", str(bad)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
