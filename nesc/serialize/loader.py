"""The validated loader: read an artifact, check it, and assemble the module it describes.

An artifact may come from anyone, so nothing in it is trusted until checked, in this order (each
failure an ``ArtifactError`` naming the file, the problem and the fix; never another exception):

1. the path is a regular file; its safetensors header is readable;
2. ``format`` and ``format_version``, before anything else of the header is parsed;
3. the digest: versions 2 and 3 hash every header entry and every tensor (the whole content), version 1
   the tensors only (read with a ``NescWarning``: its graph is not covered);
4. version 3: the compressed documents inflate within their bound and the tensors tile the packed data
   (``container.unpack``); from here on every version reads the same documents and tensors;
5. the header documents against their schema (``schema``: the tensor table, input specs, ``extra``,
   nesting depth) and the graph against its own (``codec.decode_graph``: node kinds, names, values,
   and call targets only from the allow-list of pure ops, ``ops``); format 5's ``trainable`` document
   (``trainable.check_samplers``: module types only from its allow-list; ``meta``: plan and config);
6. the assembled module: samplers are built around the tensors at their paths once those fit them
   (``trainable.build_samplers``) and every call_module node calls one with a pool of its geometry
   (``check_calls``), routing maps fit their pools, in-place ops write only into tensors the graph
   computed (``schema.check_routes`` / ``check_mutations``), and the graph runs on its recorded input
   shapes (``_check_runs``: one forward at batch 1, or fake tensors for very large inputs; learners'
   input channels checked on the way).

The writer reuses ``assemble`` to prove that what it is about to write loads back.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import stat
import warnings

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, fx, nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import nesc.core.modules  # noqa: F401 - registers torch.ops.nesc.regenerate, which graphs reference
from nesc.capture import make_mode_aware
from nesc.core import compat, names
from nesc.core.errors import ArtifactError, NescWarning

from . import container, meta, schema, trainable
from .codec import decode_graph
from .schema import Invalid
from .tensors import digest, install_tensors
from .upgrade import legacy_dequantizations, scales_as_buffers

FORMAT = "nesc"
# 5: as 4, plus a model that still trains: call_module nodes of its samplers and the ``trainable``
# document they are built from (``trainable``); a frozen model is still written as 4, which older nescs read.
# 4: as 3, every sampled weight's gain a stored tensor (``upgrade``); 3: documents compressed and tensors
# packed (``container``); 2: the documents as header entries and one safetensors entry per tensor, the
# digest over both; 1: as 2, the digest over the tensors only. All are read (1 with a warning; 1-3
# get their gains as buffers, ``upgrade``); 4 and 5 are written.
FORMAT_VERSION = 5
FROZEN_VERSION = 4  # what save writes for a model without samplers
READABLE_VERSIONS = (1, 2, 3, 4, 5)
DIGEST = "sha256"
REAL_CHECK_ELEMENTS = 1 << 24  # per input at batch 1: 64 MiB of float32
_DOCUMENTS = ("graph", "tensors", "input_specs")
TRAINABLE = container.OPTIONAL_DOCUMENTS[0]


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Read a model written by ``save``; returns an ``fx.GraphModule`` in eval mode.

    Tensors come back on the CPU with their dtypes, parameters as ``nn.Parameter`` (tied ones tied),
    buffers as buffers; ``train()``/``eval()`` switch batch norm and dropout. ``gm.meta`` holds the
    input specs and, under ``names.EXTRA``, the ``extra`` dict given to ``save``. Every failure is an
    ``ArtifactError`` naming the file, what is wrong and what to do.
    """
    path = os.fspath(path)
    try:
        return _load(path)
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - a gap in the checks above: still the project's error, marked
        error = ArtifactError(f"{path}: cannot be loaded ({type(e).__name__}: {e}); the file is damaged or was "
                              f"not written by nesc.save. (This check is not one nesc expected to need: please "
                              f"report it with the file.)")
        error.unexpected = True
        raise error from e


def _load(path: str) -> fx.GraphModule:
    metadata, tensors = _read(path)
    version = _check_format(metadata, path)
    _check_digest(metadata, tensors, version, path)
    if version >= 3:
        metadata, tensors = _unpack(metadata, tensors, path)
    doc, table, specs, extra, train_doc = _parse_json(metadata, path, version)
    gm = assemble(doc, tensors, table, path, version=version, trainable_doc=train_doc)
    _check_runs(gm, specs, path)
    gm.meta[names.INPUT_SPECS] = specs
    gm.meta[names.CAPTURE] = "export"  # an aten graph with mode-aware modules, as capture's export path
    gm.meta[names.EXTRA] = extra
    if train_doc is not None:
        gm.meta.update({k: v for k, v in ((names.PLAN, train_doc["plan"]), (names.CONFIG, train_doc["config"]))
                        if v is not None})
    return gm


def installed_version() -> str:
    """The installed nesc's version, as the header's ``names.NESC_VERSION`` entry records it (read once,
    at import: a load never opens package metadata while it handles a file)."""
    return _INSTALLED


def _read_version() -> str:
    try:
        return importlib.metadata.version("nesc")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_INSTALLED = _read_version()
compat.preload_lazy_modules()


def _read(path: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    try:
        st = os.stat(path)
    except OSError as e:
        what = "no such file" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
        raise ArtifactError(f"{path}: {what}. Check the path; nesc.save(model, path) writes the artifact.") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ArtifactError(f"{path}: is {what}. Pass the path of a file written by nesc.save.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            # clone: torch's allocator aligns to 64 bytes, safetensors' buffers do not, and CPU kernels
            # (gemv, vectorised reductions) may sum in another order on unaligned data — not bit-exact.
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}). The file is truncated, "
            f"corrupted, or not a nesc artifact; copy it again or re-save the model with nesc.save."
        ) from None
    return metadata, tensors


def _check_format(md: dict[str, str], path: str) -> int:
    if md.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: a safetensors file but not a nesc artifact (metadata 'format' is {md.get('format')!r}, "
            f"expected {FORMAT!r}). Plain weight files load with safetensors.torch.load_file; nesc.load "
            f"reads files written by nesc.save."
        )
    raw = md.get("format_version")
    version = int(raw) if isinstance(raw, str) and raw.isdigit() and len(raw) < 4 else None
    if version not in READABLE_VERSIONS:
        written_by = str(md.get(names.NESC_VERSION, "an unknown nesc"))[:40]
        raise ArtifactError(
            f"{path}: format_version {str(raw)[:20]!r} (written by nesc {written_by}); this nesc "
            f"({installed_version()}) reads format_version {', '.join(map(str, READABLE_VERSIONS))}. Load it "
            f"with nesc {written_by} and re-save it with the nesc that matches this one (or upgrade nesc)."
        )
    return version


def _check_digest(md: dict[str, str], tensors: dict[str, Tensor], version: int, path: str) -> None:
    want = md.get(DIGEST)
    got = digest(tensors, {k: v for k, v in md.items() if k != DIGEST}) if version >= 2 else digest(tensors)
    if want != got:
        covered = "header and tensors" if version >= 2 else "tensor data"
        raise ArtifactError(
            f"{path}: its {covered} do not match the sha256 in its header (header says {str(want)[:64]}, content "
            f"hashes to {got}): the file was corrupted or tampered with after nesc.save wrote it. Use an intact "
            f"copy or re-save the model."
        )
    if version == 1:
        warnings.warn(f"{path}: format_version 1: its sha256 covers the tensors but not the graph; it is loaded "
                      f"through the same checks. Re-save it with this nesc to cover the whole file.",
                      NescWarning, stacklevel=4)


def _unpack(md: dict[str, str], blobs: dict[str, Tensor], path: str):
    """Format 3: (the header with its documents inflated, the stored tensors by name)."""
    inline = [key for key in (*container.DOCUMENTS, *container.OPTIONAL_DOCUMENTS, container.LAYOUT) if key in md]
    if inline:  # one place per document: a second copy could say something else than the one used
        raise _invalid(path, f"format_version 3 keeps its documents compressed, yet the header has entries {inline}")
    try:
        documents, tensors = container.unpack(blobs)
    except Invalid as e:
        raise _invalid(path, str(e)) from None
    return {**md, **documents}, tensors


def _parse_json(md: dict[str, str], path: str, version: int = FORMAT_VERSION):
    """(graph document, tensor table, input specs, extra, trainable document or None) from the header's
    JSON strings; the trainable document's plan and config decoded (``meta``)."""
    missing = [key for key in _DOCUMENTS if key not in md]
    if missing:
        raise _invalid(path, f"header entries {missing} are missing")
    if TRAINABLE in md and version < 5:
        raise _invalid(path, f"format_version {version} has no {TRAINABLE!r} document (format 5 introduced it)")
    try:
        doc, table, specs = (json.loads(md[key]) for key in _DOCUMENTS)
        extra = json.loads(md.get("extra", "{}"))
        train_doc = json.loads(md[TRAINABLE]) if TRAINABLE in md else None
        for key, value in zip((*_DOCUMENTS, "extra", TRAINABLE), (doc, table, specs, extra, train_doc)):
            schema.check_depth(value, f"header entry {key!r}")
        return (doc, schema.check_table(table), schema.check_specs(specs), schema.check_extra(extra),
                None if train_doc is None else parse_trainable(train_doc))
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep JSON recurses
        raise _invalid(path, f"header JSON: {type(e).__name__}: {str(e)[:200]}") from None
    except Invalid as e:
        raise _invalid(path, str(e)) from None


def parse_trainable(doc) -> dict:
    """The ``trainable`` document, checked: its samplers (``trainable.check_samplers``), plan and config
    decoded (``meta``); ``Invalid`` names what is off."""
    schema.check_type(doc, dict, f"the {TRAINABLE!r} document")
    if doc.keys() != {"samplers", "plan", "config"}:
        raise Invalid(f"the {TRAINABLE!r} document has keys {sorted(doc)[:8]}, expected ['config', 'plan', 'samplers']")
    return {"samplers": trainable.check_samplers(doc["samplers"]), "plan": meta.decode_plan(doc["plan"]),
            "config": meta.decode_config(doc["config"])}


def _invalid(path: str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: invalid artifact ({what}). The header was edited or written by a broken nesc; re-save the "
        f"model with nesc.save."
    )


def assemble(doc: dict, stored: dict[str, Tensor], table: dict, path: str, *,
             version: int = FORMAT_VERSION, trainable_doc: dict | None = None) -> fx.GraphModule:
    """Module holding the tensors at their dotted paths + the decoded graph, mode-aware, in eval mode,
    its routing maps, sampler calls and in-place writes checked (``schema``, ``trainable``); a format 1-3
    graph's numeric gains become buffers first, and torch's dequantisation of a pool (files written before
    ``nesc.dequantize``) that op (``upgrade``). ``trainable_doc``: the checked ``trainable`` document
    (``parse_trainable``), whose samplers are built around their installed tensors."""
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    samplers = trainable_doc["samplers"] if trainable_doc else {}
    try:
        install_tensors(gm, stored, table)
        trainable.build_samplers(gm, samplers)
        graph = decode_graph(doc, table, path, modules=samplers)
        gm.graph = graph  # recompiles: the source is made only of checked names and repr'd constants
        trainable.check_calls(gm, samplers)  # before make_mode_aware adds modules of its own
        if version < 4:
            scales_as_buffers(gm)
        legacy_dequantizations(gm)  # format 4 before nesc.dequantize: torch's ops read quantized pools
        make_mode_aware(gm)  # aten batch_norm/dropout -> modules that follow gm.training; lints
        schema.check_routes(gm)  # here, not in load only: save refuses what load would
        schema.check_train_mode(gm)
        schema.check_mutations(gm)
    except ArtifactError:
        raise
    except Invalid as e:
        raise _invalid(path, str(e)) from None
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, SyntaxError) as e:
        raise _invalid(path, f"the graph cannot be assembled ({type(e).__name__}: {str(e)[:200]})") from None
    for node in gm.graph.nodes:
        if node.meta.get(names.BN_CUMULATIVE) and node.op == "call_module":
            gm.get_submodule(node.target).momentum = None
    return gm.eval()


def _check_runs(gm: fx.GraphModule, specs, path: str) -> None:
    """The graph runs on its recorded input shapes: the shapes and dtypes of every stored tensor fit the
    ops that read them. For inputs of at most ``REAL_CHECK_ELEMENTS`` per example the check is one real
    forward on zeros at batch 1 (meta kernels do not check dtypes); larger ones run under fake tensors,
    which allocate no memory, so a spec cannot make ``load`` allocate more than that."""
    batch_one = [((1, *shape[1:]) if shape else shape, dtype) for shape, dtype in specs]
    real = all(math.prod(shape) <= REAL_CHECK_ELEMENTS for shape, _ in batch_one)
    hooks, problems = trainable.watch_learner_inputs(gm)  # learners read features only in training
    try:
        with torch.no_grad():
            if real:
                gm(*(torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in batch_one))
            else:
                mode = compat.fake_tensor_mode()
                with mode:
                    fakes = tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in specs)
                    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception as e:  # noqa: BLE001 - any failure of the graph on its own inputs
        shapes = ", ".join(f"{tuple(s)}:{d}" for s, d in (batch_one if real else specs))
        raise _invalid(path, f"the graph does not run on its recorded input shapes ({shapes}): "
                             f"{type(e).__name__}: {str(e)[:300]}") from None
    finally:
        for hook in hooks:
            hook.remove()
    if problems:
        raise _invalid(path, "; ".join(problems[:3]))
