"""Run an exported nesc model with TVM and numpy only (no torch, no nesc): copy this file to the device and

    python runtime.py model.so                        # run once on random inputs, print shape and time
    python runtime.py model.so --input x.npy --output y.npy

or ``load("model.so")(x)``. ``export_library`` writes ``model.so`` (kernels and VM program, with the
build's facts compiled in: ``MANIFEST``) and ``model.params.safetensors``: pools, routing maps and
dense leftovers (never pickle), under a header with the same facts (dtypes, shapes, inputs, and each
routing map's pool and valid range), the SHA-256 of model.so and ``content_sha256``.

The parameters file is untrusted input. ``read_params`` checks it against ``SCHEMA`` and raises
``DeployError``, nothing else, whatever its bytes: format and version, every entry's type, the
library's SHA-256 (a mismatched library is refused before native code is loaded), the content hash,
each tensor's dtype and shape, and every routing map against its pool (starts int32 in [0, Op),
[0, Ip), [0, Kh - kh], [0, Kw - kw]; fractions float32, finite, in [0, 1]) and every product map
(``passes.reuse``'s) against its products (starts ``(g, o)`` int32 in [0, groups), [0, rows);
fractions as above): no kernel reads outside a pool or the products computed from it. ``load``
also compares the library's facts with the header's (a header edited to widen a range, its hash
recomputed, is refused). A ``.so`` is native code by nature: loading one runs its code, so
load only libraries you trust. nesc writes both files through ``nesc.core.files`` (``export.py``),
which a lone copy of this file cannot import. Run as a script, it keeps torch (which tvm_ffi imports
whenever installed) out, as on a device without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

FORMAT = "nesc-tvm"
FORMAT_VERSION = "2"
PARAMS_SUFFIX = ".params.safetensors"
MANIFEST = "deploy_manifest"  # the library's function that returns its build facts, as JSON
FACT_KEYS = ("params", "tensors", "inputs", "kinds", "routes")  # in the library and in the header
RAW_KEYS = ("format", "format_version", "library_sha256", "content_sha256")  # plain strings; the others JSON
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
KINDS = ("pool", "route", "dense")
DEVICES = ("cpu", "cuda")
_FIX = "The file is damaged or was edited: export it again with CompiledModel.export_library."

# Inside a nesc program a DeployError is a NescError (``except NescError`` catches it); standalone,
# where importing nesc would import torch, it is a plain ValueError.
_ERRORS = sys.modules.get("nesc.core.errors")
_BASES = (_ERRORS.NescError, ValueError) if _ERRORS is not None else (ValueError,)


class DeployError(*_BASES):
    """An artifact that cannot be loaded (missing, mismatched, damaged, wrong format) or inputs that do not fit it."""


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
    """Calls the VM's ``main`` with checked inputs followed by the parameters, returns numpy arrays;
    shared by the in-process ``CompiledModel`` and the standalone ``Deployed``."""

    def __init__(self, module, params: list, inputs: tuple[InputSpec, ...], device_kind: str, where: str) -> None:
        import numpy as np
        import tvm
        from tvm import relax

        self.inputs, self.where = inputs, where
        self.device = tvm.device(device_kind, 0)
        self.vm = relax.VirtualMachine(module, self.device)
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(p), self.device) for p in params]

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


class Deployed:
    """An exported model loaded from disk, ``Deployed(...)(x) -> numpy``: made by ``load``, which checks first."""

    def __init__(self, library: Path, params: dict, meta: dict, device: str) -> None:
        self.library, self.meta, self.params = library, meta, params
        self.input_specs = tuple(InputSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in meta["inputs"])
        self.kinds: dict[str, str] = meta["kinds"]
        where = f"model {library.name}"
        try:  # TVM raises its own error classes (RuntimeError, ValueError, ...): all mean "cannot load"
            import tvm
            from tvm import relax

            module = tvm.runtime.load_module(str(library))
            facts = json.loads(str(relax.VirtualMachine(module, tvm.device(device, 0))[MANIFEST]()))
            self._runner = Runner(module, list(params.values()), self.input_specs, device, where)
        except Exception as e:  # noqa: BLE001 - re-raised as the one error a caller handles
            raise DeployError(f"{where}: TVM cannot load {str(library)!r} on {device!r} ({type(e).__name__}: "
                              f"{str(e).strip()[:300]}); export it again for this device") from e
        changed = [key for key in FACT_KEYS if not isinstance(facts, dict) or facts.get(key) != meta[key]]
        if changed:
            raise DeployError(f"{where}: the parameters file's {', '.join(changed)} differ from what {library.name} "
                              f"was built with (its header was edited). {_FIX}")

    def __call__(self, *inputs):
        return self._runner(*inputs)

    @property
    def param_bytes(self) -> int:
        return sum(a.nbytes for a in self.params.values())

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
            meta = _header(header, where)
            if header["library_sha256"] != sha256(library):
                raise DeployError(f"{where} was written for another build of {library.name} (SHA-256 differs); "
                                  f"copy both files from the same export_library call")
            if names != set(meta["params"]):
                raise DeployError(f"{where}: tensors {sorted(names ^ set(meta['params']))[:5]} are missing or "
                                  f"not listed in its header. {_FIX}")
            params = {name: f.get_tensor(name) for name in meta["params"]}
    except DeployError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, RecursionError, MemoryError) as e:
        raise DeployError(f"{where} cannot be read as safetensors ({type(e).__name__}: {str(e)[:200]}). {_FIX}") from e
    if header["content_sha256"] != content_sha256(header, params):
        raise DeployError(f"{where}: its contents do not match their SHA-256 (content_sha256). {_FIX}")
    check_tensors(params, meta, where)
    return params, meta


def check_tensors(params: dict, meta: dict, where: str, fix: str = _FIX) -> None:
    """Each tensor has the recorded dtype and shape; each routing map stays inside its pool."""
    import numpy as np

    for name, a in params.items():
        want = meta["tensors"][name]
        if str(a.dtype) != want["dtype"] or list(a.shape) != want["shape"]:
            raise DeployError(f"{where}: tensor {name!r} is {a.dtype} {list(a.shape)}; the build expects "
                              f"{want['dtype']} {want['shape']}. {fix}")
    for name, route in meta["routes"].items():
        a = params[name]
        if route["role"] in STARTS_ROLES:
            bad, expected = (a < 0) | (a > np.asarray(route["max"])), f"in [0, {route['max']}] per coordinate"
        else:
            bad, expected = ~np.isfinite(a) | (a < 0) | (a > 1), "finite and in [0, 1]"
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            if route["role"] in PRODUCT_ROLES:  # (row, coordinate) of the starts, (row,) of the fractions
                what, where_in = "product map", f"row {at[0]}" + (f", coordinate {at[1]}" if len(at) > 1 else "")
                target = f"the {'x'.join(map(str, route['products']))} products of pool {route['pool']!r}"
            else:
                what, where_in = "routing map", f"block ({at[0]}, {at[1]}), coordinate {at[2]}"
                target = f"pool {route['pool']!r}"
            raise DeployError(f"{where}: {what} {name!r} ({route['role']} into {target}) has {a[at]} at {where_in}; "
                              f"expected {expected}, or a kernel would read outside the pool. {fix}")


# ------------------------------------------------------------------------------- header schema


def _is(doc: str, test):
    test.__doc__ = doc  # what _describe says the value must be
    return test


_STR = _is("a string", lambda v: isinstance(v, str))
_NAT = _is("an int >= 0", lambda v: type(v) is int and 0 <= v < 2**31)  # bool is an int subclass: excluded
_POS = _is("an int >= 1", lambda v: _NAT(v) and v >= 1)
_DIM = _is("an int >= 1 or null", lambda v: v is None or _POS(v))
_POOL = _is("a pool's name or null", lambda v: v is None or isinstance(v, str))
_HEX64 = _is("64 hex digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None)
# A schema: a predicate, a tuple of allowed strings, [s] (a list of s), [s1, ..., sn] (exactly n
# items), {str: s} (names -> s) or {key: s, ...} (exactly these keys).
_STARTS = {"role": ("starts",), "pool": _POOL, "pool_shape": [_POS] * 4, "grid": [_POS] * 2, "max": [_NAT] * 4}
_FRACS = {k: v for k, v in _STARTS.items() if k != "max"} | {"role": ("fracs",)}
# A product map (passes.reuse): per row of output channels, (group, pool row) into the groups x rows
# products one op computed with the pool's rows (pool: that pool, or null), and the row's fraction.
_ROWS = _is("a list of exactly 1 int >= 1", lambda v: isinstance(v, list) and len(v) == 1 and _POS(v[0]))
_PRODUCT_STARTS = {"role": ("product_starts",), "pool": _POOL, "grid": _ROWS, "products": [_POS] * 2,
                   "max": [_NAT] * 2}
_PRODUCT_FRACS = {k: v for k, v in _PRODUCT_STARTS.items() if k != "max"} | {"role": ("product_fracs",)}
ROUTE_SCHEMAS = {"starts": _STARTS, "fracs": _FRACS, "product_starts": _PRODUCT_STARTS,
                 "product_fracs": _PRODUCT_FRACS}
STARTS_ROLES = ("starts", "product_starts")  # int32 indices with a max; the others are fractions
PRODUCT_ROLES = ("product_starts", "product_fracs")
_ROUTE = _is("{role: starts, pool, pool_shape: 4 ints, grid: 2 ints, max: 4 ints} or the same for fracs, no max; "
             "or {role: product_starts, pool, grid: 1 int, products: 2 ints, max: 2 ints} or the same for "
             "product_fracs, no max",
             lambda v: isinstance(v, dict) and isinstance(v.get("role"), str) and v["role"] in ROUTE_SCHEMAS
             and _fits(v, ROUTE_SCHEMAS[v["role"]]))
SCHEMA = {
    "params": [_STR], "kinds": {str: KINDS}, "device": DEVICES, "target": {"name": _STR, "tvm": _STR},
    "tensors": {str: {"dtype": DTYPES, "shape": [_NAT]}},
    "inputs": [{"name": _STR, "shape": [_DIM], "dtype": DTYPES}],
    "routes": {str: _ROUTE},
}


def _fits(v, spec) -> bool:
    if callable(spec):
        return spec(v)
    if isinstance(spec, tuple):
        return isinstance(v, str) and v in spec
    if isinstance(spec, list):
        items = spec * len(v) if len(spec) == 1 and isinstance(v, list) else spec
        return isinstance(v, list) and len(v) == len(items) and all(_fits(x, s) for x, s in zip(v, items))
    if list(spec) == [str]:
        return isinstance(v, dict) and all(_fits(x, spec[str]) for x in v.values())
    return isinstance(v, dict) and set(v) == set(spec) and all(_fits(v[k], s) for k, s in spec.items())


def _describe(spec) -> str:
    if callable(spec) or isinstance(spec, tuple):
        return spec.__doc__ if callable(spec) else "one of " + "|".join(spec)
    if isinstance(spec, list):
        return f"a list of {_describe(spec[0])}" if len(spec) == 1 else f"{len(spec)} x {_describe(spec[0])}"
    return "{" + ", ".join(f"{'name' if k is str else k}: {_describe(s)}" for k, s in spec.items()) + "}"


def _header(header: dict, where: str) -> dict:
    """The header's entries decoded and checked against ``SCHEMA``: format and version first."""
    fmt, version = header.get("format"), header.get("format_version")
    if fmt == FORMAT and version == "1":
        raise DeployError(f"{where} is a {FORMAT} v1 file, written by an older nesc (no content hash, routing maps "
                          f"unchecked); this nesc reads v{FORMAT_VERSION}: re-export it with this nesc (export_library)")
    if fmt != FORMAT or version != FORMAT_VERSION:
        raise DeployError(f"{where} is not a {FORMAT} v{FORMAT_VERSION} parameters file (format {reprlib.repr(fmt)}, "
                          f"version {reprlib.repr(version)}); export it again with this version of nesc")
    keys = set(RAW_KEYS) | set(SCHEMA)
    _expect(set(header) == keys, where, "names", f"exactly {sorted(keys)}", sorted(header))
    meta = {}
    for key, spec in SCHEMA.items():
        try:
            meta[key] = json.loads(header[key])
        except (ValueError, RecursionError) as e:
            raise DeployError(f"{where}: header entry {key!r} is not JSON ({type(e).__name__}). {_FIX}") from None
        _expect(_fits(meta[key], spec), where, key, _describe(spec), meta[key])
    for key in ("library_sha256", "content_sha256"):
        _expect(_HEX64(header[key]), where, key, _HEX64.__doc__, header[key])
    _check_relations(meta, where)
    return meta


def _check_relations(meta: dict, where: str) -> None:
    """What types cannot say: an entry per parameter, a route per routing map, fitting its tensor and pool."""
    params, kinds, tensors, routes = meta["params"], meta["kinds"], meta["tensors"], meta["routes"]
    _expect(len(set(params)) == len(params), where, "params", "unique names", params)
    for key in ("kinds", "tensors"):
        _expect(set(meta[key]) == set(params), where, key, "one entry per name of 'params'", sorted(meta[key]))
    maps = sorted(n for n in params if kinds[n] == "route")
    _expect(sorted(routes) == maps, where, "routes", f"one entry per routing map (kind 'route'): {maps}", sorted(routes))
    for name, r in routes.items():
        if r["role"] in PRODUCT_ROLES:
            _check_product_route(name, r, kinds, tensors, where)
            continue
        want = {"dtype": "int32" if r["role"] == "starts" else "float32", "shape": r["grid"] + [4]}
        _expect(tensors[name] == want, where, f"tensors[{name!r}]", f"{want}, as its route says", tensors[name])
        pool = r["pool"]
        _expect(pool is None or (kinds.get(pool) == "pool" and tensors[pool]["shape"] == r["pool_shape"]), where,
                f"routes[{name!r}]['pool']", f"null or a pool of shape {r['pool_shape']}", pool)
        _expect(all(m < p for m, p in zip(r.get("max", ()), r["pool_shape"])), where, f"routes[{name!r}]['max']",
                f"below the pool's shape {r['pool_shape']}", r.get("max"))


def _check_product_route(name: str, r: dict, kinds: dict, tensors: dict, where: str) -> None:
    """A product map's starts are int32 (rows, 2), its fractions float32 (rows,); its range is inside
    its products; its pool, when named, is a pool with that many rows."""
    starts = r["role"] == "product_starts"
    want = {"dtype": "int32" if starts else "float32", "shape": r["grid"] + ([2] if starts else [])}
    _expect(tensors[name] == want, where, f"tensors[{name!r}]", f"{want}, as its route says", tensors[name])
    pool, rows = r["pool"], r["products"][1]
    _expect(pool is None or (kinds.get(pool) == "pool" and tensors[pool]["shape"][:1] == [rows]), where,
            f"routes[{name!r}]['pool']", f"null or a pool of {rows} rows", pool)
    _expect(all(m < p for m, p in zip(r.get("max", ()), r["products"])), where, f"routes[{name!r}]['max']",
            f"below its products {r['products']}", r.get("max"))


def _expect(ok: bool, where: str, key: str, expected: str, got) -> None:
    if not ok:
        raise DeployError(f"{where}: header entry {key} must be {expected}; got {reprlib.repr(got)}. {_FIX}")


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
