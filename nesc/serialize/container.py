"""The bytes of a format-3 artifact: the header documents compressed, the tensors packed, so that a
file costs about what it stores.

A format-2 file kept each header document as a JSON string in the safetensors metadata and each
tensor as a named safetensors entry. Both cost more than the tensors themselves for small models:
the graph JSON is ~100 bytes a node (and is escaped once more inside the safetensors header), and
every entry is ~85 bytes of header (two routing maps per sampled layer). resnet_fmnist at ratio 4
stored 77,884 bytes in a 120,916-byte file: 2.86x smaller than the dense model saved the same way,
against 3.99x fewer stored parameters. Format 3 is a safetensors file of two ``uint8`` tensors:

    metadata    format, format_version, nesc_version, torch_version, sha256: plain strings, read first
    documents   zlib of the JSON object {"graph", "tensors", "input_specs", "extra", "layout"}, each
                value the JSON text of that document (the first four are format 2's header entries)
    data        the stored tensors' bytes back to back, in the order of "layout": [[name, dtype,
                shape], ...] (native = little-endian byte order, as safetensors stores them)

Why this and not less (measured on the registry models at ratio 4, ``benchmarks/bench_artifact.py``):
compressing the documents alone (as base64 metadata) leaves resnet_fmnist at 3.54x and cnn1d at
3.49x, since the per-tensor entries stay; packing the tensors as well gives 3.75x / 3.65x. The tensors
are not compressed: trained float pools gain ~7% from zlib, while a fresh model's constant batch-norm
statistics would vanish and make a file ratio measure initialisation instead of the encoding.
The documents stay JSON text, so what ``unpack`` returns meets exactly format 2's schema checks.

A file may come from anyone: ``unpack`` inflates at most ``MAX_DOCUMENTS_BYTES`` (``zlib.decompressobj``
with ``max_length``: a bomb is refused after that much output, never inflated whole), parses the
layout through its schema and requires the tensors to tile ``data`` exactly before it slices anything.
The loader checks the digest, which covers every metadata entry and both tensors, before ``unpack``.
"""

from __future__ import annotations

import json
import math
import zlib

import torch
from torch import Tensor

from nesc.core import compat

from . import schema
from .schema import Invalid

DOCUMENTS = ("graph", "tensors", "input_specs", "extra")  # the header documents of format 2, in order
# Format 5, a model that still trains: its samplers, plan and config (``trainable``); absent otherwise.
OPTIONAL_DOCUMENTS = ("trainable",)
LAYOUT = "layout"
BLOBS = ("documents", "data")  # the safetensors tensors of a format-3 file
# Inflated documents: resnet_fmnist's are ~32 KB (110 nodes); this allows graphs of ~200,000 nodes.
MAX_DOCUMENTS_BYTES = 64 << 20
MAX_DIMS = 16
_DTYPES = {str(d).removeprefix("torch."): d for d in compat.safetensors_dtypes()}


def pack(documents: dict[str, str], stored: dict[str, Tensor]) -> dict[str, Tensor]:
    """The two tensors of a format-3 file holding ``documents`` (JSON texts, keys ``DOCUMENTS``) and the
    contiguous CPU tensors ``stored``."""
    names = sorted(stored)
    layout = [[n, str(stored[n].dtype).removeprefix("torch."), list(stored[n].shape)] for n in names]
    kept = (*DOCUMENTS, *(k for k in OPTIONAL_DOCUMENTS if k in documents))
    text = json.dumps({**{k: documents[k] for k in kept}, LAYOUT: json.dumps(layout, separators=(",", ":"))},
                      separators=(",", ":"), ensure_ascii=False)
    raw = [stored[n].detach().contiguous().reshape(-1).view(torch.uint8) for n in names]  # (nbytes,) each
    data = torch.cat(raw) if raw else torch.zeros(0, dtype=torch.uint8)
    return {"documents": _bytes_tensor(zlib.compress(text.encode(), 9)), "data": data}


def _bytes_tensor(b: bytes) -> Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)


def unpack(blobs: dict[str, Tensor]) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(documents as JSON texts by name, "layout" included; stored tensors by name) of a format-3 file's
    tensors; ``Invalid`` says what is off. Each tensor comes back in memory of its own (torch's aligned
    allocator)."""
    if sorted(blobs) != sorted(BLOBS):
        raise Invalid(f"a format-3 file holds exactly the tensors {list(BLOBS)}, this one {sorted(blobs)[:8]}")
    for name, t in blobs.items():
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise Invalid(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}; format 3 stores bytes (uint8, 1-D)")
    documents = _documents(inflate(blobs["documents"].numpy().tobytes(), MAX_DOCUMENTS_BYTES))
    layout = _layout(documents[LAYOUT], blobs["data"].numel())
    return documents, _slices(blobs["data"], layout)


def inflate(data: bytes, limit: int) -> str:
    """The text a zlib stream holds, if it inflates to at most ``limit`` bytes. Output stops at
    ``limit + 1`` bytes (``max_length``), so a bomb costs that much memory and no more."""
    stream = zlib.decompressobj()
    try:
        out = stream.decompress(data, limit + 1)
    except zlib.error as e:
        raise Invalid(f"the documents are not a zlib stream ({e})") from None
    if len(out) > limit or stream.unconsumed_tail:
        raise Invalid(f"the documents inflate to more than {limit:,} bytes (nesc.serialize.container."
                      f"MAX_DOCUMENTS_BYTES): a decompression bomb, or a graph far larger than any nesc writes")
    if not stream.eof or stream.unused_data:
        raise Invalid("the documents' zlib stream is truncated or followed by other bytes")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid(f"the documents are not UTF-8 text ({e})") from None


def _documents(text: str) -> dict[str, str]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise Invalid(f"the documents are not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    keys = (*DOCUMENTS, LAYOUT)
    if isinstance(doc, dict):
        keys += tuple(k for k in OPTIONAL_DOCUMENTS if k in doc)
    if not isinstance(doc, dict) or sorted(doc) != sorted(keys):
        got = sorted(doc)[:8] if isinstance(doc, dict) else type(doc).__name__
        raise Invalid(f"the documents must be an object with the keys {list(keys)} (and optionally "
                      f"{list(OPTIONAL_DOCUMENTS)}), got {got}")
    for key in keys:
        schema.check_type(doc[key], str, f"document {key!r} (JSON text)")
    return doc


def _layout(text: str, nbytes: int) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    """(name, dtype, shape, bytes) of every stored tensor, in order, once their sizes add up to ``nbytes``."""
    try:
        layout = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise Invalid(f"the layout is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    schema.check_depth(layout, "the layout")
    schema.check_type(layout, list, "the layout")
    out, seen, total = [], set(), 0
    for entry in layout:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise Invalid(f"layout entry {str(entry)[:80]} is not [name, dtype, shape]")
        name, dtype, shape = entry
        schema.check_path(name, "layout entry")
        if name in seen:
            raise Invalid(f"layout lists tensor {name!r} twice")
        if not (isinstance(dtype, str) and dtype in _DTYPES):
            raise Invalid(f"tensor {name!r}: dtype {str(dtype)[:40]!r} is not one safetensors stores")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(type(d) is int and d >= 0 for d in shape)):
            raise Invalid(f"tensor {name!r}: shape {str(shape)[:80]} is not a list of at most {MAX_DIMS} sizes >= 0")
        size = math.prod(shape) * _DTYPES[dtype].itemsize  # Python ints: a forged shape cannot overflow
        total += size
        if total > nbytes:
            break
        seen.add(name)
        out.append((name, _DTYPES[dtype], tuple(shape), size))
    if total != nbytes:
        raise Invalid(f"the layout's tensors need {total:,}{'+' if total > nbytes else ''} bytes, the data holds "
                      f"{nbytes:,}: they must tile it exactly")
    return out


def _slices(data: Tensor, layout) -> dict[str, Tensor]:
    tensors, start = {}, 0
    for name, dtype, shape, size in layout:
        raw = data[start : start + size].clone()  # memory of its own, aligned: kernels stay bit-exact
        start += size
        if dtype == torch.bool and bool((raw > 1).any()):
            raise Invalid(f"tensor {name!r}: a bool byte is neither 0 nor 1")
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors
