"""The validated loader: read an artifact, check it, and assemble the module it describes.

Order of checks (each failure an ``ArtifactError`` naming the file, the problem and the fix): the file
exists; its safetensors header is readable; ``format``; ``format_version``; ``sha256`` over the stored
tensors; the header JSON is well-formed; the tensor table matches the stored tensors; every graph node
follows the schema and every call target resolves (``codec.decode_graph``); batch norm and dropout
become modules that follow ``train()``/``eval()`` (``nesc.capture.make_mode_aware``).

The schema checks of the header live here and in ``codec``; the writer reuses ``assemble`` to prove
that what it is about to write loads back.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass

from safetensors import SafetensorError, safe_open
from torch import Tensor, fx, nn

import nesc.core.modules  # noqa: F401 - registers torch.ops.nesc.regenerate, which graphs reference
from nesc.capture import make_mode_aware
from nesc.core import names
from nesc.core.errors import ArtifactError

from .codec import Invalid, decode_graph
from .tensors import digest, install_tensors

FORMAT = "nesc"
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)


@dataclass
class _Header:
    metadata: dict[str, str]
    tensors: dict[str, Tensor]


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Read a model written by ``save``; returns an ``fx.GraphModule`` in eval mode.

    Tensors come back on the CPU with their dtypes, parameters as ``nn.Parameter`` (tied ones tied),
    buffers as buffers; ``train()``/``eval()`` switch batch norm and dropout. ``gm.meta`` holds the
    input specs and, under ``names.EXTRA``, the ``extra`` dict given to ``save``. Every failure is an
    ``ArtifactError`` naming the file, what is wrong and what to do.
    """
    path = os.fspath(path)
    header = _read(path)
    md = header.metadata
    _check_format(md, path)
    _check_digest(md, header.tensors, path)
    doc, table, specs, extra = _parse_json(md, path)
    gm = assemble(doc, header.tensors, table, path)
    gm.meta[names.INPUT_SPECS] = specs
    gm.meta[names.CAPTURE] = "export"  # an aten graph with mode-aware modules, as capture's export path
    gm.meta[names.EXTRA] = extra
    return gm


def installed_version() -> str:
    """The installed nesc's version, as the header's ``names.NESC_VERSION`` entry records it."""
    try:
        return importlib.metadata.version("nesc")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _read(path: str) -> _Header:
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "no such file"
        raise ArtifactError(f"{path}: {what}. Check the path; nesc.save(model, path) writes the artifact.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            # clone: torch's allocator aligns to 64 bytes, safetensors' buffers do not, and CPU kernels
            # (gemv, vectorised reductions) may sum in another order on unaligned data — not bit-exact.
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({e}). The file is truncated, corrupted, or not a "
            f"nesc artifact; copy it again or re-save the model with nesc.save."
        ) from e
    return _Header(metadata, tensors)


def _check_format(md: dict[str, str], path: str) -> None:
    if md.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: a safetensors file but not a nesc artifact (metadata 'format' is {md.get('format')!r}, "
            f"expected {FORMAT!r}). Plain weight files load with safetensors.torch.load_file; nesc.load "
            f"reads files written by nesc.save."
        )
    raw = md.get("format_version")
    try:
        version = int(raw)
    except (TypeError, ValueError):
        version = None
    if version not in READABLE_VERSIONS:
        written_by = md.get(names.NESC_VERSION, "an unknown nesc")
        raise ArtifactError(
            f"{path}: format_version {raw!r} (written by nesc {written_by}); this nesc ({installed_version()}) "
            f"reads format_version {', '.join(map(str, READABLE_VERSIONS))}. Load it with nesc {written_by} "
            f"and re-save it with the nesc that matches this one (or upgrade nesc)."
        )


def _check_digest(md: dict[str, str], tensors: dict[str, Tensor], path: str) -> None:
    want = md.get("sha256")
    got = digest(tensors)
    if want != got:
        raise ArtifactError(
            f"{path}: tensor data does not match its sha256 (header says {want}, data hashes to {got}): the "
            f"file was corrupted or tampered with after nesc.save wrote it. Use an intact copy or re-save."
        )


def _parse_json(md: dict[str, str], path: str):
    """(graph document, tensor table, input specs, extra) from the header's JSON strings."""
    try:
        doc = json.loads(md["graph"])
        table = json.loads(md["tensors"])
        specs = [(tuple(int(d) for d in shape), str(dtype)) for shape, dtype in json.loads(md["input_specs"])]
        extra = json.loads(md.get("extra", "{}"))
        if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list) or not isinstance(table, dict):
            raise ValueError("'graph' must be an object with a 'nodes' list and 'tensors' an object")
    except (KeyError, ValueError, TypeError) as e:
        raise _invalid(path, f"header JSON: {type(e).__name__}: {e}") from e
    return doc, table, specs, extra


def _invalid(path: str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: invalid graph description ({what}). The header was edited or written by a broken nesc; "
        f"re-save the model with nesc.save."
    )


def assemble(doc: dict, stored: dict[str, Tensor], table: dict, path: str) -> fx.GraphModule:
    """Module holding the tensors at their dotted paths + the decoded graph, mode-aware, in eval mode."""
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    try:
        install_tensors(gm, stored, table)
        graph = decode_graph(doc, table, path)
    except Invalid as e:
        raise _invalid(path, str(e)) from e
    gm.graph = graph  # recompiles
    try:
        make_mode_aware(gm)  # aten batch_norm/dropout -> modules that follow gm.training; lints
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a batch_norm node with the wrong arity
        raise _invalid(path, f"batch norm / dropout nodes cannot be made mode-aware: {e}") from e
    for node in gm.graph.nodes:
        if node.meta.get(names.BN_CUMULATIVE) and node.op == "call_module":
            gm.get_submodule(node.target).momentum = None
    return gm.eval()
