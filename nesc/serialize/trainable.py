"""Trainable models in an artifact (format 5): the samplers of a model that still trains, as data.

A trainable graph calls ``EpitomeSampler`` modules, which torch.export would trace into plain ops (and
the starts into constants). So while ``save`` exports, each sampler call ``sampler(pool[, x])`` is
swapped for ``names.SAVE_PLACEHOLDER_OP(pool, x, path, shape)``, a placeholder op that only exists during the
export (``export_ready``); export keeps it as one node whose arguments are the pool and the learner's
input, and ``restore_calls`` turns it back into ``call_module`` of the sampler. The ``trainable``
document then holds what a sampler is built from; its tensors are ordinary entries of the tensor table
under the sampler's path (``starts``, ``origin``, ``scale``; ``learner.fc.weight``, ``learner.fc.bias``,
``learner.running_offset``)::

    {"samplers": {path: {"type": "EpitomeSampler", "weight_name", "shape", "pool", "block", "layout",
                         "tied", "width", "learner": null | {"in_channels", "channel_dim", "momentum"}}},
     "plan": null | {...},  "config": null | {...}}           (``plan`` / ``config``: ``nesc.serialize.meta``)

Loading builds samplers only from ``SAMPLER_TYPES`` (never a class a file names), after the tensors the
table put at the path are checked against what that sampler holds: names, shapes, dtypes, finite values
(``build_samplers``); ``check_calls`` then proves every ``call_module`` node calls one of them with a pool
of its geometry. The learner reads features only in training, so ``watch_learner_inputs`` hooks the load's
check run to compare their channels with the learner's ``in_channels``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn

from nesc.core import names
from nesc.core.errors import ArtifactError
from nesc.core.modules import EpitomeSampler, TIES, TransformationLearner, sampler_of
from nesc.core.sampling import LAYOUTS, Geometry

from .schema import Invalid, attribute, check_code_path, check_ints, check_type

SAMPLER_TYPES = ("EpitomeSampler",)  # the allow-list: the only module type a file may ask for
MAX_WIDTH = 16.0  # sampling half-width in cells (training anneals from 2-4 to 1); memory grows with its 4th power
_SAMPLER_KEYS = {"type", "weight_name", "shape", "pool", "block", "layout", "tied", "width", "learner"}
_LEARNER_KEYS = {"in_channels", "channel_dim", "momentum"}
_CHANNEL_DIMS = (1, -1)  # what passes.epitomize gives a learner: NCHW features, or channels last (linear)


@torch.library.custom_op(names.SAVE_PLACEHOLDER_OP, mutates_args=())
def _sampled(pool: Tensor, x: Tensor | None, path: str, shape: list[int]) -> Tensor:
    """Stands for one sampler call while ``save`` exports; never in a written graph (nor allowed in one)."""
    return pool.new_zeros(shape)


@_sampled.register_fake
def _sampled_fake(pool, x, path, shape):
    return pool.new_empty(shape)


_NAMESPACE, _OP = names.SAVE_PLACEHOLDER_OP.split("::")
SAMPLED = getattr(getattr(torch.ops, _NAMESPACE), _OP).default


# ------------------------------------------------------------------------------------------ save


def sampler_paths(gm: fx.GraphModule) -> list[str]:
    """Paths of the samplers ``gm``'s graph calls, each once, in graph order."""
    return list(dict.fromkeys(n.target for n in gm.graph.nodes if sampler_of(gm, n) is not None))


def check_saveable(gm: fx.GraphModule, paths: list[str]) -> None:
    """Refuse what the ``trainable`` document cannot describe, before any export."""
    uncalled = [n for n, m in gm.named_modules() if isinstance(m, EpitomeSampler) and n not in paths]
    if uncalled:
        raise ArtifactError(
            f"cannot save: sampler(s) {uncalled[:3]} are not called by the model's own graph (a model split into "
            f"blocks by nesc.distributed.split_blocks calls them from its blocks' graphs). Merge it first: "
            f"nesc.save(nesc.distributed.merge_blocks(gm), path).")
    problems = []
    for path in paths:
        s = gm.get_submodule(path)
        children = dict(s.named_children())
        if type(s) is not EpitomeSampler:
            problems.append(f"{path} is a {type(s).__name__}, a subclass of EpitomeSampler")
        elif set(children) - {"learner"}:
            extra = sorted(set(children) - {"learner"})
            problems.append(f"{path} holds submodules {extra} (prepare_qat's fake-quantizer?)")
        elif s.learner is not None and not (type(s.learner) is TransformationLearner and type(s.learner.fc) is nn.Linear
                                            and dict(s.learner.named_children()).keys() == {"fc"}):
            problems.append(f"{path}'s learner is not a plain TransformationLearner")
    if problems:
        raise ArtifactError(
            "cannot save this trainable model: " + "; ".join(problems) + ". nesc.save writes EpitomeSampler modules "
            "as passes.epitomize makes them. A model prepared with nesc.prepare_qat: save it before prepare_qat and "
            "call prepare_qat again after nesc.load, or freeze it (nesc.freeze(gm, pool_dtype=torch.int8)) and save that.")


def describe(gm: fx.GraphModule, paths: list[str]) -> dict:
    """The ``samplers`` part of the trainable document."""
    out = {}
    for path in paths:
        s: EpitomeSampler = gm.get_submodule(path)
        g = s.geometry
        learner = None if s.learner is None else {
            "in_channels": s.learner.fc.in_features, "channel_dim": s.learner.channel_dim,
            "momentum": float(s.learner.momentum)}
        out[path] = {"type": "EpitomeSampler", "weight_name": s.weight_name, "shape": list(g.shape),
                     "pool": list(g.pool), "block": list(g.block), "layout": g.layout, "tied": s.tied,
                     "width": float(s.width), "learner": learner}
    return out


def export_ready(gm: fx.GraphModule) -> fx.GraphModule:
    """A module sharing ``gm``'s tensors whose graph calls ``SAMPLED`` instead of each sampler."""
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        sampler = sampler_of(gm, node)
        if sampler is None:
            continue
        x = node.args[1] if len(node.args) > 1 else None
        with graph.inserting_before(node):
            new = graph.call_function(SAMPLED, (node.args[0], x, node.target, list(sampler.geometry.param_shape)))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    out = fx.GraphModule(gm, graph)
    return out.train(gm.training)


def restore_calls(src: fx.GraphModule, exported: fx.GraphModule) -> None:
    """``SAMPLED`` nodes of ``exported`` -> ``call_module`` of ``src``'s sampler at the same path."""
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not SAMPLED:
            continue
        pool, x, path, _ = node.args
        sampler = src.get_submodule(path)
        if attribute(exported, path) is not sampler:
            exported.add_submodule(path, sampler)
        with graph.inserting_before(node):
            call = graph.call_module(path, (pool,) if x is None else (pool, x))
        call.meta.update(node.meta)
        call.meta[names.SAMPLED_WEIGHT] = sampler.weight_name
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    exported.recompile()


# ------------------------------------------------------------------------------------------ load


def check_samplers(doc) -> dict[str, dict]:
    """The ``samplers`` document, checked: {path: spec} with a valid geometry each."""
    check_type(doc, dict, "trainable['samplers']")
    for path, spec in doc.items():
        check_code_path(path, "sampler path")  # a call_module target: written into the forward
        where = f"sampler {path!r}"
        check_type(spec, dict, where)
        if spec.keys() != _SAMPLER_KEYS:
            raise Invalid(f"{where}: has keys {sorted(spec)[:12]}, expected {sorted(_SAMPLER_KEYS)}")
        if spec["type"] not in SAMPLER_TYPES:
            raise Invalid(f"{where}: module type {str(spec['type'])[:60]!r} is not one nesc builds {SAMPLER_TYPES}")
        check_type(spec["weight_name"], str, f"{where}: weight_name")
        check_ints(spec["shape"], 4, f"{where}: shape")
        check_ints(spec["pool"], 4, f"{where}: pool")
        check_ints(spec["block"], 2, f"{where}: block")
        if spec["layout"] not in LAYOUTS:
            raise Invalid(f"{where}: layout {str(spec['layout'])[:40]!r} must be one of {LAYOUTS}")
        tied = spec["tied"]
        if not (tied is False or isinstance(tied, str) and tied in TIES):
            raise Invalid(f"{where}: tied {str(spec['tied'])[:40]!r} must be false, 'inputs' or 'outputs'")
        width = spec["width"]
        if not (type(width) in (int, float) and 1 <= width <= MAX_WIDTH):  # NaN fails too
            raise Invalid(f"{where}: width {width!r} must be a number in [1, {MAX_WIDTH:g}] (cells)")
        try:
            spec["geometry"] = Geometry(tuple(spec["shape"]), tuple(spec["pool"]), tuple(spec["block"]), spec["layout"])
        except ValueError as e:
            raise Invalid(f"{where}: {e}") from None
        if spec["learner"] is not None:
            _check_learner(spec["learner"], where)
    return doc


def _check_learner(spec, where: str) -> None:
    check_type(spec, dict, f"{where}: learner")
    if spec.keys() != _LEARNER_KEYS:
        raise Invalid(f"{where}: learner has keys {sorted(spec)[:8]}, expected {sorted(_LEARNER_KEYS)}")
    check_ints([spec["in_channels"]], 1, f"{where}: learner in_channels")
    if spec["channel_dim"] not in _CHANNEL_DIMS or type(spec["channel_dim"]) is not int:
        raise Invalid(f"{where}: learner channel_dim {spec['channel_dim']!r} must be one of {_CHANNEL_DIMS}")
    m = spec["momentum"]
    if not (type(m) in (int, float) and 0 <= m <= 1):
        raise Invalid(f"{where}: learner momentum {m!r} must be a number in [0, 1]")


def build_samplers(gm: nn.Module, samplers: dict[str, dict]) -> None:
    """Replace the plain module the tensor table made at every sampler path by the sampler it describes,
    holding the very tensors installed there (checked first: names, kinds, shapes, dtypes, finite)."""
    for path, spec in samplers.items():
        where = f"sampler {path!r}"
        holder = attribute(gm, path)
        if type(holder) is not nn.Module:
            raise Invalid(f"{where}: the tensor table puts no tensors at that path (or something else is there)")
        g: Geometry = spec["geometry"]
        grid = (*g.grid, 4)
        learner = spec["learner"]
        _expect(holder, {"starts": ("parameter", grid)}, {"origin": grid, "scale": ()},
                ["learner"] if learner else [], where)
        starts, origin, scale = holder.starts, holder.origin, holder.scale
        if scale.dtype != torch.float64:
            raise Invalid(f"{where}: scale is {scale.dtype}, expected a float64 scalar")
        made = None
        if learner:
            made = _build_learner(holder.learner, learner, g.grid, where)
        sampler = EpitomeSampler(g, starts.detach(), 1.0, spec["weight_name"], made, tied=spec["tied"])
        sampler.register_parameter("starts", starts)  # the installed tensors themselves, not the tied copy
        sampler.register_buffer("origin", origin)
        sampler.register_buffer("scale", scale)
        sampler.width = float(spec["width"])
        parent_path, _, leaf = path.rpartition(".")
        parent = attribute(gm, parent_path) if parent_path else gm
        setattr(parent, leaf, sampler)


def _build_learner(holder: nn.Module, spec: dict, grid: tuple[int, int], where: str) -> TransformationLearner:
    where = f"{where}: learner"
    out = grid[0] * grid[1] * 4
    _expect(holder, {}, {"running_offset": (*grid, 4)}, ["fc"], where)
    fc = holder.fc
    _expect(fc, {"weight": ("parameter", (out, spec["in_channels"])), "bias": ("parameter", (out,))}, {}, [],
            f"{where}.fc")
    if fc.weight.dtype != fc.bias.dtype:
        raise Invalid(f"{where}.fc: weight is {fc.weight.dtype}, bias {fc.bias.dtype}; they must agree")
    learner = TransformationLearner(spec["in_channels"], grid, spec["channel_dim"], float(spec["momentum"]))
    learner.fc.register_parameter("weight", fc.weight)
    learner.fc.register_parameter("bias", fc.bias)
    learner.register_buffer("running_offset", holder.running_offset)
    return learner


def _expect(holder: nn.Module, params: dict, buffers: dict, children: list[str], where: str) -> None:
    """``holder`` has exactly these parameters / buffers (float, finite, of these shapes) and children."""
    got_p = dict(holder.named_parameters(recurse=False))
    got_b = dict(holder.named_buffers(recurse=False))
    got_c = sorted(n for n, _ in holder.named_children())
    wanted = {**{k: "parameter" for k in params}, **{k: "buffer" for k in buffers}}
    got = {**{k: "parameter" for k in got_p}, **{k: "buffer" for k in got_b}}
    extra_attrs = sorted(k for k in vars(holder) if not k.startswith("_") and k != "training")  # constants
    if got != wanted or got_c != sorted(children) or extra_attrs:
        raise Invalid(f"{where}: holds {sorted(got.items()) + [(c, 'module') for c in got_c] + extra_attrs}, "
                      f"expected {sorted(wanted.items()) + [(c, 'module') for c in sorted(children)]}")
    shapes = {**{k: s for k, (_, s) in params.items()}, **buffers}
    for name, shape in shapes.items():
        t = got_p.get(name, got_b.get(name))
        if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16) or tuple(t.shape) != shape:
            raise Invalid(f"{where}: {name} is {t.dtype} {tuple(t.shape)}, expected a float tensor {shape}")
        if not bool(torch.isfinite(t).all()):
            raise Invalid(f"{where}: {name} holds a non-finite value")


def check_calls(gm: fx.GraphModule, samplers: dict[str, dict]) -> None:
    """Every ``call_module`` node of the decoded graph calls a sampler of the document, with one pool
    argument (a stored tensor of its geometry's pool shape and a float dtype) and, only with a learner,
    the learner's input."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        where = f"node {node.name}"
        if node.target not in samplers or type(attribute(gm, node.target)) is not EpitomeSampler:
            raise Invalid(f"{where}: calls module {node.target!r}, which the trainable document does not declare")
        spec = samplers[node.target]
        most = 2 if spec["learner"] else 1
        if node.kwargs or not 1 <= len(node.args) <= most:
            raise Invalid(f"{where}: a sampler takes (pool{', x' if most == 2 else ''}) positionally, got "
                          f"{len(node.args)} argument(s) and keywords {sorted(node.kwargs)[:4]}")
        pool = node.args[0]
        value = attribute(gm, pool.target) if isinstance(pool, fx.Node) and pool.op == "get_attr" else None
        if not isinstance(value, Tensor):
            raise Invalid(f"{where}: the pool must be read from a stored tensor (get_attr)")
        if not value.is_floating_point() or tuple(value.shape) != tuple(spec["pool"]):
            raise Invalid(f"{where}: pool {pool.target!r} is {value.dtype} {tuple(value.shape)}, expected a float "
                          f"tensor {tuple(spec['pool'])}")
        if len(node.args) == 2 and not isinstance(node.args[1], fx.Node):
            raise Invalid(f"{where}: the learner's input must be a tensor the graph computes")


def watch_learner_inputs(gm: fx.GraphModule) -> tuple[list, list[str]]:
    """(forward pre-hooks to remove after the load's check run, the problems they found): a learner whose
    input has another channel count than its ``in_channels``. In eval mode the learner reads nothing, so
    nothing else would notice before training. The hooks only record (an exception raised inside the
    generated forward would make fx read its source file to format the traceback)."""
    handles, problems = [], []

    def hook(module, args):
        if len(args) > 1 and isinstance(args[1], Tensor):
            x, learner = args[1], module.learner
            if x.dim() == 0 or x.shape[learner.channel_dim] != learner.fc.in_features:
                problems.append(f"sampler {module.weight_name}: its learner reads {learner.fc.in_features} channels "
                                f"(dim {learner.channel_dim}), the graph gives it features of shape {tuple(x.shape)}")

    for m in gm.modules():
        if isinstance(m, EpitomeSampler) and m.learner is not None:
            handles.append(m.register_forward_pre_hook(hook))
    return handles, problems
