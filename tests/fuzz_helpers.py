"""Reusable pieces for fuzzing the readers of nesc's files (deploy parameters, ``.nesc`` artifacts,
checkpoints): mutators, hypothesis strategies built on them, and a recorder of side effects.

* Mutators are plain functions, bytes in and bytes out (``flip``, ``truncate``, ``splice``), plus
  safetensors-aware ones (``set_metadata``, ``replace_tensors``) and JSON-aware ones (``json_paths``,
  ``replace_at``), so that a benchmark script can drive them with ``random`` as well.
* Strategies draw those mutations (``byte_mutations``, ``json_values``, ``json_edit``).
* ``audit(allowed)`` records, while it is active, what a reader should never do: open a path outside
  the folders it was given, start a process (``subprocess.Popen``, ``os.system``, ``os.exec*``,
  ``os.posix_spawn``, ``os.fork``), connect a socket, ``ctypes.dlopen`` a library outside them, or
  import a module that was not imported yet. Audit hooks cannot be removed: one hook is installed per
  process on first use and does nothing while no recorder is active.

Only numpy, safetensors and hypothesis are imported here (no torch, no nesc), so that a worker
process that must stay torch-free can import it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

# ------------------------------------------------------------------------------------ bytes


def flip(data: bytes, index: int, mask: int) -> bytes:
    """``data`` with byte ``index % len(data)`` XOR-ed with ``mask`` (1..255)."""
    if not data:
        return data
    i = index % len(data)
    return data[:i] + bytes([data[i] ^ (mask & 0xFF or 1)]) + data[i + 1:]


def truncate(data: bytes, length: int) -> bytes:
    return data[:max(0, length)]


def splice(data: bytes, at: int, insert: bytes = b"", delete: int = 0) -> bytes:
    """``data`` with ``delete`` bytes at ``at`` replaced by ``insert``."""
    at = min(max(0, at), len(data))
    return data[:at] + insert + data[at + delete:]


# ------------------------------------------------------------------------------ safetensors


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(the JSON header: tensor entries and ``__metadata__``, the bytes after it) of a safetensors file."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def metadata(data: bytes) -> dict[str, str]:
    return dict(split_safetensors(data)[0].get("__metadata__") or {})


def set_metadata(data: bytes, key: str, value: str | None) -> bytes:
    """The file with metadata entry ``key`` set to ``value`` (None: removed); tensors untouched."""
    header, body = split_safetensors(data)
    meta = dict(header.get("__metadata__") or {})
    if value is None:
        meta.pop(key, None)
    else:
        meta[key] = value
    return join_safetensors(header | {"__metadata__": meta}, body)


def replace_tensors(data: bytes, tensors: dict[str, np.ndarray | None], meta: dict[str, str] | None = None) -> bytes:
    """The file with ``tensors`` replaced (None: removed; a new name: added) and, if given, its metadata."""
    current = dict(load_safetensors(data))
    for name, array in tensors.items():
        if array is None:
            current.pop(name, None)
        else:
            current[name] = np.ascontiguousarray(array)
    return save_safetensors(current, metadata=metadata(data) if meta is None else meta)


# ------------------------------------------------------------------------------------- JSON


def json_paths(value, prefix: tuple = ()) -> list[tuple]:
    """The path (keys and indices) of every node of a decoded JSON value, the root ``()`` first."""
    out = [prefix]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        out += json_paths(item, prefix + (key,))
    return out


_DELETE = object()


def replace_at(value, path: tuple, new):
    """A copy of ``value`` with the node at ``path`` replaced by ``new`` (``DELETE``: removed)."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    head, rest = path[0], path[1:]
    if not rest and new is _DELETE:
        del copy[head]
    else:
        copy[head] = replace_at(copy[head], rest, new)
    return copy


DELETE = _DELETE

# ------------------------------------------------------------------------------- strategies

_EDGE_INTS = [0, 1, -1, 2**31 - 1, -(2**31), 2**31, 2**63 - 1, -(2**63), 10**30]


def json_values(max_leaves: int = 6) -> st.SearchStrategy:
    """Any JSON value, biased toward what breaks type checks: edge integers, bools, null, NaN and
    infinities (which Python's json writes and reads), odd strings, nested lists and dicts."""
    leaves = st.one_of(
        st.none(), st.booleans(), st.sampled_from(_EDGE_INTS), st.integers(-5, 40),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
        st.sampled_from(["float32", "int32", "object", "V8", "cpu", "cuda", "pool", "route", "starts", "fracs"]),
    )
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                                       max_size=3),
                        max_leaves=max_leaves)


@st.composite
def json_edit(draw, value):
    """``value`` (decoded JSON) with one node replaced by a drawn JSON value, or removed."""
    path = draw(st.sampled_from(json_paths(value)))
    new = draw(json_values() | st.just(DELETE)) if path else draw(json_values())
    return replace_at(value, path, new)


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """``data`` flipped at 1-8 places, truncated, or with bytes inserted or deleted; positions biased
    toward the first bytes (a safetensors header and its length) where one change does the most."""
    size = max(1, len(data))
    position = st.integers(0, size - 1) | st.integers(0, min(size - 1, 256))
    how = draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data = flip(data, draw(position), draw(st.integers(1, 255)))
        return data
    if how == "truncate":
        return truncate(data, draw(position))
    return splice(data, draw(position), draw(st.binary(max_size=16)), draw(st.integers(0, 16)))


# ------------------------------------------------------------------------------------ audit

# Events that are side effects whatever their arguments.
FORBIDDEN_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                    "os.forkpty", "pty.spawn", "socket.connect", "socket.bind", "os.startfile", "webbrowser.open")


class _Recorder:
    def __init__(self, allowed: list[Path]) -> None:
        self.allowed = [os.path.realpath(p) for p in allowed]
        self.modules = set(sys.modules)
        self.events: list[str] = []

    def outside(self, path) -> bool:
        if isinstance(path, int):  # an open file descriptor: not a new path
            return False
        real = os.path.realpath(os.fsdecode(path))
        return not any(real == a or real.startswith(a + os.sep) for a in self.allowed)

    def see(self, event: str, args: tuple) -> None:
        if event in FORBIDDEN_EVENTS:
            self.events.append(f"{event} {args[:2]!r}")
        elif event in ("open", "ctypes.dlopen") and args and args[0] is not None and self.outside(args[0]):
            if not (event == "open" and _python_source(args)):
                self.events.append(f"{event} {args[0]!r}")
        elif event == "import" and args[0] not in self.modules:
            self.events.append(f"import {args[0]}")


def _python_source(args: tuple) -> bool:
    """Python reading its own source for a warning's or a traceback's line (linecache): not the reader's doing."""
    path, mode = os.fsdecode(args[0]) if not isinstance(args[0], int) else "", str(args[1] or "r")
    return path.endswith((".py", ".pyc")) and not set(mode) & set("wax+")


_active: list[_Recorder] = []
_inside = [False]  # the hook's own calls (realpath) raise events too
_installed = [False]


def _hook(event: str, args: tuple) -> None:
    if not _active or _inside[0]:
        return
    _inside[0] = True
    try:
        _active[-1].see(event, args)
    except Exception as e:  # noqa: BLE001 - an audit hook that raises would break the audited call
        _active[-1].events.append(f"recorder failed on {event}: {e!r}")
    finally:
        _inside[0] = False


@contextlib.contextmanager
def audit(allowed: list[str | os.PathLike]) -> Iterator[list[str]]:
    """Record side effects (see the module docstring) inside the block; yields the list of events."""
    if not _installed[0]:
        sys.addaudithook(_hook)
        _installed[0] = True
    recorder = _Recorder([Path(p) for p in allowed])
    _active.append(recorder)
    try:
        yield recorder.events
    finally:
        _active.remove(recorder)
