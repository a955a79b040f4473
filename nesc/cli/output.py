"""Machine-readable output of the verbs (``--json``) and the FLOP cross-check (``summary --flops``).

``--json`` prints one JSON document on stdout and nothing else there (``nesc.cli.main`` silences the
human console): the report's ``to_dict()``, sizes in bytes, paths, and each stage's seconds.

``flop_count`` counts a model's floating-point operations with ``torch.utils.flop_counter`` (the
counter other PyTorch tools use), so that nesc's MAdd column can be compared with them: for the ops
nesc counts (convolutions, linear layers, matmuls against a weight) FLOPs = 2 x MAdd. The counter also
sees ops nesc does not count (attention's matmuls of activations against activations) and does not
see nesc's own custom ops (weight regeneration, reported as "regen MAdd", and the interpolation
additions of a shared product map, reported as "adds").
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def emit_json(doc: Mapping) -> None:
    """``doc`` as one JSON document on stdout (paths as strings, tuples as lists, NaN/inf as null)."""
    sys.stdout.write(json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def flop_count(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict:
    """FLOPs of one forward of ``model`` on ``inputs`` per example (``torch.utils.flop_counter``), in
    total and by aten op, and the MAdd they correspond to (FLOPs / 2)."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was)
    by_op = {str(op).removeprefix("aten."): int(n) // batch for op, n in counter.get_flop_counts().get("Global", {}).items()}
    flops = counter.get_total_flops() // batch
    return {"counter": "torch.utils.flop_counter.FlopCounterMode", "flops": flops, "madd": flops // 2,
            "by_op": by_op}
