"""Run an exported nesc model with TVM and numpy only (no torch, no nesc): copy this file and
``deploy_schema.py`` (the file format and its checks) to the device, side by side, and

    python runtime.py model.so                        # run once on random inputs, print shape and time
    python runtime.py model.so --input x.npy --output y.npy

or ``load("model.so")(x)``. ``export_library`` writes ``model.so`` (kernels and VM program, with the
build's facts compiled in: ``MANIFEST``) and ``model.params.safetensors``: pools, routing maps and
dense leftovers (never pickle), under a header with the same facts (dtypes, shapes, inputs, each
routing map's pool and valid range, the regeneration mode), the SHA-256 of model.so and
``content_sha256``. A ``regenerate="once"`` build's library also has ``REGENERATE``: ``load`` runs it
once, after every check below, and calls ``main`` with the weights it made (``Runner``).

The parameters file is untrusted input. ``read_params`` checks it (``deploy_schema``) and raises
``DeployError``, nothing else, whatever its bytes: format and version, every entry's type, the
library's SHA-256 (a mismatched library is refused before native code is loaded), the content hash,
each tensor's dtype and shape, and every routing map against its pool (starts int32 in [0, Op),
[0, Ip), [0, Kh - kh], [0, Kw - kw]; fractions float32, finite, in [0, 1]) and every product map
(``passes.reuse``'s) against its products (starts ``(g, o)`` int32 in [0, groups), [0, rows);
fractions as above): no kernel reads outside a pool or the products computed from it. ``load``
also compares the library's facts with the header's (a header edited to widen a range, its hash
recomputed, is refused). A ``.so`` is native code by nature: loading one runs its code, so
load only libraries you trust. nesc writes both files through ``nesc.core.files`` (``export.py``),
which a copy of the runtime cannot import. Run as a script, it keeps torch (which tvm_ffi imports
whenever installed) out, as on a device without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path


def _sibling(name: str):
    """``name``.py next to this file, for a copy outside the nesc package (run as a script or loaded by
    its path), where the relative import has no package to import from."""
    import importlib.util

    path = Path(__file__).with_name(f"{name}.py")
    if not path.is_file():
        raise ImportError(f"the nesc TVM runtime needs {path.name} next to {Path(__file__).name}: copy both files")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __package__:
    from . import deploy_schema as schema
else:
    schema = _sibling("deploy_schema")

# The file format and its checks live in deploy_schema.py; these names are the runtime's API too.
DeployError, check_tensors = schema.DeployError, schema.check_tensors
FORMAT, FORMAT_VERSION, FACT_KEYS, RAW_KEYS, SCHEMA = (schema.FORMAT, schema.FORMAT_VERSION, schema.FACT_KEYS,
                                                        schema.RAW_KEYS, schema.SCHEMA)
PARAMS_SUFFIX = ".params.safetensors"
MANIFEST = "deploy_manifest"  # the library's function that returns its build facts, as JSON
REGENERATE = "regenerate"  # a regenerate="once" library's function: (pools, routing maps) -> weights


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, its shape (None for the batch dimension when it is dynamic), its dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def example(self, batch: int = 1, seed: int = 0):
        import numpy as np

        shape = tuple(batch if d is None else d for d in self.shape)
        return np.random.default_rng(seed).standard_normal(shape).astype(self.dtype)


def params_path(library: str | os.PathLike) -> Path:
    """``model.so`` -> ``model.params.safetensors`` (next to it)."""
    return Path(library).with_name(Path(library).stem + PARAMS_SUFFIX)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(header: dict[str, str], params: dict) -> str:
    """SHA-256 over the header's entries (but this one) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    entries = json.dumps({k: v for k, v in header.items() if k != "content_sha256"}, sort_keys=True)
    for record in [entries] + [json.dumps([n, str(a.dtype), list(a.shape)]) for n, a in params.items()]:
        h.update(len(record.encode()).to_bytes(8, "little") + record.encode())  # length-prefixed: unambiguous
    for a in params.values():
        h.update(a.tobytes())  # C order, whatever the array's layout
    return h.hexdigest()


class Runner:
    """Calls the VM's ``main`` with checked inputs followed by its parameters, returns numpy arrays;
    shared by the in-process ``CompiledModel`` and the standalone ``Deployed``.

    ``params`` (name -> array, in ``main``'s order) is consumed: each array is dropped from it once it is
    on the device, so that the host copies go as the device copies come. ``regenerate``: the build's
    ``{"mode", "params"}``. In a ``once`` build ``main`` takes the other parameters, then the weights that
    the library's ``REGENERATE`` function makes from ``params`` (pools and routing maps):
    ``regenerate()`` runs it, once, and keeps its outputs as the workspace ``main`` reads; the pools and
    maps are released then."""

    def __init__(self, module, params: dict, inputs: tuple[InputSpec, ...], device_kind: str, where: str,
                 regenerate: dict) -> None:
        import numpy as np
        import tvm
        from tvm import relax

        self.inputs, self.where = inputs, where
        self.device = tvm.device(device_kind, 0)
        self.vm = relax.VirtualMachine(module, self.device)
        # np.require, not np.ascontiguousarray, which makes a 0-d parameter 1-d (DeBERTa's lifted scale)
        on_device = {name: tvm.runtime.tensor(np.require(params.pop(name), requirements="C"), self.device)
                     for name in list(params)}
        lifted = regenerate["params"]
        self.params = [a for name, a in on_device.items() if name not in set(lifted)]
        self._pending = [on_device[name] for name in lifted]  # REGENERATE's inputs, until it has run

    def regenerate(self) -> None:
        """Rebuild the weights of a ``once`` build into the workspace (nothing to do otherwise, or again)."""
        if self._pending:
            weights = self.vm[REGENERATE](self._pending)
            self.params += list(weights)
            self._pending = []

    def __call__(self, *inputs):
        import tvm

        arrays = check_inputs(inputs, self.inputs, self.where)
        self.regenerate()
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


class Deployed:
    """An exported model loaded from disk, ``Deployed(...)(x) -> numpy``: made by ``load``, which checks
    first, and whose ``params`` it moves to the device (the dict is emptied). A ``regenerate="once"``
    build rebuilds its weights here, after every check."""

    def __init__(self, library: Path, params: dict, meta: dict, device: str) -> None:
        self.library, self.meta = library, meta
        self.input_specs = tuple(InputSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in meta["inputs"])
        self.kinds: dict[str, str] = meta["kinds"]
        self.regenerate: str = meta["regenerate"]["mode"]
        self.param_bytes = sum(a.nbytes for a in params.values())  # the arrays live on the device only
        where = f"model {library.name}"
        try:  # TVM raises its own error classes (RuntimeError, ValueError, ...): all mean "cannot load"
            import tvm
            from tvm import relax

            module = tvm.runtime.load_module(str(library))
            facts = json.loads(str(relax.VirtualMachine(module, tvm.device(device, 0))[MANIFEST]()))
            self._runner = Runner(module, params, self.input_specs, device, where, meta["regenerate"])
        except Exception as e:  # noqa: BLE001 - re-raised as the one error a caller handles
            raise DeployError(f"{where}: TVM cannot load {str(library)!r} on {device!r} ({type(e).__name__}: "
                              f"{str(e).strip()[:300]}); export it again for this device") from e
        changed = [key for key in FACT_KEYS if not isinstance(facts, dict) or facts.get(key) != meta[key]]
        if changed:
            raise DeployError(f"{where}: the parameters file's {', '.join(changed)} differ from what {library.name} "
                              f"was built with (its header was edited). {schema.FIX}")
        try:  # the first kernels to run: every routing map was checked by read_params, the facts just now
            self._runner.regenerate()
        except Exception as e:  # noqa: BLE001 - as above
            raise DeployError(f"{where}: TVM cannot rebuild the weights on {device!r} ({type(e).__name__}: "
                              f"{str(e).strip()[:300]}); export it again for this device") from e

    def __call__(self, *inputs):
        return self._runner(*inputs)

    @property
    def artifact_bytes(self) -> int:
        return self.library.stat().st_size + params_path(self.library).stat().st_size


def load(library: str | os.PathLike, device: str | None = None) -> Deployed:
    """Load ``model.so`` and ``model.params.safetensors``; ``device`` defaults to the one built for.
    Every failure is a ``DeployError``. The library is native code: load only ones you trust."""
    params, meta = read_params(library)
    return Deployed(Path(library), params, meta, device or meta["device"])


def read_params(library: str | os.PathLike) -> tuple[dict, dict]:
    """(name -> array in VM order, metadata) of the parameters file next to ``library``, every check
    of the module docstring made but the library's facts (which need it loaded)."""
    from safetensors import SafetensorError, safe_open

    library, path = Path(library), params_path(library)
    where = f"parameters file {str(path)!r}"
    if library.suffix != ".so":
        raise DeployError(f"compiled library {str(library)!r} must end in .so (TVM loads libraries by suffix)")
    for p, what in ((library, "compiled library"), (path, "parameters file")):
        try:
            regular = stat.S_ISREG(os.stat(p).st_mode)
        except OSError:
            regular = None
        if not regular:
            raise DeployError(f"{what} {str(p)!r} {'not found' if regular is None else 'is not a regular file'}; an "
                              f"exported model is {library.name} plus {path.name} in the same folder, two regular "
                              f"files (CompiledModel.export_library writes both)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header, names = f.metadata() or {}, set(f.keys())
            meta = schema.decode_header(header, where)
            if header["library_sha256"] != sha256(library):
                raise DeployError(f"{where} was written for another build of {library.name} (SHA-256 differs); "
                                  f"copy both files from the same export_library call")
            if names != set(meta["params"]):
                raise DeployError(f"{where}: tensors {sorted(names ^ set(meta['params']))[:5]} are missing or "
                                  f"not listed in its header. {schema.FIX}")
            params = {name: f.get_tensor(name) for name in meta["params"]}
    except DeployError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, RecursionError, MemoryError) as e:
        raise DeployError(f"{where} cannot be read as safetensors ({type(e).__name__}: {str(e)[:200]}). {schema.FIX}") from e
    if header["content_sha256"] != content_sha256(header, params):
        raise DeployError(f"{where}: its contents do not match their SHA-256 (content_sha256). {schema.FIX}")
    check_tensors(params, meta, where)
    return params, meta


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
    parser.add_argument("--output", metavar="NPY", help="write the (first) output here, a new file")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the random inputs (no --input)")
    parser.add_argument("--device", help="cpu or cuda (default: what the model was built for)")
    args = parser.parse_args(argv)
    import numpy as np

    try:  # every error, the model's (DeployError is a ValueError) or a file's (--input, --output), exits 2
        model = load(args.library, args.device)
        inputs = [np.load(p) for p in args.input] or [s.example(args.batch) for s in model.input_specs]
        start = time.perf_counter()
        out = model(*inputs)
        ms = (time.perf_counter() - start) * 1e3
        first = out[0] if isinstance(out, tuple) else out
        if args.output:  # a new file only (never over a file, a link or a device), removed if writing fails
            with open(args.output, "xb") as f:
                try:
                    np.save(f, first)
                except OSError:
                    os.unlink(args.output)
                    raise
    except (OSError, ValueError, EOFError) as e:  # EOFError: np.load of an empty --input file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{Path(args.library).name}: output {'x'.join(map(str, first.shape))} {first.dtype} in {ms:.2f} ms; "
          f"{model.artifact_bytes:,} bytes on disk ({model.param_bytes:,} of parameters)")
    return 0


if __name__ == "__main__":
    _keep_torch_out()
    sys.exit(main())
