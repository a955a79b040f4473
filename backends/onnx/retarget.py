"""The shape both ONNX lowerings of nesc's custom ops share: retarget every node of one op to a plain
function of aten ops with the same arguments, which torch.export then captures op by op.

A subclass names the op (``matches``, and ``op`` in words), the function (``target``), the arguments that must be stored
tensors read through ``get_attr`` (``stored``: argument index -> role, so the exported file reads them
as the initializers they are) and what those tensors are, for the message (``what``).

Requires: each matching node reads its ``stored`` arguments through ``get_attr`` (a frozen or loaded
graph). Ensures: no matching node is left; the graph lints; no ``get_attr`` added.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from nesc.core.errors import PassOrderError
from nesc.core.quant import pool_read
from nesc.passes.infra import NescPass, PassResult, broken_promise


class RetargetNodes(NescPass):
    name = "retarget"
    matches: Callable[[fx.Node], bool]
    target: Callable
    stored: dict[int, str]  # argument index -> role
    what: str  # what the stored tensors are, e.g. "pools and routing maps"
    op: str  # the op, for the promise: "regenerate"

    def requires(self, gm: fx.GraphModule) -> None:
        for node in self._nodes(gm):
            for index, role in self.stored.items():
                arg = node.args[index]
                # a pool may be read through its dequantisation (nesc.core.quant): a DequantizeLinear / Cast
                stored = role == "pool" and pool_read(arg) is not None
                if not stored and (not isinstance(arg, fx.Node) or arg.op != "get_attr"):
                    raise PassOrderError(
                        f"{self.name}: node {node.name!r} reads its {role} from {arg!r}, expected a get_attr of "
                        f"the frozen module's tensor. Run it on the output of nesc.freeze or nesc.load, which "
                        f"read {self.what} through get_attr.")

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = self._nodes(gm)
        for node in nodes:
            node.target = type(self).target  # same arguments, same meta
        if nodes:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(nodes))

    def ensures(self, gm: fx.GraphModule) -> None:
        if self._nodes(gm):
            raise broken_promise(self.name, f"{self.op} nodes are left")

    def _nodes(self, gm: fx.GraphModule) -> list[fx.Node]:
        return [n for n in gm.graph.nodes if type(self).matches(n)]
