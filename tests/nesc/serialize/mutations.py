"""Mutations of a saved artifact, as a fuzzer (or an attacker) makes them: shared by the bounded
property test in the suite (``test_fuzz.py``) and the long run in ``benchmarks/fuzz_loaders.py``.

``mutate(data, rng)`` returns new file bytes. 40% of the mutations work on the raw bytes (flips,
truncation, splices: most die at the container or the digest); the others decode the file (format 3:
the documents inflated, the tensors unpacked), edit one thing a schema must catch — a value deep
inside a header document or the tensor layout, a node name, a call target, a tensor's values, dtype or
shape — and write it back packed as before with the digest recomputed, so the checks behind the digest
are what gets tested; a few damage format 3's compressed documents or packed data themselves (bit
flips, truncation, trailing bytes, a decompression bomb).
"""

from __future__ import annotations

import functools
import json
import random
import struct
import zlib

import fuzz_helpers as fh
import torch

from nesc.serialize import container
from nesc.serialize.tensors import digest
from serialize_cases import decode_artifact, encode_artifact

DOCUMENTS = ("graph", "tensors", "input_specs", "extra", "layout", "trainable")
NASTY_STRINGS = [
    "", "self", "x\rimport os", 'a"),__import__("os").system("id"),("', "__class__", "aten::from_file.default",
    "operator.attrgetter", "builtins.eval", "..", "a..b", "nesc::regenerate.default", "aten::relu_.default",
    "/etc/passwd", "0", "class", "€", "\x00", "$node", "$float", "inf", "nan", "$dtype", "cuda:99",
]
NASTY_NUMBERS = [0, -1, 1, 2, 3, 2**31, -(2**31) - 1, 2**63, 10**30, 1e308, -1e308, 0.5, float("inf")]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One mutated copy of the artifact ``data``."""
    if rng.random() < 0.4:
        return _raw(data, rng)
    try:
        meta, tensors = _unpack(data)
    except Exception:  # noqa: BLE001 - an already-broken input: mutate its bytes instead
        return _raw(data, rng)
    choice = rng.random()
    if choice < 0.07 and meta.get("format_version") in ("3", "4", "5"):
        return _damage_packing(data, rng)
    if choice < 0.7:
        key = rng.choice([k for k in DOCUMENTS if k in meta] or list(meta))
        meta[key] = _edit_text(meta[key], rng)
    else:
        _edit_tensor(tensors, rng)
    # an attacker recomputes the digest; a layout edit stays in the file, a tensor edit gets a new layout
    return _pack(meta, tensors, rehash=rng.random() < 0.9, keep_layout=choice < 0.7)


# ------------------------------------------------------------------------------------ raw bytes

def _raw(data: bytes, rng: random.Random) -> bytes:
    """fuzz_helpers' byte mutators, driven by ``rng``; plus a forged safetensors header length."""
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data = fh.flip(data, rng.randrange(max(len(data), 1)), 1 << rng.randrange(8))
        return data
    if kind == 1:
        return fh.truncate(data, rng.randrange(len(data) + 1))
    if kind == 2:
        return fh.splice(data, rng.randrange(len(data) + 1), rng.randbytes(rng.randint(1, 64)))
    if kind == 3 and len(data) > 16:  # the 8-byte header length
        n = rng.choice([0, 1, len(data), len(data) * 2, 2**63 - 1, rng.randrange(len(data))])
        return struct.pack("<Q", n) + data[8:]
    i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
    return fh.splice(data, i, data[i:j][::-1], delete=j - i)


# ------------------------------------------------------------------------------ structured edits

def _unpack(data: bytes) -> tuple[dict, dict]:
    """(header entries with the documents inflated, stored tensors by name), any format version."""
    return decode_artifact(data)


def _pack(meta: dict, tensors: dict, *, rehash: bool = True, keep_layout: bool = False) -> bytes:
    return encode_artifact(meta, tensors, rehash=rehash, keep_layout=keep_layout)


def _damage_packing(data: bytes, rng: random.Random) -> bytes:
    """Format 3's two byte tensors themselves edited, the digest recomputed: a damaged or bombed zlib
    stream, or packed data that no longer matches its layout."""
    from safetensors.torch import load, save

    (n,) = struct.unpack("<Q", data[:8])
    meta, blobs = dict(json.loads(data[8 : 8 + n])["__metadata__"]), dict(load(data))
    name = rng.choice(sorted(blobs))
    raw = blobs[name].numpy().tobytes()
    kind = rng.randrange(5)
    if kind == 0:
        raw = fh.flip(raw, rng.randrange(max(len(raw), 1)), 1 << rng.randrange(8))
    elif kind == 1:
        raw = raw[: rng.randrange(len(raw) + 1)]
    elif kind == 2:
        raw += rng.randbytes(rng.randint(1, 16))
    elif kind == 3:
        raw = _bomb()
    else:
        raw = zlib.compress(rng.choice([b"", b"[]", b"{}", b'{"graph": 1}', "€".encode(), b"\xff\xfe"]))
    blobs[name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    meta["sha256"] = digest(blobs, {k: v for k, v in meta.items() if k != "sha256"})
    return save(blobs, metadata=meta)


@functools.lru_cache(maxsize=1)
def _bomb() -> bytes:
    """A zlib stream of ~64 KiB that inflates past ``container.MAX_DOCUMENTS_BYTES``."""
    return zlib.compress(bytes(container.MAX_DOCUMENTS_BYTES + 1024), 9)


def _edit_text(text: str, rng: random.Random) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return text[: rng.randrange(len(text) + 1)]
    if rng.random() < 0.05:
        return "[" * rng.choice([64, 1000, 100_000]) + "]" * rng.choice([0, 64, 1000, 100_000])
    return json.dumps(_edit_value(doc, rng, depth=0))


def _edit_value(value, rng: random.Random, depth: int):
    """Walk down to one random place of a JSON document and replace, delete or duplicate it."""
    children = list(value.items()) if isinstance(value, dict) else list(enumerate(value)) if isinstance(value, list) else []
    if children and (depth < 2 or rng.random() < 0.75):
        key, child = rng.choice(children)
        if isinstance(value, dict) and rng.random() < 0.1:  # rename a key
            value[rng.choice(NASTY_STRINGS)] = value.pop(key)
            return value
        if rng.random() < 0.08:  # delete or duplicate
            if isinstance(value, dict):
                del value[key]
            elif rng.random() < 0.5:
                del value[key]
            else:
                value.insert(key, json.loads(json.dumps(child)))
            return value
        value[key] = _edit_value(child, rng, depth + 1)
        return value
    return _random_json(rng, value)


def _random_json(rng: random.Random, like):
    choice = rng.randrange(8)
    if choice == 0:
        return rng.choice(NASTY_STRINGS)
    if choice == 1:
        return rng.choice(NASTY_NUMBERS) if not isinstance(like, (int, float)) or isinstance(like, bool) else \
            like + rng.choice([-1, 1, 2**31, -(2**31)])
    if choice == 2:
        return None
    if choice == 3:
        return not like if isinstance(like, bool) else True
    if choice == 4:
        return [like, like] if like is not None else []
    if choice == 5:
        return {rng.choice(["$node", "$tuple", "$dict", "$float", "$slice", "$device", "$dtype", "$eval"]):
                rng.choice(NASTY_STRINGS + [[], [1, 2, 3], None])}
    if choice == 6 and isinstance(like, str):
        return like + rng.choice(NASTY_STRINGS)
    return {"a": like}


def _edit_tensor(tensors: dict, rng: random.Random) -> None:
    if not tensors:
        return
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    kind = rng.randrange(6)
    if kind == 0:  # values, same dtype and shape
        flat = t.reshape(-1).clone()
        if flat.numel():
            i = rng.randrange(flat.numel())
            if t.is_floating_point():
                flat[i] = rng.choice([float("nan"), float("inf"), -1.0, 2.0, 1e30])
            elif t.dtype == torch.bool:
                flat[i] = not bool(flat[i])
            else:  # the dtype's extremes and a few values, clamped into its range
                info = torch.iinfo(t.dtype)
                flat[i] = max(info.min, min(info.max, rng.choice([-(2**31), -1, 0, 1, 7, 2**20, 2**31 - 1])))
        tensors[name] = flat.reshape(t.shape)
    elif kind == 1:
        tensors[name] = t.to(rng.choice([torch.int64, torch.float64, torch.int8, torch.float16, torch.bool]))
    elif kind == 2 and t.dim():
        tensors[name] = t.reshape(-1)[: max(0, t.numel() - 1)].clone()
    elif kind == 3:
        tensors[name] = torch.zeros((*t.shape, 2), dtype=t.dtype)
    elif kind == 4:
        del tensors[name]
    else:
        tensors[rng.choice(NASTY_STRINGS[:6]) or "x"] = t.clone()
