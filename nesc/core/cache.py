"""The regenerated-weight cache: a sampled weight is rebuilt only when what it is built from changes.

In inference (``torch.no_grad()`` / ``torch.inference_mode()``, or tensors that need no gradient), a
sampler or a frozen ``nesc.regenerate`` node returns the weight it built last time if every tensor it
reads is the same object at the same version: the version counter that every in-place write bumps
(an optimizer step, ``copy_``, ``load_state_dict``), so a cached weight can never be stale. A
training forward never reads the cache: its weight must be part of the autograd graph.

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
# id(owner tensor) -> (weakrefs of the inputs, their versions, the static key, the weight). The owner
# is the tensor unique to one weight (its starts); a finalizer drops the entry when it dies.
_entries: dict[int, tuple[tuple, tuple[int, ...], Hashable, Tensor]] = {}


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
        refs, old_versions, old_static, weight = entry
        if old_versions == versions and old_static == static and all(r() is t for r, t in zip(refs, inputs)):
            return weight
    weight = build()
    if id(owner) not in _entries:
        weakref.finalize(owner, _entries.pop, id(owner), None)
    _entries[id(owner)] = (tuple(weakref.ref(t) for t in inputs), versions, static, weight)
    return weight


def _usable(inputs: tuple[Tensor, ...]) -> bool:
    """Plain eager tensors in a forward that records no gradient for them."""
    if not _enabled or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return False
    return all(type(t) in (Tensor, torch.nn.Parameter) and t.device.type != "meta" for t in inputs)
