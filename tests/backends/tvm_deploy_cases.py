"""Compiled registry models shared by the TVM build and runtime tests (compiling takes seconds, so
each (model, target) is built once per test session)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import fx, nn

import nesc
from helpers import registry_inputs, transformed_registry

pytest.importorskip("tvm", reason="the TVM backend needs the tvm extra: pip install -e '.[tvm]'")

from nesc.backends.tvm.build import CompiledModel, compile  # noqa: E402

# Small registry models: the lowering and the build are the same code for the big ones.
SMALL_MODELS = ("mlp", "cnn1d")


@functools.lru_cache(maxsize=None)
def frozen_registry(name: str) -> tuple[nn.Module, fx.GraphModule]:
    """(dense model in eval mode, frozen epitome model) for a registry model at ratio 4."""
    model, gm = transformed_registry(name)
    return model.eval(), nesc.freeze(gm)


@functools.lru_cache(maxsize=None)
def compiled_registry(name: str, target: str = "llvm", dense: bool = False, dynamic_batch: bool = False) -> CompiledModel:
    model, frozen = frozen_registry(name)
    return compile(model if dense else frozen, registry_inputs(name), target, dynamic_batch=dynamic_batch)


def eager(module: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return module(*inputs)
