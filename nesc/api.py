"""The public verbs: transform, freeze, summary, save, load, compile, export_onnx.

Each is a thin composition of the layers below (capture, the pass pipelines, fitting, report,
serialization, backends); this module adds no logic of its own beyond wiring and metadata.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import fx, nn

from nesc import serialize
from nesc.capture import capture, keep_interface
from nesc.core import names
from nesc.core.config import NESConfig
from nesc.core.errors import NescWarning
from nesc.core.modules import EpitomeSampler, is_regenerate
from nesc.core.nopickle import no_pickle
from nesc.core.qat import is_prepared, qat_scales
from nesc.core.quant import check_pool_dtype, pool_read
from nesc.core.shells import mark_shells
from nesc.fitting import fit_pools
from nesc.passes import pipeline
from nesc.passes.quantize_pools import quantize_pools
from nesc.report import Report, build_report

# ``on_stage(name)`` is entered around each stage of ``transform``: "capture", "plan" (the TRANSFORM
# pipeline: find weights, plan pools, rewrite) and, with init="dense", "fit". The CLI times and shows
# progress through it; anything returning a context manager works.
StageHook = Callable[[str], AbstractContextManager]


def transform(model: nn.Module, example_inputs, config: NESConfig | None = None, *, example_kwargs=None,
              on_stage: StageHook | None = None, **changes) -> fx.GraphModule:
    """Capture ``model`` and return a new, trainable GraphModule whose weights are sampled from pools.

    ``config`` (or keyword changes to the default ``NESConfig``, e.g. ``ratio=8``) sets the budget,
    the pool-sharing policy and per-layer overrides. The user's model is not modified. With
    ``init="dense"`` (default) the pools are fitted to the model's current weights by least squares;
    the per-layer relative reconstruction errors are in ``gm.meta[nesc.core.names.FIT_ERRORS]``.
    ``example_kwargs``: keyword inputs (a Hugging Face model's ``attention_mask=``, ``labels=``): the
    result takes every example input, by the same names, and returns what the model returns
    (``nesc.capture``). ``on_stage``: see ``StageHook``.
    """
    config = (config or NESConfig()).replace(**changes) if changes else (config or NESConfig())
    stage = on_stage or (lambda name: contextlib.nullcontext())
    with stage("capture"):
        gm = capture(model, example_inputs, example_kwargs)
    with stage("plan"):
        gm = keep_interface(gm, pipeline.run(gm, pipeline.TRANSFORM, config))  # .config of a Hugging Face model
    gm.meta[names.DENSE_REASONS] = dict(gm.meta[names.PLAN].dense)
    gm.meta[names.CONFIG] = config
    if config.init == "dense":
        with stage("fit"):
            fit_to_model(gm, model, match_spread=config.match_spread)
    return no_pickle(gm)


def fit_to_model(gm: fx.GraphModule, model: nn.Module, match_spread: bool = False) -> dict[str, float]:
    """Fit ``gm``'s pools to ``model``'s current weights by least squares (``nesc.fit_pools``, with its
    ``match_spread``); the per-layer relative errors are returned and kept in ``gm.meta[names.FIT_ERRORS]``."""
    # Capture keeps the user's qualified names; a tied weight may be read under any of its names.
    dense = dict(model.named_parameters(remove_duplicate=False))
    gm.meta[names.FIT_ERRORS] = fit_pools(gm, {name: dense[name] for name in gm.meta[names.PLAN].layers},
                                          match_spread=match_spread)
    return gm.meta[names.FIT_ERRORS]


def freeze(gm: fx.GraphModule, *, fold_batchnorm: bool = False, pool_dtype: torch.dtype | None = None) -> fx.GraphModule:
    """Return a frozen copy: learned indices become routing maps; the copy is in eval mode and stores
    only pools, routing maps and what stayed dense. Its outputs equal ``gm.eval()``'s bit for bit.

    ``fold_batchnorm=True`` also turns every batch norm into a per-channel scale and shift
    (``passes.fold_batchnorm``): two tensors instead of four, smaller files for deployment, outputs
    equal up to float rounding; the batch norms no longer use batch statistics in training mode.

    ``pool_dtype`` (``torch.int8``, ``torch.float16``, ``torch.bfloat16``) stores the pools in that dtype
    (int8: one symmetric scale per pool row) and dequantises them before regeneration
    (``passes.quantize_pools``); outputs change by the pools' rounding only. A model prepared with
    ``nesc.prepare_qat`` is quantised to int8 with its fake-quantizers' scales (the default there)."""
    if pool_dtype is not None:
        check_pool_dtype(pool_dtype)  # before any work
    wide = sorted({m.width for m in gm.modules() if isinstance(m, EpitomeSampler) and m.width > 1})
    if wide:
        warnings.warn(NescWarning(
            f"freezing samplers whose sampling kernel is {wide[-1]:g} cells wide: the routing map keeps linear "
            f"interpolation (width 1), so the frozen model's outputs differ from the model as trained. Anneal the "
            f"width to 1 before freezing (nesc.train.fit does; in your own loop: nesc.set_sampling_width(gm, 1.0) and "
            f"fine-tune)"), stacklevel=2)
    frozen = copy.deepcopy(gm).eval()
    frozen.meta = copy.copy(gm.meta)
    scales = qat_scales(frozen)  # before freeze removes the samplers that hold them
    pool_dtype = torch.int8 if pool_dtype is None and is_prepared(frozen) else pool_dtype
    steps = pipeline.FREEZE + (pipeline.FOLD_BATCHNORM if fold_batchnorm else [])
    frozen = pipeline.run(frozen, steps)
    if pool_dtype is not None:
        frozen = quantize_pools(frozen, pool_dtype, scales).graph_module
    mark_shells(frozen, {n.meta[names.SAMPLED_WEIGHT]: pool_read(n.args[0]).values.target.removesuffix(".values")
                         for n in frozen.graph.nodes if is_regenerate(n) and names.SAMPLED_WEIGHT in n.meta})
    return no_pickle(keep_interface(gm, frozen))


def summary(gm: fx.GraphModule, print_table: bool = True) -> Report:
    """The per-layer report (name, op, weight, pool, sharing, params and MAdd before/after); printed
    with rich unless ``print_table=False``."""
    report = build_report(gm)
    if print_table:
        from rich.console import Console

        Console().print(report)
    return report


def save(gm: fx.GraphModule, path: str | Path, *, overwrite: bool = False) -> None:
    """Write a frozen or a trainable model to one safetensors file with its graph as JSON; no pickle (a
    trainable one loads back trainable: ``nesc.serialize.trainable``). An existing file is replaced only
    with ``overwrite=True``; links and non-regular files never are."""
    report = build_report(gm)
    config = gm.meta.get(names.CONFIG)
    extra = {"dense_reasons": gm.meta.get(names.DENSE_REASONS, {}), "report": report.to_dict(),
             "config": repr(config) if config is not None else None}
    serialize.save(gm, path, extra=extra, overwrite=overwrite)


def load(path: str | Path) -> fx.GraphModule:
    """Read a model written by ``save``; checks format, version and integrity."""
    gm = serialize.load(path)
    gm.meta[names.DENSE_REASONS] = gm.meta.get(names.EXTRA, {}).get("dense_reasons", {})
    return no_pickle(gm)


# nesc.compile's regenerate= default (backends.tvm.modes.DEFAULT, which needs the tvm extra to import).
REGENERATE_DEFAULT = "once"


def compile(frozen: nn.Module, example_inputs, target="llvm", *, tune=None, cache_dir: str | Path | None = None,
            dynamic_batch: bool = False, regenerate: str = REGENERATE_DEFAULT):
    """Build ``frozen`` (a ``nesc.freeze``d model, or any dense module) with Apache TVM for ``target``
    ("llvm": this CPU; "aarch64": cross-compiled 64-bit ARM Linux; "cuda") and return a
    ``CompiledModel``: call it on numpy arrays or tensors, ``export_library("model.so")`` to deploy
    (the library plus ``model.params.safetensors``; ``nesc/backends/tvm/runtime.py`` runs them with
    tvm and numpy only). ``tune``: an opt-in MetaSchedule budget, trials (int) or seconds ("120s"),
    cached under ``cache_dir`` (default ``~/.cache/nesc/tvm``). ``regenerate``: ``"once"`` rebuilds
    the weights from the pools when the model loads (dense latency, the weights in memory),
    ``"per_call"`` in every call (less memory); the deployed files are the same either way; any
    other value is a ``ConfigError``. Needs the ``tvm`` extra."""
    from nesc.backends.tvm.build import compile as tvm_compile

    return tvm_compile(frozen, example_inputs, target, tune=tune, cache_dir=cache_dir, dynamic_batch=dynamic_batch,
                       regenerate=regenerate)


def export_onnx(frozen: fx.GraphModule, example_inputs, path: str | Path, *, simplify: bool = True,
                opset: int | None = None, dynamic_batch: bool = True, dense: nn.Module | None = None,
                overwrite: bool = False):
    """Export a frozen model to one ONNX file that keeps pools and routing maps as its tensors and
    regenerates the weights with Gather + interpolation nodes (``nesc.backends.onnx``). Opset 18 by
    default; the batch dimension stays symbolic unless ``dynamic_batch=False``; ``dense`` (the
    uncompressed model) is exported the same way to report its size; an existing file is replaced only
    with ``overwrite=True``. Returns an ``OnnxExport``."""
    from nesc.backends import onnx as onnx_backend

    opset = onnx_backend.DEFAULT_OPSET if opset is None else opset
    return onnx_backend.export_onnx(frozen, example_inputs, path, simplify=simplify, opset=opset,
                                    dynamic_batch=dynamic_batch, dense=dense, overwrite=overwrite)
