"""The pipelines, as data: ordered (name, pass) lists. Passes are registered by name.

A pass is ``GraphModule -> PassResult``; the ones that need the config take it as a second argument
and are bound with ``functools.partial`` when a pipeline runs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from nesc.core.config import NESConfig
from nesc.core.registry import Registry

from .decompose_regenerate import decompose_regenerate
from .epitomize import epitomize
from .find_weights import find_weights
from .freeze import freeze
from .functionalize import functionalize
from .plan_pools import plan_pools

PASSES: Registry[Callable[..., PassResult]] = Registry("pass")
for _fn in (functionalize, find_weights, plan_pools, epitomize, freeze):
    PASSES.add(_fn.__name__, _fn)
# Not part of TRANSFORM or FREEZE: the ONNX exporter runs it on a copy of a frozen model.
PASSES.add(decompose_regenerate.__name__, decompose_regenerate)

TRANSFORM: list[str] = [
    "functionalize",  # one form for every weight (get_attr -> functional op) before anything reads them
    "find_weights",  # needs that form; runs shape propagation
    "plan_pools",  # needs find_weights' meta
    "epitomize",  # needs the plan; deletes the dense weights it replaces
    "find_weights",  # refresh: weights are now sampler outputs, which the report and freeze read
]

FREEZE: list[str] = [
    "freeze",  # samplers -> routing maps + nesc.regenerate nodes
    "find_weights",  # refresh the meta for the frozen form
]


def run(gm: fx.GraphModule, steps: list[str], config: NESConfig | None = None) -> fx.GraphModule:
    """Run the named passes in order; a pass that takes a config gets ``config``."""
    for name in steps:
        fn = PASSES.get(name)
        if "config" in inspect.signature(fn).parameters:
            if config is None:
                raise ValueError(f"pass {name!r} needs a NESConfig")
            fn = functools.partial(fn, config=config)
        gm = fn(gm).graph_module
    return gm
