"""fold_batchnorm (rewrite): an eval-mode batch norm becomes one per-channel scale and shift.

Why: in eval mode ``(x - mean) / sqrt(var + eps) * weight + bias`` is the affine map ``x * scale +
shift``, so the four per-channel tensors a batch norm stores (two of them buffers that no parameter
count includes) become two. On small compressed models the statistics are a fifth of the artifact;
deployment runtimes fold them the same way. The folded model no longer has batch statistics: in
training mode the affine map stays fixed (fine-tuning trains ``scale`` and ``shift``).

Requires: a model in eval mode whose nodes carry shapes (``passes.find_weights`` ran: its shape
propagation writes ``tensor_meta``). Rewrites exact ``nn.BatchNorm1d/2d/3d`` modules and the captured
graph's ``ExportedBatchNorm`` nodes that hold running statistics; a batch norm without them
(``track_running_stats=False`` uses batch statistics in eval mode too) is left and named in a warning.
Ensures: no foldable batch norm is called; the statistics, weights and biases they read are gone
(unless something else reads them); outputs equal the unfolded model's up to float rounding (one
multiply and one add instead of the normalisation, within 1e-5 relative).

    before:  %bn = call_module[features.0.1](%conv)
    after:   %s = get_attr[features.0.1.folded_scale]; %t = get_attr[features.0.1.folded_shift]
             %bn = call_function[aten.add.Tensor](call_function[aten.mul.Tensor](%conv, %s), %t)
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from nesc.capture import ExportedBatchNorm
from nesc.core import names
from nesc.core.errors import NescWarning, PassOrderError

from .infra import NescPass, PassResult, broken_promise

aten = torch.ops.aten
_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # exact types: a subclass may override forward


class FoldBatchNorm(NescPass):
    name = "fold_batchnorm"

    def requires(self, gm: fx.GraphModule) -> None:
        if gm.training:
            raise PassOrderError(
                "fold_batchnorm folds running statistics, which only eval mode uses: call it on a model in "
                "eval mode (gm.eval(); frozen models are)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        found = [(n, _statistics(gm, n)) for n in gm.graph.nodes if _is_batch_norm(gm, n)]
        left = [n.name for n, stats in found if stats is None]
        if left:
            warnings.warn(NescWarning(
                f"fold_batchnorm left {len(left)} batch norm(s) without running statistics unfolded "
                f"({', '.join(left[:5])}): they normalise with batch statistics in eval mode too"), stacklevel=3)
        folded = [(n, stats) for n, stats in found if stats is not None]
        for node, stats in folded:
            _fold(gm, node, stats)
        if folded:
            _drop_unused(gm, [t for _, stats in folded for t in stats[-1]])
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(folded))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if _is_batch_norm(gm, n) and _statistics(gm, n) is not None]
        if left:
            raise broken_promise(self.name, f"foldable batch norms still called: {left[:5]}")


def fold_batchnorm(gm: fx.GraphModule) -> PassResult:
    """``FoldBatchNorm()(gm)``: the pass as a plain function."""
    return FoldBatchNorm()(gm)


def _is_batch_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    mod = gm.get_submodule(node.target)
    return type(mod) in _MODULES or isinstance(mod, ExportedBatchNorm)


def _statistics(gm: fx.GraphModule, node: fx.Node):
    """(owner path, weight, bias, mean, var, eps, tensors read) of a batch norm with running statistics,
    else None. ``owner`` is where the folded tensors go: the module, or the owner of the captured
    graph's statistics (so names stay those of the user's model)."""
    mod = gm.get_submodule(node.target)
    if isinstance(mod, ExportedBatchNorm):
        attrs = [a.target if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in node.args[1:]]
        weight, bias, mean, var = (attrs + [None] * 4)[:4]
        if not (isinstance(mean, str) and isinstance(var, str)):
            return None
        owner = mean.rpartition(".")[0]
        tensors = [a for a in attrs if isinstance(a, str)]
        get = _tensor(gm)
        return owner, get(weight), get(bias), get(mean), get(var), mod.eps, tensors
    if mod.running_mean is None or mod.running_var is None:
        return None
    return node.target, mod.weight, mod.bias, mod.running_mean, mod.running_var, mod.eps, []


def _tensor(gm: fx.GraphModule):
    def get(target):
        if target is None:
            return None
        owner, _, leaf = target.rpartition(".")
        return getattr(gm.get_submodule(owner) if owner else gm, leaf)
    return get


def _fold(gm: fx.GraphModule, node: fx.Node, stats) -> None:
    owner_path, weight, bias, mean, var, eps, _ = stats
    x = node.args[0]
    rank = len(x.meta["tensor_meta"].shape) if "tensor_meta" in x.meta else None
    if rank is None:
        raise PassOrderError(f"fold_batchnorm needs the input shape of {node.name}: run passes.find_weights "
                             f"first (its shape propagation writes node.meta['tensor_meta'])")
    with torch.no_grad():
        # Computed in float64 and rounded once, so the fold adds no error of its own beyond that rounding.
        scale = (torch.ones_like(mean) if weight is None else weight).double() / torch.sqrt(var.double() + eps)
        shift = (torch.zeros_like(mean) if bias is None else bias).double() - mean.double() * scale
    view = (-1,) + (1,) * (rank - 2)  # (C, 1, ...): broadcasts against (N, C, ...)
    trainable = weight is not None and weight.requires_grad
    # The module is replaced (nn.BatchNorm: by an empty one that holds the folded tensors) or dropped
    # (ExportedBatchNorm: a generated module that holds nothing).
    parent, _, leaf = node.target.rpartition(".")
    if type(gm.get_submodule(node.target)) in _MODULES:
        setattr(gm.get_submodule(parent) if parent else gm, leaf, nn.Module())
    else:
        delattr(gm.get_submodule(parent) if parent else gm, leaf)
    owner = gm.get_submodule(owner_path) if owner_path else gm
    targets = []
    for key, value in ((names.FOLDED_SCALE, scale), (names.FOLDED_SHIFT, shift)):
        if hasattr(owner, key):
            raise broken_promise("fold_batchnorm", f"{owner_path or '<root>'} already has {key!r}")
        owner.register_parameter(key, nn.Parameter(value.to(mean.dtype).reshape(view), requires_grad=trainable))
        targets.append(f"{owner_path}.{key}" if owner_path else key)
    with gm.graph.inserting_before(node):
        s, t = (gm.graph.get_attr(target) for target in targets)
        out = gm.graph.call_function(aten.add.Tensor, (gm.graph.call_function(aten.mul.Tensor, (x, s)), t))
    out.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val")})
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _drop_unused(gm: fx.GraphModule, candidates: list[str]) -> None:
    """Erase get_attr nodes nobody reads any more, then those of the folded batch norms' tensors
    (``candidates``, a captured graph's statistics) that no node reads: nothing else is touched."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users and node.target in candidates:
            gm.graph.erase_node(node)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in dict.fromkeys(candidates):
        if name not in read:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
