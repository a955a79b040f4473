"""The model registry: every reference model is a factory plus the facts a caller needs to run it.

A :class:`ModelSpec` records the input shape (without the batch dimension), the number of classes,
a reduced ``test_input_shape`` for fast tests, and a family name. Factories register themselves with
``@register_model`` when their file is imported; ``nesc.models`` imports every model file, so

>>> from nesc.models import create_model, get_spec
>>> spec = get_spec("resnet18_cifar")
>>> model = spec.create().eval()
>>> logits = model(*spec.example_inputs(2))  # (2, 10)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nesc.core.registry import Registry

ModelFactory = Callable[..., nn.Module]


def _check_shape(field: str, name: str, shape: object) -> None:
    if not isinstance(shape, tuple) or not shape:
        raise TypeError(
            f"model {name!r}: {field} must be a non-empty tuple of ints without the batch "
            f"dimension, e.g. (3, 224, 224); got {shape!r}"
        )
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"model {name!r}: every size in {field} must be a positive int; got {shape!r}")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its factory and what its inputs and outputs look like.

    ``input_shape`` and ``test_input_shape`` exclude the batch dimension. ``test_input_shape`` has
    the same rank as ``input_shape``; it is a smaller size that every model in the registry also
    accepts (all of them pool globally before the head), used where speed matters more than realism.
    """

    name: str
    factory: ModelFactory
    input_shape: tuple[int, ...]
    num_classes: int
    test_input_shape: tuple[int, ...]
    family: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a model name must be a non-empty string; got {self.name!r}")
        if not callable(self.factory):
            raise TypeError(f"model {self.name!r}: factory must be callable; got {self.factory!r}")
        _check_shape("input_shape", self.name, self.input_shape)
        _check_shape("test_input_shape", self.name, self.test_input_shape)
        if len(self.test_input_shape) != len(self.input_shape):
            raise ValueError(
                f"model {self.name!r}: test_input_shape {self.test_input_shape} must have the same "
                f"rank as input_shape {self.input_shape}"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"model {self.name!r}: num_classes must be an int >= 1; got {self.num_classes!r}")
        if not isinstance(self.family, str) or not self.family:
            raise ValueError(f"model {self.name!r}: family must be a non-empty string; got {self.family!r}")

    def create(self, **kwargs: object) -> nn.Module:
        """Build a fresh model; ``num_classes`` defaults to the spec's, any kwarg overrides it."""
        return self.factory(**{"num_classes": self.num_classes, **kwargs})

    def example_inputs(self, batch: int = 1, *, test: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Deterministic standard-normal inputs of shape ``(batch, *input_shape)``.

        ``test=True`` uses ``test_input_shape``. The same ``seed`` always gives the same tensors.
        """
        if batch < 1:
            raise ValueError(f"model {self.name!r}: batch must be >= 1; got {batch}")
        shape = self.test_input_shape if test else self.input_shape
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn((batch, *shape), generator=generator),)

    def make_targets(self, batch: int, seed: int = 0) -> torch.Tensor:
        """Deterministic random class indices in ``[0, num_classes)``, shape ``(batch,)``, int64."""
        if batch < 1:
            raise ValueError(f"model {self.name!r}: batch must be >= 1; got {batch}")
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.num_classes, (batch,), generator=generator)


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    test_input_shape: tuple[int, ...] | None = None,
    family: str,
) -> Callable[[ModelFactory], ModelFactory]:
    """Register a factory under ``name``; the factory is returned unchanged.

    ``test_input_shape`` defaults to ``input_shape`` (for models whose inputs are already small).
    Registering a name twice raises ``KeyError``.
    """

    def wrap(factory: ModelFactory) -> ModelFactory:
        spec = ModelSpec(
            name=name,
            factory=factory,
            input_shape=tuple(input_shape),
            num_classes=num_classes,
            test_input_shape=tuple(test_input_shape) if test_input_shape is not None else tuple(input_shape),
            family=family,
        )
        MODELS.add(name, spec)
        return factory

    return wrap


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; an unknown name raises ``KeyError`` listing the valid ones."""
    return MODELS.get(name)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered under ``name``; kwargs go to its factory."""
    return get_spec(name).create(**kwargs)


def dense_params(name: str, **kwargs: object) -> int:
    """Parameters of the model registered under ``name`` built with ``kwargs``: the budget that
    compresses a wider model to this one's size, ``NESConfig(param_budget=dense_params("cnn1d"))`` for
    ``create_model("cnn1d", width_mult=2)``. Building it leaves the global random generator as it was."""
    with torch.random.fork_rng(devices=[]):
        return sum(p.numel() for p in create_model(name, **kwargs).parameters())


def list_models() -> list[str]:
    """Every registered model name, sorted."""
    return MODELS.names()
