"""nesc: Neural Epitome Search as a compiler.

    gm = nesc.transform(model, example_inputs, nesc.NESConfig(ratio=4))   # trainable GraphModule
    ... train gm in any loop ...
    frozen = nesc.freeze(gm)                                              # routing maps
    nesc.summary(frozen); nesc.save(frozen, "model.nesc"); nesc.load("model.nesc")

The package reads as layers; a module imports only from the layers below it (checked by the
import-linter contracts in ``pyproject.toml``):

    cli/                      the ``nesc`` command, one module per verb
    search/                   plan search (ESNAC, embedding descent, random, uniform)
    train, baselines          training with exact resume; the equal-size baselines
    api                       the public verbs (this package re-exports them)
    backends/                 TVM (``nesc.compile``) and ONNX (``nesc.export_onnx``)   [folder backends/]
    serialize/, report, fitting   save/load, the per-layer report, least-squares pool fits
    passes/                   the fx passes and pipelines                              [folder passes/]
    capture                   symbolic_trace / torch.export -> mode-aware GraphModule
    models/, data, checkpoint the reference models, datasets, training run files      [folder models/]
    core/                     errors, registry, config, names, inputs, files, sampling math and modules,
                              the regenerated-weight cache,
                              compat (torch's private APIs)
"""

from importlib.metadata import PackageNotFoundError, version

from nesc.core import modules  # noqa: F401  (registers torch.ops.nesc.regenerate)
from nesc.api import freeze, load, save, summary, transform
from nesc.api import compile  # noqa: A004  (nesc.compile: the TVM backend, imported on first call)
from nesc.api import export_onnx
from nesc.capture import capture
from nesc.core.cache import weight_cache
from nesc.core.config import LayerConfig, NESConfig
from nesc.core.modules import set_sampling_width, start_stats
from nesc.core.qat import prepare_qat
from nesc.fitting import distillation_loss, fit_pools, load_checkpoint
from nesc.core.errors import (
    ArtifactError,
    CaptureError,
    ConfigError,
    InputError,
    NescError,
    PassOrderError,
    PlanError,
)
from nesc.report import stored_bytes, stored_params
from nesc.search import search  # the function: it shadows the package name (see nesc/search/__init__.py)

try:
    __version__ = version("nesc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "ArtifactError", "CaptureError", "ConfigError", "InputError", "LayerConfig", "NESConfig", "NescError",
    "PassOrderError", "PlanError", "capture", "distillation_loss", "fit_pools", "freeze", "load",
    "load_checkpoint", "prepare_qat", "save", "set_sampling_width", "start_stats", "stored_bytes", "stored_params",
    "summary",
    "transform", "weight_cache",
]
__all__ += ["compile"]
__all__ += ["export_onnx"]
__all__ += ["search"]
