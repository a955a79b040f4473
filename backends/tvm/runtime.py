"""Run an exported nesc model with TVM and numpy only: no torch, no nesc.

A deployed model is two files side by side, both written by ``CompiledModel.export_library``:

    model.so                    the compiled kernels and the Relax VM program (``export_library``)
    model.params.safetensors    the parameters: epitome pools, routing maps and the weights that
                                stayed dense (never a regenerated dense weight), plus metadata:
                                input names/shapes/dtypes, parameter order, the SHA-256 of model.so

Parameters stay out of the library so that the library is the same for every trained copy of a
model, and so that the file a device stores is inspectable (safetensors, never pickle).

This file imports nothing from nesc (whose package imports torch): copy it next to the model and

    python runtime.py model.so                        # run once on random inputs, print shape and time
    python runtime.py model.so --input x.npy --output y.npy

or ``load("model.so")(x)`` from Python. tvm_ffi imports torch eagerly whenever it is installed (a
workaround for a symbol clash on Windows); run as a script, this file keeps torch out so that the
process is what a device without torch runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

FORMAT = "nesc-tvm"
FORMAT_VERSION = "1"
PARAMS_SUFFIX = ".params.safetensors"


# Inside a nesc program a DeployError is a NescError (``except NescError`` catches it); standalone,
# where importing nesc would import torch, it is a plain ValueError.
_ERRORS = sys.modules.get("nesc.core.errors")
_BASES = (_ERRORS.NescError, ValueError) if _ERRORS is not None else (ValueError,)


class DeployError(*_BASES):
    """An artifact that cannot be loaded (missing, mismatched, wrong format) or inputs that do not fit it."""


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, its shape (None for the batch dimension when it is dynamic), its dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])

    def example(self, batch: int = 1, seed: int = 0):
        import numpy as np

        shape = tuple(batch if d is None else d for d in self.shape)
        return np.random.default_rng(seed).standard_normal(shape).astype(self.dtype)


def params_path(library: str | os.PathLike) -> Path:
    """``model.so`` -> ``model.params.safetensors`` (next to it)."""
    library = Path(library)
    return library.with_name(library.stem + PARAMS_SUFFIX)


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_params(library: str | os.PathLike, params: dict, meta: dict) -> Path:
    """Write the parameters (name -> numpy array, in the order the VM takes them) next to ``library``."""
    from safetensors.numpy import save_file

    path = params_path(library)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_sha256": sha256(library),
              "params": json.dumps(list(params))} | {key: json.dumps(value) for key, value in meta.items()}
    save_file({name: _contiguous(a) for name, a in params.items()}, str(path), metadata=header)
    return path


def _contiguous(array):
    import numpy as np

    return np.ascontiguousarray(array)


# ---------------------------------------------------------------------------------------- running


class Runner:
    """Calls the VM's ``main`` with checked inputs followed by the parameters, returns numpy arrays.

    Shared by the in-process ``CompiledModel`` and the standalone ``Deployed``: one calling convention.
    """

    def __init__(self, module, params: list, inputs: tuple[InputSpec, ...], device_kind: str, where: str) -> None:
        import tvm
        from tvm import relax

        self.inputs, self.where = inputs, where
        self.device = tvm.device(device_kind, 0)
        self.vm = relax.VirtualMachine(module, self.device)
        self.params = [tvm.runtime.tensor(_contiguous(p), self.device) for p in params]

    def __call__(self, *inputs):
        import tvm

        arrays = check_inputs(inputs, self.inputs, self.where)
        out = self.vm["main"](*(tvm.runtime.tensor(a, self.device) for a in arrays), *self.params)
        return _unpack(out)


def check_inputs(inputs: tuple, specs: tuple[InputSpec, ...], where: str) -> list:
    """numpy (or torch: read through ``.detach().cpu().numpy()``) inputs that fit ``specs``, or a DeployError."""
    import numpy as np

    if len(inputs) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise DeployError(f"{where} takes {len(specs)} input(s) ({names}); got {len(inputs)}")
    arrays = []
    for k, (x, spec) in enumerate(zip(inputs, specs)):
        a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        if str(a.dtype) != spec.dtype:
            raise DeployError(f"{where}: input {k} ({spec.name}) has dtype {a.dtype}, expected {spec.dtype}; "
                              f"cast it, e.g. x.astype(numpy.{spec.dtype})")
        fits = a.ndim == len(spec.shape) and all(d is None or d == n for d, n in zip(spec.shape, a.shape))
        if not fits:
            want = "x".join("B" if d is None else str(d) for d in spec.shape)
            raise DeployError(f"{where}: input {k} ({spec.name}) has shape {'x'.join(map(str, a.shape))}, "
                              f"expected {want}" + (" (B: any batch size)" if None in spec.shape else "")
                              + "; rebuild with matching example inputs for other shapes")
        arrays.append(np.ascontiguousarray(a))
    return arrays


def _unpack(out):
    """VM results -> numpy: one array, or a tuple of them (a one-element tuple is unwrapped)."""
    if hasattr(out, "numpy"):
        return out.numpy()
    items = tuple(_unpack(o) for o in out)
    return items[0] if len(items) == 1 else items


# ---------------------------------------------------------------------------------------- loading


class Deployed:
    """An exported model loaded from disk: ``Deployed(...)(x) -> numpy``."""

    def __init__(self, library: Path, params: dict, meta: dict, device: str) -> None:
        import tvm

        self.library = library
        self.meta = meta
        self.input_specs = tuple(InputSpec.from_json(d) for d in meta["inputs"])
        self.kinds: dict[str, str] = meta["kinds"]
        self.params = params
        self._runner = Runner(tvm.runtime.load_module(str(library)), list(params.values()), self.input_specs,
                              device, f"model {library.name}")

    def __call__(self, *inputs):
        return self._runner(*inputs)

    @property
    def param_bytes(self) -> int:
        return sum(a.nbytes for a in self.params.values())

    @property
    def artifact_bytes(self) -> int:
        return self.library.stat().st_size + params_path(self.library).stat().st_size


def read_params(library: str | os.PathLike) -> tuple[dict, dict]:
    """(name -> array in VM order, metadata) of the parameters file next to ``library``; checked."""
    from safetensors import safe_open

    library, path = Path(library), params_path(library)
    for p, what in ((library, "compiled library"), (path, "parameters file")):
        if not p.is_file():
            raise DeployError(f"{what} {str(p)!r} not found; an exported model is {library.name} plus "
                              f"{path.name} in the same folder (CompiledModel.export_library writes both)")
    with safe_open(str(path), framework="numpy") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise DeployError(f"{str(path)!r} is not a {FORMAT} v{FORMAT_VERSION} parameters file "
                              f"(format {header.get('format')!r}, version {header.get('format_version')!r}); "
                              f"export it again with this version of nesc")
        if header["library_sha256"] != sha256(library):
            raise DeployError(f"{str(path)!r} was written for another build of {library.name} (SHA-256 differs); "
                              f"copy both files from the same export_library call")
        order = json.loads(header["params"])
        params = {name: f.get_tensor(name) for name in order}
    meta = {key: json.loads(value) for key, value in header.items()
            if key not in ("format", "format_version", "library_sha256", "params")}
    return params, meta


def load(library: str | os.PathLike, device: str | None = None) -> Deployed:
    """Load ``model.so`` and ``model.params.safetensors``; ``device`` defaults to the one built for."""
    params, meta = read_params(library)
    return Deployed(Path(library), params, meta, device or meta.get("device", "cpu"))


# ------------------------------------------------------------------------------------ command line


def _keep_torch_out() -> None:
    """Make ``import torch`` fail, as on a device without it (tvm_ffi tries it eagerly at import)."""

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"{name} is kept out of the nesc TVM runtime", name=name)
            return None

    sys.meta_path.insert(0, _NoTorch())
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="run an exported nesc model (model.so + model.params.safetensors)")
    parser.add_argument("library", help="the .so written by export_library")
    parser.add_argument("--input", action="append", default=[], metavar="NPY", help="one .npy per model input")
    parser.add_argument("--output", metavar="NPY", help="write the (first) output here")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the random inputs (no --input)")
    parser.add_argument("--device", help="cpu or cuda (default: what the model was built for)")
    args = parser.parse_args(argv)
    import numpy as np

    try:
        model = load(args.library, args.device)
        inputs = ([np.load(p) for p in args.input] if args.input
                  else [s.example(args.batch) for s in model.input_specs])
        start = time.perf_counter()
        out = model(*inputs)
        ms = (time.perf_counter() - start) * 1e3
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = out[0] if isinstance(out, tuple) else out
    if args.output:
        np.save(args.output, first)
    print(f"{Path(args.library).name}: output {'x'.join(map(str, first.shape))} {first.dtype} in {ms:.2f} ms; "
          f"{model.artifact_bytes:,} bytes on disk ({model.param_bytes:,} of parameters)")
    return 0


if __name__ == "__main__":
    _keep_torch_out()
    sys.exit(main())
