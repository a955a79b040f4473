"""Running an exported file in onnxruntime: when the regeneration runs, and what it costs.

Every subgraph of a nesc file that rebuilds a weight reads only initializers (a pool, a routing map)
and ``Constant`` nodes, so onnxruntime's constant folder computes it once, when the session is created,
and keeps the dense result as an initializer in memory: the session then runs the dense model's
graph (same fused ops, same weights), at its latency. That is onnxruntime's default (graph
optimization level ``ORT_ENABLE_ALL``; folding is in every level from ``ORT_ENABLE_BASIC`` up), so a
plain ``onnxruntime.InferenceSession(path)`` gets it; ``resolve_cast_like`` in the export is what
makes it possible (onnxruntime's folder skips ``CastLike``, the exporter's spelling of a cast).

The price is memory: a folded session holds the dense weights, not the pools, and while it folds it
holds every intermediate of the regeneration (onnxruntime drops them only once its folder has visited
the whole graph): a peak of 1.2-2.4x the dense session's for the registry models, most of which the C
allocator keeps resident afterwards (``benchmarks/results/onnx.md``; ``regenerate.py`` keeps the
intermediates few). ``ort_session(regenerate="per_call")`` keeps the regeneration in the graph
(``disabled_optimizers=["ConstantFolding"]``): pools in memory, every weight recomputed on every run,
a peak below the dense session's for the larger models and 2-30x its latency.
"""

from __future__ import annotations

import os
from typing import Literal

from nesc.core.errors import InputError

REGENERATE = ("once", "per_call")
# The onnxruntime optimizer that folds the regeneration; "per_call" disables it (and only it).
FOLDING = "ConstantFolding"
# Always disabled: onnxruntime's Pad_Fusion (onnxruntime PR #18136, still in 1.31) moves a constant
# Pad into the pads of the MaxPool after it, but MaxPool pads with -inf, not the Pad's 0, so every
# window whose real values are all negative changes (BiT's stem, Pad(0) -> MaxPool: 0.0017 of the
# output's scale; the file itself is right: onnx's reference evaluator matches torch to 1.2e-6).
WRONG = ("Pad_Fusion",)


def ort_session(path: str | os.PathLike, *, regenerate: Literal["once", "per_call"] = "once", threads: int | None = None,
            optimized_model_path: str | os.PathLike | None = None, log_severity: int = 3):
    """An ``onnxruntime.InferenceSession`` (CPU) on an exported file.

    ``regenerate="once"``: onnxruntime's defaults, which fold every regenerated weight into a dense
    initializer when the session is created (dense latency and dense memory). ``"per_call"``: constant
    folding disabled, the pools stay and every run regenerates (memory of the compressed model).
    ``threads``: ``intra_op_num_threads`` (None: onnxruntime's default, one per core).
    ``optimized_model_path``: also write the graph onnxruntime runs (after its optimizations) there.
    ``log_severity``: 3 (errors only) by default.
    onnxruntime's ``Pad_Fusion`` is disabled in both modes: it changes results (see ``WRONG``); a
    session of your own wants ``disabled_optimizers=["Pad_Fusion"]`` too.
    """
    import onnxruntime as ort

    if regenerate not in REGENERATE:
        raise InputError(f"ort_session: regenerate must be one of {REGENERATE}, got {regenerate!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"ort_session: threads must be a positive int or None, got {threads!r}")
    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    if threads is not None:
        options.intra_op_num_threads = threads
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    disabled = [*WRONG, FOLDING] if regenerate == "per_call" else list(WRONG)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
