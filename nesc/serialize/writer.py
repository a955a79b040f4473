"""``save``: re-export the model with torch.export, encode what it gives, prove it loads back, write.

A graph captured by ``symbolic_trace`` calls modules (``nn.BatchNorm2d``, ...) whose constructor
arguments cannot be recovered generically, so the model is re-exported in eval mode first: one aten
graph of ``call_function`` nodes on ``get_attr`` tensors. What export does not keep is carried over
from the model's nodes (``_carry_meta``): which weight each ``nesc.regenerate`` node samples, and
which batch norms average cumulatively.

A batch-1 example is exported at batch 2 (``nesc.core.inputs.export_batch``), since torch.export
specialises dimensions of size 1, and at batch 1 only if that fails. Every attempt is rebuilt from
exactly what would be written (``loader.assemble``) and must give outputs equal (``torch.equal``) to
the model's eval outputs on inputs rebuilt from ``gm.meta[names.INPUT_SPECS]`` (seed 0).

A model that still trains keeps its samplers: they are swapped for a placeholder op while export runs
and written back as call_module nodes, with the ``trainable`` document they are rebuilt from (format 5,
``trainable``); a frozen model is written as format 4 (``FROZEN_VERSION``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, fx

import nesc.core.modules  # noqa: F401 - registers torch.ops.nesc.regenerate, which graphs reference
from nesc.capture import ExportedBatchNorm
from nesc.core import compat, files, inputs, names
from nesc.core.errors import ArtifactError
from nesc.core.modules import EpitomeSampler

from . import container, meta, trainable
from .codec import encode_graph
from .loader import (DIGEST, FORMAT, FORMAT_VERSION, FROZEN_VERSION, TRAINABLE, assemble, installed_version,
                     parse_trainable)
from .tensors import add_constants, collect_tensors, digest, without_aliases

_REGENERATE = torch.ops.nesc.regenerate.default


def save(gm: fx.GraphModule, path: str | os.PathLike, *, extra: dict | None = None,
         overwrite: bool = False) -> None:
    """Write ``gm`` (typically a frozen nesc model) to ``path`` as one safetensors file.

    Needs ``gm.meta[names.INPUT_SPECS]`` (written by capture) to re-export the graph. ``extra`` is any
    JSON-serialisable dict (tuples come back as lists); ``load`` returns it as
    ``gm.meta[names.EXTRA]``. Raises ``ArtifactError`` when the model cannot be written exactly, and
    ``OutputError`` (before any work) when ``path`` exists and ``overwrite`` is False, or is a link, a
    folder or a device. The file appears whole or not at all (``nesc.core.files.atomic_write``).
    """
    files.check_output(path, overwrite=overwrite, what="nesc.save")
    train_doc = _trainable_document(gm)
    specs = _input_specs(gm)
    extra_json = _json_or_raise(extra or {}, "extra")
    graph_doc, tensors, table = _export_graph(gm, specs, *collect_tensors(gm), train_doc)
    documents = {
        "graph": _compact(graph_doc),
        "tensors": _compact(table),
        "input_specs": _compact([[list(s), d] for s, d in specs]),
        "extra": extra_json,
    }
    if train_doc is not None:
        documents[TRAINABLE] = _compact(train_doc)
    blobs = container.pack(documents, without_aliases(tensors, table))  # formats 3 and 4: see ``container``
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if train_doc is not None else FROZEN_VERSION),
        names.NESC_VERSION: installed_version(),
        "torch_version": torch.__version__,
    }
    metadata[DIGEST] = digest(blobs, metadata)  # every metadata entry and both tensors: the whole file
    files.atomic_write(path, lambda tmp: save_file(blobs, str(tmp), metadata=metadata), overwrite=overwrite,
                       what="nesc.save")


def _compact(doc) -> str:
    return json.dumps(doc, allow_nan=False, separators=(",", ":"))


def _trainable_document(gm: fx.GraphModule) -> dict | None:
    """The ``trainable`` document of a model whose graph calls samplers (format 5), else None; what it
    cannot describe is refused here, before any export (``trainable.check_saveable``)."""
    paths = trainable.sampler_paths(gm)
    if not paths and not any(isinstance(m, EpitomeSampler) for m in gm.modules()):
        return None
    trainable.check_saveable(gm, paths)
    gm_meta = getattr(gm, "meta", {})
    return {"samplers": trainable.describe(gm, paths), "plan": meta.encode_plan(gm_meta.get(names.PLAN)),
            "config": meta.encode_config(gm_meta.get(names.CONFIG))}


def _input_specs(gm: fx.GraphModule) -> list[inputs.InputSpec]:
    specs = getattr(gm, "meta", {}).get(names.INPUT_SPECS)
    if not specs:
        raise ArtifactError(
            f"cannot save: gm.meta[{names.INPUT_SPECS!r}] is missing, and save needs the example inputs' "
            f"shapes to re-export the graph. Capture the model with nesc (nesc.capture / nesc.transform), "
            f"or set gm.meta[{names.INPUT_SPECS!r}] = [((1, 3, 32, 32), 'float32')] (one entry per input)."
        )
    return inputs.check_specs(specs, "cannot save", ArtifactError)


def _json_or_raise(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ArtifactError(
            f"cannot save: {what} is not JSON-serialisable ({e}). Pass plain dicts, lists, strings and "
            f"numbers (e.g. dataclasses.asdict(report))."
        ) from e


# ------------------------------------------------------------------------------------ export


@dataclass(frozen=True)
class _Reference:
    """What every export attempt is checked against: the model (in eval mode), its tensor table, the
    inputs rebuilt from its specs and its outputs on them."""

    gm: fx.GraphModule
    tensors: dict[str, Tensor]
    table: dict[str, dict]
    inputs: tuple[Tensor, ...]
    outputs: Any
    trainable: dict | None = None  # the ``trainable`` document of a model with samplers


def _export_graph(gm: fx.GraphModule, specs, tensors: dict[str, Tensor], table: dict[str, dict],
                  train_doc: dict | None = None):
    """Re-export ``gm`` in eval mode and encode the aten graph; check it rebuilds to the same outputs.
    Sampler calls are kept as call_module nodes (``trainable.export_ready`` / ``restore_calls``).

    Returns (graph JSON, tensors, table) where tensor constants the exporter lifted (a
    ``torch.tensor(...)`` in forward) are added as kind "constant".
    """
    example = inputs.from_specs(specs, seed=0)  # a private generator: save must not move the global RNG
    attempts = [inputs.export_batch(example), example] if inputs.has_batch_one(example) else [example]
    was_training = gm.training
    gm.eval()
    failures = []
    try:
        with torch.no_grad():
            ref = _Reference(gm, tensors, table, example, _run_own_example(gm, example), train_doc)
        for batched in attempts:
            result = _attempt(ref, batched)
            if not isinstance(result, str):
                return result
            failures.append(result)
    finally:
        gm.train(was_training)
    raise ArtifactError(
        "cannot save: re-exporting the model with torch.export (eval mode) did not reproduce it:\n  "
        + "\n  ".join(failures)
        + "\nsave writes the aten graph torch.export produces, so the model's eval-mode forward must be "
        "exportable and deterministic."
    )


def _attempt(ref: _Reference, example: tuple[Tensor, ...]):
    """(graph JSON, tensors, table) of the export on ``example``, or why it failed (a string)."""
    target = ref.gm if ref.trainable is None else trainable.export_ready(ref.gm)
    try:
        ep = torch.export.export(target, example, dynamic_shapes=inputs.batch_dims(example))
    except Exception as e:  # noqa: BLE001 - reported with every attempt
        return f"torch.export.export on shapes {inputs.describe(example)}: {type(e).__name__}: {e}"
    exported = ep.module()
    modules = ()
    if ref.trainable is not None:
        trainable.restore_calls(ref.gm, exported)
        modules = ref.trainable["samplers"]
    _carry_meta(ref.gm, exported)
    tensors, table = add_constants(exported, ref.tensors, ref.table)
    doc = encode_graph(exported.graph, table, modules)
    mismatch = _check_rebuild(doc, tensors, table, ref)
    if mismatch is None:
        return doc, tensors, table
    return f"graph exported on shapes {inputs.describe(example)}: {mismatch}"


def _run_own_example(gm: fx.GraphModule, example):
    try:
        return gm(*example)
    except Exception as e:  # noqa: BLE001 - re-raised with what save was doing
        raise ArtifactError(
            f"cannot save: the model fails on inputs built from gm.meta[{names.INPUT_SPECS!r}] "
            f"(shapes {inputs.describe(example)}): {type(e).__name__}: {e}. Set the specs to the shapes and "
            f"dtypes its forward takes."
        ) from e


# ------------------------------------------------------------------------ what export loses


def _carry_meta(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Copy what export does not keep from ``src``'s nodes onto ``dst``'s.

    Regenerate nodes are matched by the pool / routing tensors they read (by order when that is
    ambiguous); batch norms by their running mean.
    """
    src_regen = [n for n in src.graph.nodes if n.target is _REGENERATE]
    dst_regen = [n for n in dst.graph.nodes if n.target is _REGENERATE]
    by_key: dict[tuple, list[fx.Node]] = {}
    for n in src_regen:
        by_key.setdefault(_route_key(n), []).append(n)
    for i, n in enumerate(dst_regen):
        same = by_key.get(_route_key(n), [])
        origin = same[0] if len(same) == 1 else src_regen[i] if len(src_regen) == len(dst_regen) else None
        if origin is not None and names.SAMPLED_WEIGHT in origin.meta:
            n.meta[names.SAMPLED_WEIGHT] = origin.meta[names.SAMPLED_WEIGHT]
    wanted = sorted(n.meta[names.SAMPLED_WEIGHT] for n in src_regen if names.SAMPLED_WEIGHT in n.meta)
    got = sorted(n.meta[names.SAMPLED_WEIGHT] for n in dst_regen if names.SAMPLED_WEIGHT in n.meta)
    if wanted != got:
        raise ArtifactError(
            f"cannot save: the re-exported graph's nesc.regenerate nodes could not be matched to the model's "
            f"(sampled weights {wanted}, matched {got}). Each regenerate node should read its pool and "
            f"routing map through get_attr nodes, as passes.freeze writes them."
        )
    cumulative = _cumulative_batch_norms(src)
    for n in dst.graph.nodes:
        if n.target is torch.ops.aten.batch_norm.default and _attr_target(n.args[3]) in cumulative:
            n.meta[names.BN_CUMULATIVE] = True


def _route_key(node: fx.Node) -> tuple:
    return tuple(_attr_target(a) for a in node.args[:3])


def _attr_target(arg) -> str | None:
    return arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _cumulative_batch_norms(gm: fx.GraphModule) -> set[str]:
    """Running-mean names of batch norms with ``momentum=None`` (cumulative average)."""
    running_means = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if compat.is_batch_norm(mod) and mod.momentum is None:
            running_means.add(f"{node.target}.running_mean")
        elif isinstance(mod, ExportedBatchNorm) and mod.momentum is None and len(node.args) > 3:
            running_means.add(_attr_target(node.args[3]))
    running_means.discard(None)
    return running_means


# ------------------------------------------------------------------------------ rebuild check


def _check_rebuild(doc: dict, tensors: dict[str, Tensor], table: dict[str, dict], ref: _Reference) -> str | None:
    """Rebuild the module from exactly what save will write; None when its outputs equal the model's."""
    try:
        train_doc = None
        if ref.trainable is not None:  # the loader's view of the document: as checked from its JSON
            train_doc = parse_trainable(json.loads(_compact(ref.trainable)))
        loaded = assemble(doc, without_aliases(tensors, table), table, "<save>", trainable_doc=train_doc)
        with torch.no_grad():
            got = loaded(*ref.inputs)
    except ArtifactError as e:  # a bug of nesc or an unsupported model, not a damaged file
        raise ArtifactError(f"cannot save: the artifact would not load back: {e}") from e
    except Exception as e:  # noqa: BLE001 - a graph that does not run on the example is a failed attempt
        return f"the rebuilt graph fails on the example inputs: {type(e).__name__}: {e}"
    return _compare(compat.tree_leaves(ref.outputs), compat.tree_leaves(got))


def _compare(want_leaves: list, got_leaves: list) -> str | None:
    """None when the outputs are bit-exact, else what differs first."""
    if len(want_leaves) != len(got_leaves):
        return f"{len(got_leaves)} outputs instead of {len(want_leaves)}"
    for i, (w, g) in enumerate(zip(want_leaves, got_leaves)):
        if isinstance(w, Tensor):
            if not (isinstance(g, Tensor) and g.dtype == w.dtype and g.shape == w.shape):
                return f"output {i} is {_summary(g)}, the model gives {_summary(w)}"
            if not torch.equal(g, w):
                diff = (g.double() - w.double()).abs().max().item()
                return f"output {i} differs from the model's by up to {diff:.3g} (must be bit-exact)"
        elif w != g:
            return f"output {i} is {g!r}, the model gives {w!r}"
    return None


def _summary(x) -> str:
    return f"a {str(x.dtype).removeprefix('torch.')} tensor {tuple(x.shape)}" if isinstance(x, Tensor) else repr(x)
