"""``regenerate="once"`` and ``"per_call"`` (``backends/tvm/modes.py``): both modes match eager PyTorch on
registry models (product maps included), in process and deployed torch-free; a once build's ``main`` is
the dense model's graph and its ``regenerate`` function holds every regenerate kernel; the files are
the same size; the header's regeneration entry is checked like every other; the option is validated
in ``nesc.compile`` and on the command line."""

from __future__ import annotations

import inspect
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fuzz_helpers as fz
import nesc
from helpers import BACKEND_REL, assert_backend_close, registry_inputs
from product_cases import products_registry
from tvm_deploy_cases import compiled_registry, eager, frozen_registry, run_torch_free

from nesc.backends.tvm import build, modes, runtime
from nesc.backends.tvm.adapter import host_target, relax, tuple_length, tvm, var_shape
from nesc.backends.tvm.deploy_schema import PRODUCT_ROLES
from nesc.backends.tvm.kernels import REGENERATE_NAME
from nesc.backends.tvm.lower import lower
from nesc.cli import USAGE_ERROR, main
from nesc.core.errors import ConfigError

# A linear net, conv1d, and a conv2d net with batch norm and residual adds.
MODE_MODELS = ("mlp", "cnn1d", "resnet_fmnist")


def _kernels(func) -> list[str]:
    """The PrimFuncs a Relax function calls (``call_tir``), in order."""
    call_tir, found = tvm.ir.Op.get("relax.call_tir"), []

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            found.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(func, visit)
    return found


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("regenerate", modes.MODES)
@pytest.mark.parametrize("name", MODE_MODELS)
def test_both_modes_match_eager(name: str, regenerate: str) -> None:
    _, frozen = frozen_registry(name)
    inputs = registry_inputs(name)
    compiled = compiled_registry(name, regenerate=regenerate)
    assert compiled.regenerate == regenerate
    lifted = compiled.facts["regenerate"]["params"]
    assert (regenerate == "once") == bool(lifted)
    for call in ("first", "second"):  # a once build regenerates in its first call, then reads the workspace
        assert_backend_close(compiled(*inputs), eager(frozen, inputs), f"{name} {regenerate}, {call} call")


@pytest.mark.parametrize("name", ["mlp", "resnet_fmnist"])  # products along dim -1 (bias in the gather), dim 1
def test_product_maps_stay_inputs_of_main(name: str) -> None:
    """A product map reads the layer's products (computed from the input): its routing map is not
    lifted; the pools and the regenerate routing maps are."""
    _, frozen = products_registry(name)
    compiled = nesc.compile(frozen, registry_inputs(name, 3), dynamic_batch=True, regenerate="once")
    lifted = set(compiled.facts["regenerate"]["params"])
    product_maps = {n for n, r in compiled.routes.items() if r["role"] in PRODUCT_ROLES}
    assert product_maps and not product_maps & lifted
    assert {n for n, kind in compiled.kinds.items() if kind == "pool"} <= lifted
    for batch in (3, 1):
        inputs = registry_inputs(name, batch)
        assert_backend_close(compiled(*inputs), eager(frozen, inputs), f"{name} with product maps, batch {batch}")


# ---------------------------------------------------------------------------------------- structure


def test_a_once_build_lifts_every_regenerate_kernel_and_keeps_the_dense_graph() -> None:
    model, frozen = frozen_registry("mlp")
    inputs = registry_inputs("mlp")
    low, dense = lower(frozen, inputs, dynamic_batch=False), lower(model, inputs, dynamic_batch=False)
    lifted = modes.liftable(low.params, low.kinds, low.routes)
    assert set(lifted) == {n for n, kind in low.kinds.items() if kind in ("pool", "route")}
    mod = modes.lift(low.mod, list(low.params), lifted, host_target())
    regenerate, main_ = mod[runtime.REGENERATE], mod["main"]
    assert [k for k in _kernels(regenerate) if k.startswith(REGENERATE_NAME)] == _kernels(regenerate)
    assert len(_kernels(regenerate)) == len(_kernels(low.mod["main"])) == 2  # the MLP's two sampled layers
    assert not [k for k in _kernels(main_) if k.startswith(REGENERATE_NAME)]
    # main takes what the dense model's main takes: the same tensors, the weights in their dense layout
    assert Counter(var_shape(v) for v in main_.params) == Counter(var_shape(v) for v in dense.mod["main"].params)
    assert len(regenerate.params) == 1 and tuple_length(regenerate.params[0]) == len(lifted)
    assert tuple_length(regenerate) == 2  # it returns the two weights


def test_nothing_is_lifted_from_a_dense_model_or_per_call() -> None:
    model, _ = frozen_registry("mlp")
    low = lower(model, registry_inputs("mlp"), dynamic_batch=False)
    assert modes.liftable(low.params, low.kinds, low.routes) == []
    assert modes.lift(low.mod, list(low.params), [], host_target()) is low.mod
    dense = compiled_registry("mlp", dense=True, regenerate="once")
    assert dense.facts["regenerate"] == {"mode": "once", "params": []}
    assert_backend_close(dense(*registry_inputs("mlp")), eager(model, registry_inputs("mlp")), "dense, once")


def test_a_once_build_tunes_the_kernels_of_both_functions(tmp_path: Path) -> None:
    """tune= on a once build: MetaSchedule sees the lifted module (here every kernel is in the cache
    already, so no trial runs) and the build still matches eager."""
    from nesc.backends.tvm import tune
    from nesc.backends.tvm.adapter import s_tir

    _, frozen = frozen_registry("mlp")
    inputs = registry_inputs("mlp")
    target = host_target()
    low = lower(frozen, inputs, dynamic_batch=False)
    lifted = modes.lift(low.mod, list(low.params), modes.liftable(low.params, low.kinds, low.routes), target)
    with target:
        fused = relax.get_pipeline("zero")(lifted)
    database = tune._database(tune.cache_folder(tmp_path, target))
    for task in s_tir.meta_schedule.relax_integration.extract_tasks(fused, target):
        database.commit_workload(task.dispatched[0])
    compiled = build.compile(frozen, inputs, tune=8, cache_dir=tmp_path, regenerate="once")
    assert compiled.tuning.trials == 0 and compiled.tuning.reused
    assert any(k.startswith(REGENERATE_NAME) for k in compiled.tuning.kernels)
    assert_backend_close(compiled(*inputs), eager(frozen, inputs), "tuned once build")


def test_both_modes_deploy_the_same_tensors() -> None:
    once, per_call = compiled_registry("cnn1d", regenerate="once"), compiled_registry("cnn1d", regenerate="per_call")
    assert list(once.params) == list(per_call.params) and once.param_bytes == per_call.param_bytes
    assert once.bytes_by_kind() == per_call.bytes_by_kind()


# ------------------------------------------------------------------------------------------- deploy


@pytest.mark.parametrize("regenerate", modes.MODES)
def test_deploys_and_runs_without_torch(regenerate: str, tmp_path: Path) -> None:
    _, frozen = frozen_registry("cnn1d")
    inputs = registry_inputs("cnn1d")
    files = compiled_registry("cnn1d", regenerate=regenerate).export_library(tmp_path / "cnn1d.so")
    done = run_torch_free(files.library, inputs, eager(frozen, inputs), BACKEND_REL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == regenerate
    deployed = runtime.load(files.library)
    assert deployed.regenerate == regenerate
    assert_backend_close(deployed(*inputs), eager(frozen, inputs), f"runtime.load, {regenerate}")


def test_a_once_build_with_product_maps_deploys_without_torch(tmp_path: Path) -> None:
    _, frozen = products_registry("mlp")
    inputs = registry_inputs("mlp", 3)
    library = tmp_path / "mlp.so"
    nesc.compile(frozen, inputs, regenerate="once").export_library(library)
    done = run_torch_free(library, inputs, eager(frozen, inputs), BACKEND_REL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok (3, 10)") and done.stdout.split()[-1] == "once"


def test_the_files_are_as_small_in_both_modes(tmp_path: Path) -> None:
    sizes = {mode: compiled_registry("cnn1d", regenerate=mode).export_library(tmp_path / f"{mode}.so").params_bytes
             for mode in modes.MODES}
    assert abs(sizes["once"] - sizes["per_call"]) < 2048  # the header lists what regenerate takes; no weight


@pytest.fixture(scope="module")
def once_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    library = tmp_path_factory.mktemp("once") / "cnn1d.so"
    compiled_registry("cnn1d", regenerate="once").export_library(library)
    return library


def _edited(once_export: Path, folder: Path, key: str, value: str) -> Path:
    """A copy of the export whose header entry ``key`` is ``value``, its content hash recomputed."""
    library = folder / "edited.so"
    shutil.copy(once_export, library)
    data = fz.set_metadata(runtime.params_path(once_export).read_bytes(), key, value)
    header, params = fz.metadata(data), runtime.read_params(once_export)[0]
    runtime.params_path(library).write_bytes(
        fz.set_metadata(data, "content_sha256", runtime.content_sha256(header, params)))
    return library


def _dense_name(header: dict) -> str:
    return next(n for n, kind in json.loads(header["kinds"]).items() if kind == "dense")


# An edit of a once build's {"mode", "params"} -> what the refusal says.
REGENERATE_EDITS = {
    "per_call, params kept": (lambda v, h: v | {"mode": "per_call"}, r"regenerate\['params'\] must be .*none for per_call"),
    "a dense parameter": (lambda v, h: v | {"params": v["params"] + [_dense_name(h)]},
                          r"regenerate\['params'\] must be distinct pools and routing maps"),
    "a parameter twice": (lambda v, h: v | {"params": v["params"] + v["params"][:1]}, "must be distinct pools"),
    "an unknown mode": (lambda v, h: v | {"mode": "twice"}, r"header entry regenerate must be \{mode: one of once\|per_call"),
    # a valid header, but not what the library was built with: refused before any kernel runs
    "nothing lifted": (lambda v, h: v | {"params": []}, "regenerate differ from what edited.so was built with"),
    "per_call": (lambda v, h: {"mode": "per_call", "params": []}, "regenerate differ from what edited.so was built"),
}


@pytest.mark.parametrize("edit", REGENERATE_EDITS)
def test_an_edited_regeneration_entry_is_refused(once_export: Path, tmp_path: Path, edit: str) -> None:
    change, match = REGENERATE_EDITS[edit]
    header = fz.metadata(runtime.params_path(once_export).read_bytes())
    value = change(json.loads(header["regenerate"]), header)
    with pytest.raises(runtime.DeployError, match=match):
        runtime.load(_edited(once_export, tmp_path, "regenerate", json.dumps(value)))


def test_a_v2_file_asks_for_a_re_export(once_export: Path, tmp_path: Path) -> None:
    library = _edited(once_export, tmp_path, "format_version", "2")
    with pytest.raises(runtime.DeployError, match="v2 file, written by an older nesc .no regeneration mode.*re-export"):
        runtime.load(library)


# ------------------------------------------------------------------------------------------- option


@pytest.mark.parametrize("bad", ["twice", "ONCE", None, 1])
def test_an_unknown_mode_is_refused_before_any_work(bad) -> None:
    with pytest.raises(ConfigError, match=r"regenerate must be 'once' .* or 'per_call' .*; got"):
        nesc.compile(nn.Linear(2, 2), (torch.randn(1, 2),), regenerate=bad)


def test_the_defaults_agree() -> None:
    assert modes.DEFAULT in modes.MODES
    assert inspect.signature(nesc.compile).parameters["regenerate"].default == modes.DEFAULT
    assert inspect.signature(build.compile).parameters["regenerate"].default == modes.DEFAULT


def test_cli_compile_takes_the_mode(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    code = main(["compile", "mlp", "-o", str(tmp_path / "x.so"), "--regenerate", "twice"])
    _, err = capsys.readouterr()
    assert code == USAGE_ERROR and "invalid choice: 'twice'" in err and "'once', 'per_call'" in err
    for mode in modes.MODES:
        library = tmp_path / f"{mode}.so"
        code = main(["compile", "mlp", "-o", str(library), "--regenerate", mode])
        _, err = capsys.readouterr()
        assert code == 0, err
        deployed = runtime.load(library)
        assert deployed.regenerate == mode
        x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
        assert deployed(x).shape == (1, 10)
