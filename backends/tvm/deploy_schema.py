"""What a deploy parameters file must be, checked as untrusted input: its header's schema, the relations
between its entries, and its tensors' values. Part of the torch-free runtime (``runtime.py`` imports
it; copy both files to the device): standard library and numpy only, no torch, no nesc.

    FORMAT, FORMAT_VERSION   the file's format; an older version is refused with a re-export hint
    SCHEMA                   every JSON header entry: types, allowed strings, list lengths, keys
    decode_header            the header's entries decoded and checked against ``SCHEMA``, then the
                             relations types cannot say (a tensor entry per parameter, a route per
                             routing map, each route fitting its tensor and its pool)
    check_tensors            each tensor's dtype and shape, and every routing map (starts int32 in
                             [0, Op), [0, Ip), [0, Kh - kh], [0, Kw - kw]; fractions float32, finite, in
                             [0, 1]) and product map (starts ``(g, o)`` in [0, groups), [0, rows))
                             inside what it indexes: no kernel reads outside a pool

Every failure is a ``DeployError``, whatever the bytes.
"""

from __future__ import annotations

import json
import re
import reprlib
import sys

FORMAT = "nesc-tvm"
FORMAT_VERSION = "3"
# What an older version lacks: it is refused with a hint to re-export it.
OLDER_VERSIONS = {"1": "no content hash, routing maps unchecked", "2": "no regeneration mode"}
FACT_KEYS = ("params", "tensors", "inputs", "kinds", "routes", "regenerate")  # in the library and in the header
RAW_KEYS = ("format", "format_version", "library_sha256", "content_sha256")  # plain strings; the others JSON
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
KINDS = ("pool", "route", "dense")
MODES = ("once", "per_call")  # regenerate="once": the weights rebuilt at load; "per_call": in every call
DEVICES = ("cpu", "cuda")
FIX = "The file is damaged or was edited: export it again with CompiledModel.export_library."

# Inside a nesc program a DeployError is a NescError (``except NescError`` catches it); standalone,
# where importing nesc would import torch, it is a plain ValueError.
_ERRORS = sys.modules.get("nesc.core.errors")
_BASES = (_ERRORS.NescError, ValueError) if _ERRORS is not None else (ValueError,)


class DeployError(*_BASES):
    """An artifact that cannot be loaded (missing, mismatched, damaged, wrong format) or inputs that do not fit it."""


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
    # once: the library's regenerate function takes these parameters (pools, routing maps), in this order
    "regenerate": {"mode": MODES, "params": [_STR]},
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


def decode_header(header: dict, where: str) -> dict:
    """The header's entries decoded and checked against ``SCHEMA``: format and version first."""
    fmt, version = header.get("format"), header.get("format_version")
    if fmt == FORMAT and version in OLDER_VERSIONS:
        raise DeployError(f"{where} is a {FORMAT} v{version} file, written by an older nesc ({OLDER_VERSIONS[version]}); "
                          f"this nesc reads v{FORMAT_VERSION}: re-export it with this nesc (export_library)")
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
            raise DeployError(f"{where}: header entry {key!r} is not JSON ({type(e).__name__}). {FIX}") from None
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
    _check_regenerate(meta, where)
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


def _check_regenerate(meta: dict, where: str) -> None:
    """A ``once`` build regenerates from pools and routing maps (no product map: those read the
    layer's products), each once, in the parameters' order; a ``per_call`` build lifts none."""
    mode, lifted, params, kinds = meta["regenerate"]["mode"], meta["regenerate"]["params"], meta["params"], meta["kinds"]
    want = [n for n in params if n in set(lifted) and kinds[n] in ("pool", "route")
            and meta["routes"].get(n, {}).get("role") not in PRODUCT_ROLES]
    _expect(lifted == want and (mode == "once" or not lifted), where, "regenerate['params']",
            "distinct pools and routing maps (no product map) in the order of 'params', none for per_call", lifted)


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
        raise DeployError(f"{where}: header entry {key} must be {expected}; got {reprlib.repr(got)}. {FIX}")


# ------------------------------------------------------------------------------- tensor values


def check_tensors(params: dict, meta: dict, where: str, fix: str = FIX) -> None:
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
