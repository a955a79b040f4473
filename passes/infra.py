"""The contract every nesc pass keeps, on torch.fx's pass infrastructure.

A pass is a ``torch.fx.passes.infra.pass_base.PassBase``: ``requires(gm)`` checks what it needs before
it runs, ``call(gm)`` does the work and returns a ``PassResult`` that says honestly whether the graph
changed, ``ensures(gm)`` checks what it promises afterwards. ``PassBase.__call__`` runs the three in
order, so a pass dropped into any fx toolchain (or a ``PassManager``) checks itself.

``NescPass`` adds two class attributes the pipeline reads: ``name`` (the registry name) and
``needs_config`` (the pipeline passes the ``NESConfig`` to the constructor when the pipeline is
built). A failed check raises ``PassOrderError`` naming the pass, what is missing and what to run.
"""

from __future__ import annotations

from typing import ClassVar

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from nesc.core.errors import PassOrderError

__all__ = ["NescPass", "PassResult", "require_meta", "broken_promise"]


class NescPass(PassBase):
    """A nesc pass: a ``PassBase`` with a registry name and whether it takes the config."""

    name: ClassVar[str]
    needs_config: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def require_meta(gm: fx.GraphModule, key: str, pass_name: str, producer: str) -> None:
    """Raise unless ``gm.meta[key]`` is set: the analysis that writes it (``producer``) has not run."""
    if key not in getattr(gm, "meta", {}):
        raise PassOrderError(
            f"{pass_name} needs gm.meta[{key!r}], which {producer} writes; run {producer} first "
            f"(the pipelines in nesc.passes.pipeline do)"
        )


def broken_promise(pass_name: str, what: str) -> PassOrderError:
    """The error for a pass whose ``ensures`` check failed: a bug in nesc, or a graph it cannot handle."""
    return PassOrderError(
        f"{pass_name} did not leave the graph as it promises: {what}. This is a bug in nesc or a graph form "
        f"the pass does not recognise; please report it with the model that triggers it."
    )
