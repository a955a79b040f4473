"""runtime.py: an exported model runs in a fresh process with tvm and numpy only (torch cannot even be
imported there), with parity; broken or mismatched files are refused with a clear error."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import nesc
from helpers import BACKEND_REL, assert_backend_close, registry_inputs
from product_cases import products_registry
from tvm_deploy_cases import compiled_registry, eager, frozen_registry

from nesc.backends.tvm import runtime

RUNTIME_FILE = Path(runtime.__file__)

# Runs in a fresh interpreter: makes torch unimportable (a device without it), loads runtime.py by
# file path (no nesc package), runs the model and checks parity against the eager output saved by
# the test. Exit code 0 only if every check passed.
TORCH_FREE_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("no torch on this device", name=name)
    sys.meta_path.insert(0, NoTorch())
    runtime_file, library, x_file, y_file, rel = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("nesc_tvm_runtime", runtime_file)
    rt = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    import numpy as np
    model = rt.load(library)
    y, want = model(np.load(x_file)), np.load(y_file)
    assert y.shape == want.shape, (y.shape, want.shape)
    err, scale = float(np.abs(y - want).max()), float(np.abs(want).max())
    assert err <= float(rel) * scale, f"max abs error {err} > {rel} x {scale}"
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "nesc"))
    assert not loaded, loaded
    print("ok", y.shape, err)
""")


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
    x, y, _ = _reference(tmp_path, batch=3)
    done = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(RUNTIME_FILE), str(exported), str(x), str(y),
                           str(BACKEND_REL)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok (3, 10)")


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
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    np.save(tmp_path / "y.npy", eager(frozen, inputs).numpy())
    done = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(RUNTIME_FILE), str(library),
                           str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), str(BACKEND_REL)],
                          capture_output=True, text=True, timeout=600)
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
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    np.save(tmp_path / "y.npy", eager(frozen, inputs).numpy())
    done = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(RUNTIME_FILE), str(library),
                           str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), str(BACKEND_REL)],
                          capture_output=True, text=True, timeout=600)
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
    with pytest.raises(runtime.DeployError, match="is not a nesc-tvm v2 parameters file"):
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
