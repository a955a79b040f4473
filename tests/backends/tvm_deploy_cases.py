"""Compiled registry models shared by the TVM build and runtime tests (compiling takes seconds, so
each (model, target) is built once per test session), and the torch-free run of an export."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import pytest
import torch
from torch import fx, nn

import nesc
from helpers import registry_inputs, transformed_registry

pytest.importorskip("tvm", reason="the TVM backend needs the tvm extra: pip install -e '.[tvm]'")

from nesc.backends.tvm import modes, runtime  # noqa: E402
from nesc.backends.tvm.build import CompiledModel, compile  # noqa: E402

RUNTIME_FILE = Path(runtime.__file__)
# Runs in a fresh interpreter: makes torch unimportable (a device without it), loads runtime.py by
# file path (no nesc package; deploy_schema.py found next to it), runs the model and checks parity
# against the eager output saved by the test. Exit code 0 only if every check passed.
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
    print("ok", y.shape, err, model.regenerate)
""")

# Small registry models: the lowering and the build are the same code for the big ones.
SMALL_MODELS = ("mlp", "cnn1d")


@functools.lru_cache(maxsize=None)
def frozen_registry(name: str) -> tuple[nn.Module, fx.GraphModule]:
    """(dense model in eval mode, frozen epitome model) for a registry model at ratio 4."""
    model, gm = transformed_registry(name)
    return model.eval(), nesc.freeze(gm)


@functools.lru_cache(maxsize=None)
def compiled_registry(name: str, target: str = "llvm", dense: bool = False, dynamic_batch: bool = False,
                      regenerate: str = modes.DEFAULT) -> CompiledModel:
    model, frozen = frozen_registry(name)
    return compile(model if dense else frozen, registry_inputs(name), target, dynamic_batch=dynamic_batch,
                   regenerate=regenerate)


def eager(module: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return module(*inputs)


def run_torch_free(library: Path, inputs: tuple, want, rel: float, timeout: int = 600) -> subprocess.CompletedProcess:
    """``TORCH_FREE_SCRIPT`` on ``library`` with ``inputs[0]`` (saved next to it) against ``want``."""
    x_file, y_file = library.with_suffix(".x.npy"), library.with_suffix(".y.npy")
    np.save(x_file, np.asarray(inputs[0]))
    np.save(y_file, np.asarray(want))
    return subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(RUNTIME_FILE), str(library), str(x_file),
                           str(y_file), str(rel)], capture_output=True, text=True, timeout=timeout)
