"""The tensor table of an artifact: which tensors a module holds, how they alias, and how they return.

Saving: every parameter and buffer under its ``state_dict`` name (``collect_tensors``), plus tensor
constants of the exported graph (``add_constants``), as contiguous CPU tensors, with a table entry
per name::

    {"kind": "parameter"|"buffer"|"constant", "requires_grad", "persistent", "stride", "alias_of"}

An exact alias (tied weights) is stored once and listed as ``alias_of`` its first name; a transposed
or channels_last tensor records its ``stride`` and gets it back. ``digest`` is the sha256 over the
stored tensors (name, dtype, shape and bytes, by name) that the header carries.

Loading: ``install_tensors`` registers the stored tensors at their dotted paths of a fresh module,
parameters as ``nn.Parameter`` (tied ones tied again), buffers as buffers; a table that disagrees with
the file raises ``codec.Invalid``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor, fx, nn

from nesc.core import compat
from nesc.core.errors import ArtifactError

from .schema import Invalid, check_path

_STORABLE_DTYPES = compat.safetensors_dtypes()


# ---------------------------------------------------------------------------------------- save


def collect_tensors(gm: nn.Module) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Every parameter and buffer as a contiguous CPU tensor, and the table that says how to restore it.

    An exact alias (same storage, offset, shape, stride, dtype: tied weights) becomes ``alias_of`` its
    first name and is stored once; any other tensor sharing storage is copied, since safetensors
    stores each tensor in its own bytes. Aliases map to their original's tensor in the result.
    """
    tensors: dict[str, Tensor] = {}
    table: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t, entry in _entries(gm):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if t.numel() > 0 and key in seen:
            entry["alias_of"] = seen[key]
        else:
            seen[key] = name
            tensors[name] = storable(t, shared=t.untyped_storage().data_ptr() in storages)
            storages.add(t.untyped_storage().data_ptr())
        table[name] = entry
    _check_storable(tensors)
    for name, entry in table.items():
        if "alias_of" in entry:
            tensors[name] = tensors[entry["alias_of"]]
    return tensors, table


def _entries(gm: nn.Module):
    """(name, tensor, table entry without aliasing) of every parameter and buffer, tied names included."""
    non_persistent = non_persistent_buffers(gm)
    for name, t in gm.named_parameters(remove_duplicate=False):
        yield name, t, {"kind": "parameter", "requires_grad": bool(t.requires_grad), **_layout(t)}
    for name, t in gm.named_buffers(remove_duplicate=False):
        yield name, t, {"kind": "buffer", **({"persistent": False} if name in non_persistent else {}), **_layout(t)}


def non_persistent_buffers(gm: nn.Module) -> set[str]:
    """Names of the buffers registered with ``persistent=False``: those ``state_dict`` leaves out.

    Both walks list every path of a module reachable under several names (``remove_duplicate=False``
    here, and ``state_dict`` never deduplicates), so a tied buffer is judged under each of its names.
    """
    persistent = gm.state_dict(keep_vars=True).keys()
    return {name for name, _ in gm.named_buffers(remove_duplicate=False) if name not in persistent}


def _layout(t: Tensor) -> dict[str, Any]:
    if t.numel() > 0 and not t.is_contiguous() and is_dense(t.shape, t.stride()):
        # A transposed or channels_last tensor is stored contiguous and gets its strides back on
        # load: kernels may sum in another order on another layout, and outputs must stay exact.
        return {"stride": list(t.stride())}
    return {}


def _check_storable(tensors: dict[str, Tensor]) -> None:
    unsupported = sorted({f"{n} ({t.dtype})" for n, t in tensors.items() if t.dtype not in _STORABLE_DTYPES})
    if unsupported:
        raise ArtifactError(
            f"cannot save: safetensors cannot store these tensors' dtypes: {', '.join(unsupported)}. Convert "
            f"them (e.g. dequantize) before saving."
        )


def is_dense(shape, stride) -> bool:
    """(shape, stride) is a permutation of a contiguous layout: no gaps, no overlap (size-1 dims free)."""
    expected = 1
    for size, step in sorted(zip(shape, stride), key=lambda p: p[1]):
        if size != 1:
            if step != expected:
                return False
            expected *= size
    return True


def storable(t: Tensor, *, shared: bool) -> Tensor:
    """``t`` on the CPU in bytes of its own: a view of a larger or shared storage is cloned."""
    t = t.detach().cpu()
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if shared or not whole or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def add_constants(exported: fx.GraphModule, tensors: dict[str, Tensor], table: dict[str, dict]):
    """Copies of (tensors, table) with the tensor constants the exporter lifted (a ``torch.tensor(...)``
    in forward) added as kind "constant"."""
    tensors, table = dict(tensors), dict(table)
    for node in exported.graph.nodes:
        if node.op != "get_attr" or node.target in table:
            continue
        value = _get_path(exported, node.target)
        if isinstance(value, Tensor):
            tensors[node.target] = storable(value, shared=True)
            table[node.target] = {"kind": "constant"}
    return tensors, table


def _get_path(root: nn.Module, path: str):
    obj = root
    for atom in path.split("."):
        obj = getattr(obj, atom, None)
    return obj


def without_aliases(tensors: dict[str, Tensor], table: dict[str, dict]) -> dict[str, Tensor]:
    """The tensors the file holds: aliases are not stored."""
    return {n: t for n, t in tensors.items() if "alias_of" not in table[n]}


def digest(tensors: dict[str, Tensor], header: dict[str, str] | None = None) -> str:
    """SHA-256 over the header entries (all but the digest itself, canonical JSON) and then every
    stored tensor's name, dtype, shape and bytes, by name: the whole content of the file. Format
    version 1 hashed the tensors only (``header=None``)."""
    h = hashlib.sha256()
    if header is not None:
        h.update(json.dumps(header, sort_keys=True, ensure_ascii=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy()  # raw little-endian bytes, any dtype
        h.update(json.dumps([name, str(t.dtype), list(t.shape), data.nbytes]).encode())
        h.update(data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- load


def install_tensors(gm: nn.Module, stored: dict[str, Tensor], table: dict) -> None:
    """Register every tensor of ``table`` on ``gm`` at its dotted path; raises ``Invalid`` when the
    table and the stored tensors disagree."""
    missing = sorted(n for n, e in table.items() if "alias_of" not in e and n not in stored)
    unlisted = sorted(set(stored) - set(table))
    if missing or unlisted:
        raise Invalid(f"tensor table and file disagree: listed but absent {missing}, unlisted {unlisted}")
    made: dict[str, Tensor] = {}
    for name in sorted(table, key=lambda n: "alias_of" in table[n]):  # originals before their aliases
        entry = table[name]
        check_path(name)
        source = entry.get("alias_of", name)
        if source not in made and source not in stored:
            raise Invalid(f"tensor {name!r} aliases {source!r}, which is not stored")
        parent, leaf = _parent_of(gm, name)
        value = made[source] if source in made else _with_layout(stored[source], entry.get("stride"), name)
        made[name] = _register(parent, leaf, value, entry, name)


def _parent_of(gm: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds ``name`` (created on the way) and the attribute name there."""
    *prefix, leaf = name.split(".")
    parent = gm
    for atom in prefix:
        if not hasattr(parent, atom):
            parent.add_module(atom, nn.Module())
        parent = getattr(parent, atom)
        if not isinstance(parent, nn.Module):
            raise Invalid(f"tensor path {name!r} runs through a non-module {atom!r}")
    if hasattr(parent, leaf):
        raise Invalid(f"tensor {name!r} is listed twice or clashes with a module attribute")
    return parent, leaf


def _register(parent: nn.Module, leaf: str, value: Tensor, entry: dict, name: str) -> Tensor:
    kind = entry.get("kind")
    if kind == "parameter":
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=bool(entry.get("requires_grad", True)))
        parent.register_parameter(leaf, value)
    elif kind == "buffer":
        parent.register_buffer(leaf, value.detach(), persistent=entry.get("persistent", True))
    elif kind == "constant":
        setattr(parent, leaf, value)
    else:
        raise Invalid(f"tensor {name!r} has unknown kind {kind!r}")
    return value


def _with_layout(t: Tensor, stride, name: str) -> Tensor:
    if stride is None:
        return t
    if not (isinstance(stride, list) and len(stride) == t.dim() and all(type(d) is int and d >= 0 for d in stride)
            and is_dense(t.shape, stride)):
        raise Invalid(f"tensor {name!r}: stride {stride!r} is not a dense layout of shape {tuple(t.shape)}")
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype)
    out.copy_(t)
    return out
