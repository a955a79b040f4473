"""Build a frozen model with TVM and ship it: ``nesc.compile`` and ``CompiledModel``.

    lower (torch.export -> Relax, parameters as inputs)   lower.py
    -> [lift: regenerate((pools, routes)) -> weights]     modes.py  (regenerate="once", the default)
    -> [tune: MetaSchedule on the fused kernels, cached]  tune.py   (opt-in)
    -> prepare (legalize, fuse, default schedules)        schedule.py
    -> + the deploy facts (param dtypes/shapes, routes)   export.py
    -> tvm.compile for the target                         targets.py
    -> CompiledModel: call it, or export_library(path) -> model.so + model.params.safetensors

The parameters are function inputs of the compiled program, never constants of the library, so
nothing can fold the regeneration gather into a dense weight, and the exported parameters file holds
exactly the epitome pools, the routing maps and the weights that stayed dense (``kinds`` says which
is which). ``runtime.py`` loads an export with tvm and numpy only, after checking the parameters
against the facts the library was built with (``export.py``), so that no kernel reads outside a pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from nesc.backends.tvm import export, modes, runtime
from nesc.backends.tvm.adapter import tvm
from nesc.backends.tvm.export import ExportedFiles
from nesc.backends.tvm.lower import Lowered, lower
from nesc.backends.tvm.schedule import prepare
from nesc.backends.tvm.targets import TargetError, TargetSpec, get_target
from nesc.backends.tvm.tune import TuneReport, as_tune_config, tune_module
from nesc.core.errors import ConfigError, InputError
from nesc.core.inputs import as_tensors

KINDS = ("pool", "route", "dense")


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
    routes: dict[str, dict] = field(default_factory=dict)  # routing map -> its pool and value range (Lowered)
    facts: dict = field(default_factory=dict)  # what the library was built for (export.deploy_facts)
    _runner: runtime.Runner | None = field(default=None, repr=False)

    def __call__(self, *inputs) -> np.ndarray | tuple[np.ndarray, ...]:
        if not self.target.runs_here():
            raise TargetError(
                f"this model was built for target {self.target.name!r} ({self.target.describe}), which cannot "
                f"run on this machine; export_library(path) and run it there with runtime.py"
            )
        if self._runner is None:  # a once build regenerates its weights here, on the first call
            self._runner = runtime.Runner(self.executable, dict(self.params), self.input_specs, self.target.device,
                                          f"compiled model ({self.target.name})", self.facts["regenerate"])
        return self._runner(*inputs)

    @property
    def regenerate(self) -> str:
        """``"once"`` (weights rebuilt from the pools when the model loads) or ``"per_call"`` (in every call)."""
        return self.facts["regenerate"]["mode"]

    @property
    def param_bytes(self) -> int:
        """Bytes of every parameter the deployed model stores (pools, routing maps, dense leftovers)."""
        return sum(a.nbytes for a in self.params.values())

    def bytes_by_kind(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for name, a in self.params.items():
            out[self.kinds[name]] += a.nbytes
        return out

    def export_library(self, path: str | Path, *, overwrite: bool = False) -> ExportedFiles:
        """Write ``path`` (the .so, linked by the target's compiler: a cross compiler for aarch64) and
        ``<stem>.params.safetensors`` next to it. Both are needed to run it (``runtime.load(path)``).

        Neither file replaces an existing one unless ``overwrite=True``; links and devices never are;
        both paths are checked before anything is linked, and each file appears whole or not at all
        (``nesc.core.files``). A full disk or a refused path is an ``OutputError``."""
        path = Path(path)
        if path.suffix != ".so":
            raise InputError(f"export path {str(path)!r} must end in .so (a shared library); e.g. "
                             f"{str(path.with_suffix('.so'))!r}")
        if not path.parent.is_dir():
            raise InputError(f"cannot export to {str(path)!r}: folder {str(path.parent)!r} does not exist")
        extra = {"device": self.target.device, "target": {"name": self.target.name, "tvm": self.tvm_target}}
        return export.write(self.executable, self.target.fcompile(), self.params, self.facts, extra, path,
                            overwrite=overwrite)

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
    regenerate: str = modes.DEFAULT,
) -> CompiledModel:
    """Build ``frozen`` (a ``nesc.freeze``d GraphModule, or any dense nn.Module) with TVM for ``target``.

    The model is built for the example inputs' batch size. ``dynamic_batch=True`` keeps the batch
    dimension symbolic (one library for every batch size) at a cost: measured here, a symbolic batch
    ran ResNet-18/CIFAR about 2x slower in the Relax VM than the same model built static
    (benchmarks/results/tvm_schedules_dynamic.md); tuning needs static shapes, so it excludes it. ``tune``: None (default schedules only),
    a number of trials, or ``TuneConfig(trials=..., seconds=...)``; records are cached under
    ``cache_dir`` (default ``~/.cache/nesc/tvm``) and reused by the next compile of the same kernels.
    ``regenerate``: ``"once"`` rebuilds every sampled weight from its pool once, when the model loads
    (a workspace of dense weights in memory; TVM dense latency), ``"per_call"`` in every call (no
    workspace: less memory); the deployed files are the same size either way (``modes.py``).
    """
    spec, config, regenerate = get_target(target), as_tune_config(tune), modes.check_mode(regenerate)
    if dynamic_batch and config is not None:
        raise ConfigError("tune= and dynamic_batch=True exclude each other: MetaSchedule tunes kernels for "
                          "static shapes; build with dynamic_batch=False (the example inputs' batch) to tune")
    example_inputs = _check_example_inputs(example_inputs)
    seconds: dict[str, float] = {}
    tvm_target = spec.tvm_target()
    with _timed(seconds, "lower"):
        lowered = lower(frozen, example_inputs, dynamic_batch=dynamic_batch)
    report, mod = None, lowered.mod
    lifted = modes.liftable(lowered.params, lowered.kinds, lowered.routes) if regenerate == "once" else []
    if lifted:  # before tuning, so that MetaSchedule tunes the kernels of both functions as they are built
        with _timed(seconds, "lift"):
            mod = modes.lift(mod, list(lowered.params), lifted, tvm_target)
    if config is not None:
        with _timed(seconds, "tune"):
            mod, report = tune_module(mod, tvm_target, config, cache_dir)
    inputs = _input_specs(lowered, example_inputs, dynamic=dynamic_batch)
    facts = export.deploy_facts(lowered.params, lowered.kinds, inputs, lowered.routes,
                                {"mode": regenerate, "params": lifted})
    with _timed(seconds, "prepare"):
        mod = export.with_manifest(prepare(mod, tvm_target), facts)
    with _timed(seconds, "build"):
        executable = tvm.compile(mod, tvm_target)
    return CompiledModel(executable, spec, dict(lowered.params), dict(lowered.kinds), inputs, str(tvm_target),
                         report, seconds, dict(lowered.routes), facts)


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
