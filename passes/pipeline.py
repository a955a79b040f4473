"""The pipelines, as data: ordered lists of pass names, run by torch.fx's ``PassManager``.

Every pass is a ``NescPass`` (``passes/infra.py``) registered by name in ``PASSES``. ``build`` turns a
list of names into a ``PassManager`` whose passes are constructed once, with the ``NESConfig`` bound
then for the passes that declare ``needs_config``; the manager lints the graph before the first pass
and after each one, and each pass checks its own ``requires``/``ensures``. A failure keeps its own
exception type (``PlanError`` stays a ``PlanError``) and carries a note naming the failing pass and
the passes that ran before it.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_manager import PassManager

from nesc.core.config import NESConfig
from nesc.core.errors import ConfigError
from nesc.core.registry import Registry

from .decompose_regenerate import DecomposeRegenerate
from .epitomize import Epitomize
from .find_weights import FindWeights
from .fold_batchnorm import FoldBatchNorm
from .freeze import Freeze
from .functionalize import Functionalize
from .infra import NescPass
from .plan_pools import PlanPools
from .reuse import Reuse

PASSES: Registry[type[NescPass]] = Registry("pass")
for _cls in (Functionalize, FindWeights, PlanPools, Epitomize, Freeze, Reuse, FoldBatchNorm, DecomposeRegenerate):
    PASSES.add(_cls.name, _cls)
# decompose_regenerate is in no pipeline here: the ONNX exporter runs it on a copy of a frozen model.

TRANSFORM: list[str] = [
    "functionalize",  # one form for every weight (get_attr -> functional op) before anything reads them
    "find_weights",  # needs that form; runs shape propagation
    "plan_pools",  # needs find_weights' meta
    "epitomize",  # needs the plan; deletes the dense weights it replaces
    "find_weights",  # refresh: weights are now sampler outputs, which the report and freeze read
]

FREEZE: list[str] = [
    "freeze",  # samplers -> routing maps + nesc.regenerate nodes
    "find_weights",  # refresh the meta for the frozen form, which reuse reads
    "reuse",  # fold input channels wherever the routing map makes it exact
    "find_weights",  # refresh again: folded ops have fewer input channels
]

# nesc.freeze(gm, fold_batchnorm=True) appends these: after reuse, which leaves batch norms alone.
FOLD_BATCHNORM: list[str] = [
    "fold_batchnorm",  # needs the shapes the last find_weights propagated
    "find_weights",  # refresh: the batch norms' parameters are now the folded scale and shift
]


def build(steps: list[str], config: NESConfig | None = None) -> PassManager:
    """A ``PassManager`` running the named passes in order, with lint before and after each."""
    passes = []
    for name in steps:
        cls = PASSES.get(name)
        if cls.needs_config:
            if config is None:
                raise ConfigError(f"pass {name!r} needs a NESConfig: build(steps, config=NESConfig(...))")
            passes.append(cls(config))
        else:
            passes.append(cls())
    manager = PassManager(passes, run_checks_after_each_pass=True)
    manager.add_checks(_lint)
    return manager


def run(gm: fx.GraphModule, steps: list[str], config: NESConfig | None = None) -> fx.GraphModule:
    """Run the named passes on ``gm`` and return the result.

    The error of a failing pass is re-raised as it was, with a note (``e.__notes__``) from the
    ``PassManager`` naming the pass and the passes before it.
    """
    manager = build(steps, config)
    try:
        return manager(gm).graph_module
    except Exception as e:
        cause = e.__cause__
        if cause is None:  # raised by the manager itself (its checks before the first pass)
            raise
        cause.add_note(str(e))
        raise cause from cause.__cause__  # the pass's own error and its own cause, not the manager's wrapper


def _lint(module) -> None:
    if isinstance(module, fx.GraphModule):
        module.graph.lint()
