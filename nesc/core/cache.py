"""The regenerated-weight cache: a sampled weight is rebuilt only when what it is built from changes.

In inference (``torch.no_grad()`` / ``torch.inference_mode()``, or tensors that need no gradient), a
sampler or a frozen ``nesc.regenerate`` node returns the weight it built last time if every tensor it
reads is the same object at the same version: the version counter that every in-place write bumps
(an optimizer step, ``copy_``, ``load_state_dict``), so a cached weight can never be stale. The weight
itself must be unwritten too (its own version; an inference tensor has none, and nothing outside
inference mode can write it), so a consumer that writes into it in place cannot leave a wrong one
behind. A ``nesc.dequantize`` node (``nesc.core.quant``) caches a quantized pool the same way, keyed
on the stored values and scales: the regenerate nodes reading it then see the same pool every call.
Inputs without a version counter (inference tensors) are never cached. A training forward never
reads the cache: its weight must be part of the autograd graph.

Memory: one dense weight per sampled layer stays alive, as large as the dense model's. Deployments that
cannot afford it switch the cache off (``nesc.weight_cache(False)``, as a call or a ``with`` block) and
pay the regeneration on every forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from .compat import version_counter

_enabled = True
# id(owner tensor) -> (weakrefs of the inputs, their versions, the static key, the weight, its version or
# None for an inference tensor). The owner is the tensor unique to one weight (its starts; a quantized
# pool's values); a finalizer drops the entry when it dies.
_entries: dict[int, tuple[tuple, tuple[int, ...], Hashable, Tensor, int | None]] = {}


class _Switch:
    """``weight_cache(False)`` switches the cache off; ``with weight_cache(False):`` only for the block."""

    def __init__(self, enabled: bool) -> None:
        global _enabled
        self.previous, _enabled = _enabled, bool(enabled)
        if not _enabled:
            _entries.clear()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        global _enabled
        _enabled = self.previous


def weight_cache(enabled: bool = True) -> _Switch:
    """Switch the regenerated-weight cache on (the default) or off, globally or for a ``with`` block."""
    return _Switch(enabled)


def cache_enabled() -> bool:
    return _enabled


def cached(owner: Tensor, inputs: tuple[Tensor, ...], static: Hashable, build: Callable[[], Tensor]) -> Tensor:
    """``build()``, or the weight it returned for the same ``inputs`` (same objects, same versions) and
    ``static`` key, when the cache applies (see the module docstring); ``owner`` names the entry."""
    if not _usable(inputs):
        return build()
    versions = tuple(version_counter(t) for t in inputs)
    static = (static, torch.is_inference_mode_enabled())
    entry = _entries.get(id(owner))
    if entry is not None:
        refs, old_versions, old_static, weight, written = entry
        if (old_versions == versions and old_static == static and written == _own_version(weight)
                and all(r() is t for r, t in zip(refs, inputs))):
            return weight
    weight = build()
    if id(owner) not in _entries:
        weakref.finalize(owner, _entries.pop, id(owner), None)
    _entries[id(owner)] = (tuple(weakref.ref(t) for t in inputs), versions, static, weight, _own_version(weight))
    return weight


def _own_version(weight: Tensor) -> int | None:
    return None if weight.is_inference() else version_counter(weight)


def _usable(inputs: tuple[Tensor, ...]) -> bool:
    """Plain eager tensors with version counters, in a forward that records no gradient for them."""
    if not _enabled or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return False
    return all(type(t) in (Tensor, torch.nn.Parameter) and t.device.type != "meta" and not t.is_inference()
               for t in inputs)
