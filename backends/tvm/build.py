"""Build a frozen model with TVM and ship it: ``nesc.compile`` and ``CompiledModel``.

    lower (torch.export -> Relax, parameters as inputs)   lower.py
    -> [tune: MetaSchedule on the fused kernels, cached]  tune.py   (opt-in)
    -> prepare (legalize, fuse, default schedules)        schedule.py
    -> tvm.compile for the target                         targets.py
    -> CompiledModel: call it, or export_library(path) -> model.so + model.params.safetensors

The parameters are function inputs of the compiled program, never constants of the library, so
nothing can fold the regeneration gather into a dense weight, and the exported parameters file holds
exactly the epitome pools, the routing maps and the weights that stayed dense (``kinds`` says which
is which). ``runtime.py`` loads an export with tvm and numpy only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from nesc.backends.tvm import runtime
from nesc.backends.tvm.adapter import tvm
from nesc.backends.tvm.lower import Lowered, lower
from nesc.backends.tvm.schedule import prepare
from nesc.backends.tvm.targets import TargetError, TargetSpec, get_target
from nesc.backends.tvm.tune import TuneReport, as_tune_config, tune_module
from nesc.core.errors import ConfigError, InputError
from nesc.core.inputs import as_tensors

KINDS = ("pool", "route", "dense")


@dataclass(frozen=True)
class ExportedFiles:
    """What ``export_library`` wrote: the library, its parameters file, and their sizes in bytes."""

    library: Path
    params: Path

    @property
    def library_bytes(self) -> int:
        return self.library.stat().st_size

    @property
    def params_bytes(self) -> int:
        return self.params.stat().st_size

    @property
    def total_bytes(self) -> int:
        return self.library_bytes + self.params_bytes


@dataclass
class CompiledModel:
    """A model built by TVM for one target. Call it with numpy arrays or torch tensors (CPU targets,
    and CUDA where a GPU is present); ``export_library`` ships it."""

    executable: object  # tvm.relax.VMExecutable
    target: TargetSpec
    params: dict[str, np.ndarray]  # in the order "main" takes them after the inputs
    kinds: dict[str, str]  # param name -> "pool" | "route" | "dense"
    input_specs: tuple[runtime.InputSpec, ...]
    tvm_target: str = ""  # the TVM target it was built with, as JSON (recorded in the export)
    tuning: TuneReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> build time
    _runner: runtime.Runner | None = field(default=None, repr=False)

    def __call__(self, *inputs) -> np.ndarray | tuple[np.ndarray, ...]:
        if not self.target.runs_here():
            raise TargetError(
                f"this model was built for target {self.target.name!r} ({self.target.describe}), which cannot "
                f"run on this machine; export_library(path) and run it there with runtime.py"
            )
        if self._runner is None:
            self._runner = runtime.Runner(self.executable, list(self.params.values()), self.input_specs,
                                          self.target.device, f"compiled model ({self.target.name})")
        return self._runner(*inputs)

    @property
    def param_bytes(self) -> int:
        """Bytes of every parameter the deployed model stores (pools, routing maps, dense leftovers)."""
        return sum(a.nbytes for a in self.params.values())

    def bytes_by_kind(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for name, a in self.params.items():
            out[self.kinds[name]] += a.nbytes
        return out

    def export_library(self, path: str | Path) -> ExportedFiles:
        """Write ``path`` (the .so, linked by the target's compiler: a cross compiler for aarch64) and
        ``<stem>.params.safetensors`` next to it. Both are needed to run it (``runtime.load(path)``)."""
        path = Path(path)
        if path.suffix != ".so":
            raise InputError(f"export path {str(path)!r} must end in .so (a shared library); e.g. "
                             f"{str(path.with_suffix('.so'))!r}")
        if not path.parent.is_dir():
            raise InputError(f"cannot export to {str(path)!r}: folder {str(path.parent)!r} does not exist")
        self.executable.export_library(str(path), fcompile=self.target.fcompile())
        meta = {"inputs": [s.to_json() for s in self.input_specs], "kinds": self.kinds,
                "device": self.target.device, "target": {"name": self.target.name, "tvm": self.tvm_target}}
        return ExportedFiles(path, runtime.save_params(path, self.params, meta))

    def cuda_source(self) -> str:
        """The generated CUDA C of a CUDA build (what can be checked on a machine without a GPU)."""
        if not self.target.is_gpu:
            raise TargetError(f"cuda_source() needs a CUDA build; this one is for {self.target.name!r}")
        sources = [m.inspect_source("cuda") for m in _modules(self.executable.mod) if m.kind == "cuda"]
        return "\n".join(sources)


def _modules(module) -> list:
    """``module`` and every module it imports, depth first."""
    out = [module]
    for m in module.imports:
        out.extend(_modules(m))
    return out


def compile(
    frozen: nn.Module | fx.GraphModule,
    example_inputs: tuple,
    target: str | TargetSpec = "llvm",
    *,
    tune=None,
    cache_dir: str | Path | None = None,
    dynamic_batch: bool = False,
) -> CompiledModel:
    """Build ``frozen`` (a ``nesc.freeze``d GraphModule, or any dense nn.Module) with TVM for ``target``.

    The model is built for the example inputs' batch size. ``dynamic_batch=True`` keeps the batch
    dimension symbolic (one library for every batch size) at a cost: measured here, a symbolic batch
    ran ResNet-18/CIFAR about 2x slower in the Relax VM than the same model built static
    (benchmarks/results/tvm_schedules_dynamic.md); tuning needs static shapes, so it excludes it. ``tune``: None (default schedules only),
    a number of trials, or ``TuneConfig(trials=..., seconds=...)``; records are cached under
    ``cache_dir`` (default ``~/.cache/nesc/tvm``) and reused by the next compile of the same kernels.
    """
    spec, config = get_target(target), as_tune_config(tune)
    if dynamic_batch and config is not None:
        raise ConfigError("tune= and dynamic_batch=True exclude each other: MetaSchedule tunes kernels for "
                          "static shapes; build with dynamic_batch=False (the example inputs' batch) to tune")
    example_inputs = _check_example_inputs(example_inputs)
    seconds: dict[str, float] = {}
    tvm_target = spec.tvm_target()
    with _timed(seconds, "lower"):
        lowered = lower(frozen, example_inputs, dynamic_batch=dynamic_batch)
    report = None
    mod = lowered.mod
    if config is not None:
        with _timed(seconds, "tune"):
            mod, report = tune_module(mod, tvm_target, config, cache_dir)
    with _timed(seconds, "prepare"):
        mod = prepare(mod, tvm_target)
    with _timed(seconds, "build"):
        executable = tvm.compile(mod, tvm_target)
    return CompiledModel(executable, spec, dict(lowered.params), dict(lowered.kinds),
                         _input_specs(lowered, example_inputs, dynamic=dynamic_batch), str(tvm_target), report,
                         seconds)


def _check_example_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    example_inputs = as_tensors(example_inputs, "nesc.compile")
    for k, x in enumerate(example_inputs):
        if x.ndim == 0:
            raise InputError(f"nesc.compile: example input {k} must be a torch.Tensor with a batch dimension; "
                             f"got a 0-d tensor; pass e.g. (torch.randn(1, 3, 224, 224),)")
    return example_inputs


def _input_specs(lowered: Lowered, example_inputs: tuple, *, dynamic: bool) -> tuple[runtime.InputSpec, ...]:
    return tuple(
        runtime.InputSpec(name, ((None,) if dynamic else (x.shape[0],)) + tuple(x.shape[1:]),
                          str(x.dtype).removeprefix("torch."))
        for name, x in zip(lowered.input_names, example_inputs)
    )


class _timed:
    def __init__(self, into: dict[str, float], stage: str) -> None:
        self.into, self.stage = into, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.into[self.stage] = time.perf_counter() - self.start
