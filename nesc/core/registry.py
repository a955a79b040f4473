"""One registry class for every kind of named thing (models, passes, datasets, backends, search).

Registering a name twice raises; looking up an unknown name raises and lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with loud failures.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("mlp")
    ... def mlp(): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot register an unnamed {self.kind}: pass name=...")
            self.add(key, obj)
            return obj

        return wrap

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise KeyError(
                f"{self.kind} {name!r} is already registered (by {self._items[name]!r}); "
                f"pick another name"
            )
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
