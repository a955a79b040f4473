"""Ship a compiled model: ``model.so`` and ``model.params.safetensors``, read back by ``runtime.py``.

    deploy_facts   what the parameters must be for the compiled code (``runtime.FACT_KEYS``: names,
                   dtypes, shapes, inputs, kinds, every routing map's pool and value range, and the
                   regeneration mode with the parameters a ``once`` build regenerates from)
    with_manifest  those facts compiled into the library (``runtime.MANIFEST``), before ``tvm.compile``,
                   so that a parameters file cannot claim other facts than its library's
    write          both files, through ``nesc.core.files``: both paths are checked before anything is
                   linked (an existing file is replaced only with ``overwrite=True``; links, folders and
                   devices never are), each file is written to a temporary name, fsync-ed and renamed

TVM's ``export_library`` links into the temporary ``.partial`` name that ``files.atomic_write`` gives
(the linker does not care about the suffix; only loading wants ``.so``, and the library is loaded
from its final name). The parameters are written second, with the library's SHA-256 and the
content hash in their header; if they cannot be written, the new library is removed too, since a
library without its parameters cannot run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nesc.core import files

from . import runtime
from .adapter import with_string_function


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


def deploy_facts(params: dict[str, np.ndarray], kinds: dict[str, str], inputs: tuple[runtime.InputSpec, ...],
                 routes: dict[str, dict], regenerate: dict) -> dict:
    """The facts ``runtime.read_params`` and ``runtime.load`` check a parameters file against;
    ``regenerate``: ``{"mode": "once" | "per_call", "params": what the library's regenerate takes}``."""
    tensors = {name: {"dtype": str(a.dtype), "shape": [int(d) for d in a.shape]} for name, a in params.items()}
    return {"params": list(params), "tensors": tensors, "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in inputs],
            "kinds": dict(kinds), "routes": routes, "regenerate": regenerate}


def with_manifest(mod, facts: dict):
    """``mod`` with ``runtime.MANIFEST() -> facts as JSON`` (a few hundred bytes per layer)."""
    return with_string_function(mod, runtime.MANIFEST, json.dumps(facts, sort_keys=True))


def write(executable, fcompile, params: dict[str, np.ndarray], facts: dict, extra: dict, path: Path, *,
          overwrite: bool = False) -> ExportedFiles:
    """Write ``path`` (the library) and its parameters file; ``extra``: the header's device and target.

    Raises ``OutputError`` for a path that exists (without ``overwrite``), is a link or a device, or a
    full disk; ``DeployError`` for parameters that do not fit the build (changed since ``compile``)."""
    library, params_file = Path(path), runtime.params_path(path)
    for p, what in ((library, "compiled library"), (params_file, "parameters file")):
        files.check_output(p, overwrite=overwrite, what=what)
    _check_params(params, facts, library)
    digest = {}

    def link(tmp: Path) -> None:
        executable.export_library(str(tmp), fcompile=fcompile)
        digest["library"] = runtime.sha256(tmp)

    files.atomic_write(library, link, overwrite=overwrite, what="compiled library")
    try:
        header = make_header(params, facts | extra, digest["library"])
        files.atomic_write(params_file, lambda tmp: save_params(tmp, params, header), overwrite=overwrite,
                           what="parameters file")
    except BaseException:
        library.unlink(missing_ok=True)  # ours: written just now
        raise
    return ExportedFiles(library, params_file)


def make_header(params: dict[str, np.ndarray], entries: dict, library_sha256: str) -> dict[str, str]:
    """The safetensors metadata of a parameters file: ``entries`` as JSON, the format and both hashes."""
    header = {"format": runtime.FORMAT, "format_version": runtime.FORMAT_VERSION, "library_sha256": library_sha256}
    header |= {key: json.dumps(value) for key, value in entries.items()}
    return header | {"content_sha256": runtime.content_sha256(header, params)}


def save_params(path: Path, params: dict[str, np.ndarray], header: dict[str, str]) -> None:
    """Write the tensors (in the order the VM takes them) and ``header`` to exactly ``path``."""
    from safetensors.numpy import save_file

    save_file({name: np.require(a, requirements="C") for name, a in params.items()}, str(path), metadata=header)  # 0-d stays 0-d


def _check_params(params: dict[str, np.ndarray], facts: dict, library: Path) -> None:
    """The parameters still fit the build, and every routing map can be checked at load: write
    nothing the runtime would refuse."""
    where = f"export_library({str(library)!r})"
    if not facts:
        raise runtime.DeployError(f"{where}: this model records no deploy facts; build it with nesc.compile")
    unchecked = [n for n, kind in facts["kinds"].items() if kind == "route" and n not in facts["routes"]]
    if unchecked:
        raise runtime.DeployError(f"{where}: {unchecked[:3]} are trainable sampler indices, not frozen routing "
                                  f"maps, and cannot be checked at load; export nesc.freeze(gm) instead")
    if list(params) != facts["params"]:
        raise runtime.DeployError(f"{where}: the parameters {list(params)[:3]}... are not those the library was "
                                  f"built with ({facts['params'][:3]}...); compile the model again")
    runtime.check_tensors(params, facts, where, fix="Compile the model again, or restore the parameters it was built with.")
