"""Capture any model as a torch.fx GraphModule.

``torch.fx.symbolic_trace`` first: it keeps the user's modules as ``call_module`` nodes. When it
fails (Python control flow on tensor values or shapes, iterating or unpacking a proxy — most models
from the popular libraries), ``torch.export.export(...).module()``, whose aten graph names every
weight by its fully qualified name and records ``nn_module_stack``.

An exported graph is specialised to the mode it was exported in and, in torch 2.13, its module
refuses ``.train()``. So the export path exports in eval mode, rebuilds a plain ``fx.GraphModule``,
and rewrites every batch-norm and dropout node (all dropout kinds) into a small mode-aware module,
so ``train()``/``eval()`` switch them as in the user's model. symbolic_trace has the same problem in
a smaller form — ``F.dropout(x, p, self.training)`` records the flag as a constant — and gets the same
rewrite.

Keyword inputs (a Hugging Face model's ``attention_mask=``, ``labels=``) are captured as the forward
signature names them; the graph takes every example input, in forward's order, and returns what the
model returns. The export path keeps the batch and, for integer inputs, the sequence length symbolic
(``nesc.core.inputs.export_dims``); both paths rewrite the ops the rest of nesc does not take into
equivalent ones (``nesc.capture_ops``: views as reshapes, ``empty`` as ``zeros``, lifted constants).

The user's model is never modified: capture works on a deep copy.
"""

from __future__ import annotations

import copy
import inspect
import traceback

import torch
from torch import fx, nn
from torch.nn import functional as F

from nesc.capture_ops import exported_as_pure, traced_as_pure, views_as_reshapes
from nesc.core import compat, inputs, names
from nesc.core.errors import CaptureError, InputError

aten = torch.ops.aten


class ExportedBatchNorm(nn.Module):
    """aten.batch_norm of an exported graph, made to follow ``self.training`` again.

    Takes the statistics as inputs (they stay buffers of the graph module, under their original
    names) and updates them in place in training mode, as ``nn.BatchNorm*`` does.
    """

    def __init__(self, momentum: float | None, eps: float):
        super().__init__()
        self.momentum = momentum
        self.eps = eps

    def forward(self, x, weight, bias, running_mean, running_var, num_batches_tracked=None):
        momentum = self.momentum
        if self.training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(num_batches_tracked)
        # Without running statistics (track_running_stats=False) batch statistics are used in both modes.
        use_batch_stats = self.training or running_mean is None
        return F.batch_norm(
            x, running_mean, running_var, weight, bias, use_batch_stats, momentum or 0.0, self.eps
        )


def capture(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> fx.GraphModule:
    """Return a new GraphModule equivalent to ``model`` on inputs like ``example_inputs`` (positional)
    and ``example_kwargs`` (keyword: ``attention_mask=``, ``labels=``, ...).

    The GraphModule takes the same inputs under the same names (by position or keyword), every one of
    them, in the order of ``model.forward``'s parameters; on the export path any batch size and, for
    integer inputs (token ids, masks), any sequence length the model allows (``inputs.export_dims``),
    and it returns what the model returns (a Hugging Face ``ModelOutput``). ``config`` and
    ``main_input_name`` of a Hugging Face model are kept as attributes (``HF_ATTRIBUTES``).
    Writes ``gm.meta[names.CAPTURE]`` (which path succeeded), ``gm.meta[names.INPUT_SPECS]`` (every
    input, in that order) and ``gm.meta[names.MODULE_TYPES]`` (name -> class of every module of the
    user's model).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"nesc captures torch.nn.Module instances, got {type(model).__name__}")
    model = copy.deepcopy(model)
    was_training = model.training
    example_inputs, example_kwargs = _check_inputs(model, example_inputs, example_kwargs)
    flat = example_inputs + tuple(example_kwargs.values())  # the order the captured graph takes them in
    module_types = {name: type(m) for name, m in model.named_modules()}
    try:
        absent = _absent_defaults(model, example_inputs, example_kwargs)
        gm, how = _drop_inputs(_symbolic_trace(model, absent), model, absent or {}), "symbolic_trace"
        _refuse_opaque_calls(gm)  # an fx.wrap'ed function hides the weights it reads: export traces into it
        traced_as_pure(gm)  # torch.empty as torch.zeros, as on the export path
        make_mode_aware(gm, captured_training=was_training, model=model)  # F.dropout(x, p, self.training)
        with torch.no_grad():  # a trace can succeed and still fail on these inputs
            _ = gm.eval()(*flat)
    except Exception as trace_error:  # noqa: BLE001 - any tracing failure sends us to export
        gm, how = _export(model, example_inputs, example_kwargs, trace_error), "export"
    gm.train(was_training)
    keep_interface(model, gm)
    gm.meta[names.CAPTURE] = how
    gm.meta[names.INPUT_SPECS] = inputs.specs_of(flat)
    gm.meta[names.MODULE_TYPES] = module_types
    return gm


# What a Hugging Face model exposes beside forward that its users (transformers.Trainer) read.
HF_ATTRIBUTES = ("config", "main_input_name")


def keep_interface(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` the ``HF_ATTRIBUTES`` ``src`` has (passes and freeze build new GraphModules)."""
    for attr in HF_ATTRIBUTES:
        value = getattr(src, attr, None)
        if value is not None and not callable(value):
            setattr(dst, attr, value)
    return dst


def _absent_defaults(model: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """With keyword inputs, symbolic_trace is told the defaults of the parameters not given
    (``concrete_args``), so that ``if mask is None`` takes the branch the model takes; None without."""
    if not kwargs:
        return None
    params = list(inspect.signature(model.forward).parameters.values())[len(args):]
    return {p.name: p.default for p in params if p.name not in kwargs and p.default is not inspect.Parameter.empty}


# torch.nn modules symbolic_trace keeps as leaves but whose weights nesc samples, so capture traces
# into them: their forward reads the weight with a functional op (F.embedding, F.conv3d,
# F.conv_transposeNd) or computes it (parametrizations: weight norm); attention and transformer
# layers make symbolic_trace fail on their shape checks, so such a model goes to torch.export, which
# traces through them (the packed in_proj_weight read by one linear, or sliced per projection).
# nn.Conv1d/Conv2d/Linear stay leaves: passes.functionalize inlines them.
_TRACED_THROUGH = (
    nn.Embedding, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.MultiheadAttention,
    nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse):
            return True  # max_norm renormalises the table in place; sparse gradients need the parameter
        parametrized = type(m).__module__.startswith("torch.nn.utils.parametriz")  # the module and its parametrizations
        if isinstance(m, _TRACED_THROUGH) or parametrized:
            return False
        return super().is_leaf_module(m, qualname)


def _drop_inputs(gm: fx.GraphModule, model: nn.Module, absent: dict) -> fx.GraphModule:
    """Remove the placeholders of ``absent`` (concrete) arguments and the checks symbolic_trace puts on
    them, so that the graph takes exactly the given inputs, in forward's order. Placeholders follow
    forward's parameters in order (their names may have been made unique: ``scale_1``)."""
    if not absent:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = list(inspect.signature(model.forward).parameters)
    for node in [n for n, name in zip(placeholders, params) if name in absent]:
        for user in list(node.users):
            if user.op == "call_function" and not user.users:  # symbolic_trace's _assert_is_none
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _symbolic_trace(model: nn.Module, concrete_args: dict | None = None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with ``_TRACED_THROUGH`` modules traced into."""
    tracer = _Tracer()
    graph = tracer.trace(model, concrete_args)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# Modules whose functions symbolic_trace records as they are and nesc reads (torch ops, Python operators).
_TRANSPARENT_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _refuse_opaque_calls(gm: fx.GraphModule) -> None:
    """Raise when a traced graph calls a Python function that is not torch's (one ``torch.fx.wrap``
    keeps opaque, e.g. torchvision's ``shifted_window_attention``) with a parameter: the weight ops
    inside it are invisible to nesc, so capture takes the export path, which traces into it."""
    params = {name for name, _ in gm.named_parameters()}
    for node in gm.graph.nodes:
        if node.op != "call_function" or compat.is_op_overload(node.target):
            continue
        module = (getattr(node.target, "__module__", None) or "").split(".")[0]
        if module in _TRANSPARENT_MODULES:
            continue
        read = [a.target for a in node.all_input_nodes if a.op == "get_attr" and a.target in params]
        if read:
            name = getattr(node.target, "__qualname__", repr(node.target))
            raise CaptureError(f"symbolic_trace keeps {node.target.__module__}.{name} (torch.fx.wrap) opaque, and it "
                               f"reads the parameters {read[:3]}")


def _check_inputs(model: nn.Module, example_inputs, example_kwargs) -> tuple[tuple, dict]:
    where = f"nesc.capture({type(model).__name__})"
    example_inputs = inputs.as_tensors(example_inputs, where)
    example_kwargs = inputs.in_signature_order(model.forward, inputs.as_kwargs(example_kwargs, where))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()  # eval: a check must not update batch-norm statistics
            _ = model(*example_inputs, **example_kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        given = inputs.describe(example_inputs + tuple(example_kwargs.values()))
        raise InputError(
            f"{type(model).__name__} does not run on the example inputs ({given}): "
            f"{type(e).__name__}: {e}. Pass inputs of the shape and dtype its forward expects, e.g. "
            f"(torch.randn(1, 3, 224, 224),) for an image model."
        ) from e
    finally:
        model.train(was_training)
    return example_inputs, example_kwargs


def _export(model: nn.Module, example_inputs: tuple, example_kwargs: dict, trace_error: Exception) -> fx.GraphModule:
    was_training = model.training
    model.eval()  # export specialises BN/dropout to one mode; eval has no buffer mutation in the graph
    try:
        batched = inputs.export_batch(example_inputs)
        kwargs = dict(zip(example_kwargs, inputs.export_batch(tuple(example_kwargs.values()))))
        dims = inputs.export_dims(model.forward, batched, kwargs)
        ep = torch.export.export(model, batched, kwargs, dynamic_shapes=dims)
    except Exception as export_error:  # noqa: BLE001 - re-raised with both reasons
        raise CaptureError(_explain(model, trace_error, export_error)) from export_error
    finally:
        model.train(was_training)
    exported = ep.module()
    gm = fx.GraphModule(exported, exported.graph)  # a plain GraphModule: train()/eval() work
    exported_as_pure(gm)  # views as reshapes, empty as zeros, lifted constants as clones, w.T as permute
    make_mode_aware(gm, captured_training=False, model=model)
    return gm


# Ops whose training flag a captured graph holds as a constant, and the index of that flag: aten forms
# from torch.export, F forms from symbolic_trace (which records ``self.training`` as a constant).
_DROPOUTS = {
    aten.dropout.default: 2, aten.feature_dropout.default: 2, aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2, F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2,
    F.alpha_dropout: 2, F.feature_alpha_dropout: 2,
}
_ATEN_DROPOUTS = {t for t in _DROPOUTS if compat.is_op_overload(t)}  # flag named "train"


class ModeDropout(nn.Module):
    """A dropout-like op of a captured graph, made to follow ``self.training`` again."""

    def __init__(self, fn, p: float):
        super().__init__()
        self.fn = fn
        self.p = p

    def forward(self, x):
        return self.fn(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)}, p={self.p}"


def make_mode_aware(gm: fx.GraphModule, captured_training: bool = False, model: nn.Module | None = None) -> None:
    """Rewrite batch-norm and dropout nodes whose training flag is a constant into modules that follow
    ``gm.training``.

    ``captured_training`` is the mode the graph was captured in: a flag equal to it is taken to be
    ``self.training`` frozen by the capture and is rewritten; a flag that differs was written
    explicitly (``F.dropout(x, p, training=True)`` for Monte-Carlo dropout) and is kept.
    ``model`` (the captured module) restores what the graph lost: ``momentum=None`` batch norms.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.batch_norm.default, F.batch_norm):
            bn = _batch_norm_args(node)
            if bn is None or bn["training"] is not captured_training:
                continue
            nbt = _num_batches_tracked(gm, bn["running_mean"])
            mod = ExportedBatchNorm(_momentum(node, bn["momentum"], model), bn["eps"])
            args = (bn["x"], bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"])
            args += (nbt,) if nbt is not None else ()
        elif node.target in _DROPOUTS:
            flag = node_arg(node, _DROPOUTS[node.target], "training" if node.target not in _ATEN_DROPOUTS else "train")
            if flag is not captured_training:
                continue
            mod, args = ModeDropout(node.target, node_arg(node, 1, "p", 0.5)), (node.args[0],)
        else:
            continue
        name = f"{names.MODE_PREFIX}_{count}"
        count += 1
        gm.add_submodule(name, mod)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def node_arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` of a call node, whether it was passed positionally or as ``name=``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _batch_norm_args(node: fx.Node) -> dict | None:
    if node.target is aten.batch_norm.default:
        names = ("x", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
        return dict(zip(names, node.args))
    names = ("x", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = (None, None, None, None, None, False, 0.1, 1e-5)
    out = {n: node_arg(node, i, "input" if n == "x" else n, d) for i, (n, d) in enumerate(zip(names, defaults))}
    return out if isinstance(out["training"], bool) else None


def _momentum(node: fx.Node, momentum, model: nn.Module | None):
    """An eval-mode export flattens ``momentum=None`` (cumulative average) to 0.0: ask the module."""
    stack = node.meta.get("nn_module_stack") or {}
    if model is not None and stack:
        path = list(stack.values())[-1][0]
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            return momentum
        if compat.is_batch_norm(mod):
            return mod.momentum
    return momentum


def _num_batches_tracked(gm: fx.GraphModule, running_mean: fx.Node):
    if not isinstance(running_mean, fx.Node) or running_mean.op != "get_attr":
        return None
    target = running_mean.target.rsplit(".", 1)[0] + ".num_batches_tracked"
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == target:
            return node
    return None


# Advice for the failures seen most, matched against the exporter's message; the last is the default.
_HINTS = (
    ("pytree", "the model returns or takes a type torch.export cannot flatten: register it with "
               "torch.utils._pytree.register_pytree_node, or configure the model not to return it "
               "(Hugging Face models: use_cache=False)"),
    ("", "both capture paths need a forward that makes no Python decision on tensor *values* "
         "(.item(), .tolist(), numpy conversion, `if tensor:`): move such code out of forward, or "
         "express it with torch.where / torch.cond"),
)


def _explain(model: nn.Module, trace_error: Exception, export_error: Exception) -> str:
    where = _failing_module(model, export_error) or _failing_module(model, trace_error) or type(model).__name__
    message = str(export_error)
    hint = next(advice for pattern, advice in _HINTS if pattern in message)
    return (
        f"nesc could not capture {type(model).__name__}: the failure is in {where}.\n"
        f"  torch.fx.symbolic_trace: {type(trace_error).__name__}: {_first_line(trace_error)}\n"
        f"  torch.export.export:     {type(export_error).__name__}: {_first_line(export_error)}\n"
        f"To fix: {hint}."
    )


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "(no message)"


def _failing_module(model: nn.Module, error: Exception) -> str | None:
    """The innermost module whose forward appears in the error's traceback, as 'name (Class)'."""
    code_to_name = {}
    for name, mod in model.named_modules():
        code = getattr(type(mod).forward, "__code__", None)
        if code is not None:
            code_to_name.setdefault(code, f"{name or '<root>'} ({type(mod).__name__})")
    found = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        found = code_to_name.get(frame.f_code, found)
    return found


__all__ = ["capture", "ExportedBatchNorm", "ModeDropout", "keep_interface", "views_as_reshapes"]
