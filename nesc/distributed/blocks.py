"""split_blocks / merge_blocks: a flat GraphModule as one call_module submodule per block, and back.

A transformed model is one flat graph: only leaf modules are ``call_module`` nodes, so a block's own
``forward`` (``gm.layer1``) never runs and FSDP2's per-module hooks on it would never fire. And every
pool and sampler hangs off the root (``nesc_pool_*``, ``nesc_samplers``). ``split_blocks`` regroups the
graph by the user's module hierarchy, read from each node's ``nn_module_stack``:

* every block (the module path cut at ``depth`` components: ``layer1``, ``features.3``) whose nodes run
  as one contiguous stretch becomes a GraphModule at the same path, called once from the root;
* a tensor or module is owned by the block that alone uses it (its pools and samplers move there); one
  used by several blocks (a pool shared across blocks) by their nearest common parent: the root, or the
  plain container that holds the blocks, and the root passes it into the blocks as an input;
* nodes of no block (the root's own ops, the nodes of a block that runs in several stretches) stay
  in the root graph.

The split model computes exactly what the flat one does (the same nodes, the same tensors, in the same
order: outputs bit-identical), shares its parameters and modules, and keeps every name of the user's
modules (``layer1.bn1.weight``). nesc's own names gain their block's prefix
(``nesc_pool_0`` -> ``layer1.nesc_pool_0``), and a tensor that changes owner under a user's name
is renamed by ``names.moved_name``; ``gm.meta[names.BLOCKS]["renamed"]`` records every change, so
``flat_names`` maps a state dict back and ``merge_blocks`` inlines the blocks into the flat graph
that freeze, save, the report and the backends read.

Why a separate, explicit step rather than the default placement: every later stage of nesc (freeze,
reuse, the report, serialization, both backends) reads one flat graph with nesc's tensors at the root,
and only sharded training needs blocks; splitting around training and merging after keeps them all
unchanged.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from nesc.capture import keep_interface
from nesc.core import names
from nesc.core.errors import ConfigError, PassOrderError
from nesc.core.nopickle import no_pickle

ROOT = ""


def split_blocks(gm: fx.GraphModule, depth: int = 1) -> fx.GraphModule:
    """``gm`` regrouped as one GraphModule per block (the module paths cut at ``depth`` components),
    sharing ``gm``'s parameters; outputs bit-identical. ``merge_blocks`` goes back."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"split_blocks: depth must be an int >= 1 (module path components); got {depth!r}")
    if names.BLOCKS in gm.meta:
        raise PassOrderError("split_blocks: this model is split already (gm.meta has names.BLOCKS); "
                             "merge_blocks(gm) first to split it at another depth")
    block_of = _contiguous(gm, _node_blocks(gm, depth))
    blocks = list(dict.fromkeys(b for b in block_of.values() if b != ROOT))
    owner = _owners(gm, block_of, blocks)
    renamed: dict[str, str] = {}
    targets: dict[str, dict[str, object]] = {b: {} for b in [ROOT, *blocks]}  # owner -> {relative: object}

    def place(path: str, where: str) -> str:
        """Register the object at ``path`` under ``where`` (an owner); its name relative to ``where``."""
        obj = _lookup(gm, path)
        if where != ROOT and path.startswith(where + "."):
            rel = path[len(where) + 1 :]
        elif where == ROOT and not any(path == b or path.startswith(b + ".") for b in blocks):
            rel = path
        else:
            rel = path if names.is_generated(path.split(".")[0]) else names.moved_name(path)
        full = f"{where}.{rel}" if where else rel
        if targets.setdefault(where, {}).get(rel, obj) is not obj:
            raise PassOrderError(f"split_blocks: two objects would be named {full!r} (one from {path!r}); "
                                 "rename the module or split at another depth")
        targets[where][rel] = obj
        if full != path:
            renamed[full] = path
        return rel

    root = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    read: dict[str, fx.Node] = {}

    def value(n: fx.Node) -> fx.Node:  # n's value in the root graph (root-owned tensors read lazily)
        if n not in env:  # one read per tensor (the flat graph may read a shared pool once per layer)
            if n.target not in read:
                where = owner[n.target]
                rel = place(n.target, where)
                read[n.target] = root.get_attr(f"{where}.{rel}" if where else rel)
                read[n.target].meta = dict(n.meta)
            env[n] = read[n.target]
        return env[n]

    for segment_block, nodes in _segments(gm, block_of):
        if segment_block == ROOT:
            for n in nodes:
                env[n] = root.node_copy(n, value)
                if n.op == "call_module":
                    env[n].target = place(n.target, ROOT)
            continue
        sub, inputs, outputs = _block_graph(nodes, segment_block, owner, place)
        targets[ROOT][segment_block] = fx.GraphModule(targets.pop(segment_block), sub, class_name="NescBlock")
        _carry_shells(gm, segment_block, targets[ROOT][segment_block])
        call = root.call_module(segment_block, tuple(value(i) for i in inputs))
        for k, out in enumerate(outputs):
            env[out] = call if len(outputs) == 1 else root.call_function(operator.getitem, (call, k))
    for n in gm.graph.nodes:
        if n.op == "output":
            root.node_copy(n, value)
    for where, objs in targets.items():  # tensors shared by blocks under a plain container (depth > 1)
        if where not in (ROOT, *blocks):
            targets[ROOT].update({f"{where}.{rel}": obj for rel, obj in objs.items()})
    root.lint()
    out = fx.GraphModule(targets[ROOT], root)
    out.meta.update(gm.meta)
    out.meta[names.BLOCKS] = {"depth": depth, "blocks": blocks, "renamed": renamed}
    out.train(gm.training)
    return no_pickle(keep_interface(gm, out))


def merge_blocks(gm: fx.GraphModule) -> fx.GraphModule:
    """The flat GraphModule of a ``split_blocks`` model: its blocks inlined, every tensor and module
    under its original name, sharing ``gm``'s objects (for an FSDP-wrapped model, load
    ``flat_state_dict`` into the flat model instead)."""
    info = _info(gm)
    blocks, back = set(info["blocks"]), info["renamed"]
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    objs: dict[str, object] = {}

    def refer(new_node: fx.Node, full: str) -> None:
        new_node.target = back.get(full, full)
        objs[new_node.target] = _lookup(gm, full)

    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in blocks:
            env[n] = _inline(graph, gm.get_submodule(n.target), n.target, [env[a] for a in n.args], refer)
        elif n.op == "call_function" and n.target is operator.getitem and n.args[0].target in blocks:
            env[n] = env[n.args[0]][n.args[1]]
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
            if n.op in ("get_attr", "call_module"):
                refer(env[n], n.target)
    graph.lint()
    out = fx.GraphModule(objs, graph)
    for block in info["blocks"]:
        if _has(out, block):
            _carry_shells(gm, block, out.get_submodule(block))
    out.meta.update({k: v for k, v in gm.meta.items() if k != names.BLOCKS})
    out.train(gm.training)
    return no_pickle(keep_interface(gm, out))


def flat_names(gm: fx.GraphModule, state: dict) -> dict:
    """``state`` (a state dict of the split model ``gm``) under the flat model's names."""
    back = _info(gm)["renamed"]
    out = {}
    for key, v in state.items():
        parts = key.split(".")
        for i in range(len(parts), 0, -1):  # the longest renamed prefix
            prefix = ".".join(parts[:i])
            if prefix in back:
                key = ".".join([back[prefix], *parts[i:]])
                break
        out[key] = v
    return out


def block_paths(gm: fx.GraphModule) -> list[str]:
    """The paths of a split model's blocks, in the order they run."""
    return list(_info(gm)["blocks"])


# ------------------------------------------------------------------------------------------ helpers


def _info(gm: fx.GraphModule) -> dict:
    info = gm.meta.get(names.BLOCKS) if isinstance(gm, fx.GraphModule) else None
    if info is None:
        raise PassOrderError(f"{type(gm).__name__} is not a split model (no gm.meta[names.BLOCKS]); "
                             "make one with nesc.distributed.split_blocks(gm)")
    return info


def _node_blocks(gm: fx.GraphModule, depth: int) -> dict[fx.Node, str]:
    """Each computing node's block: its ``nn_module_stack`` path cut at ``depth``; a node nesc added
    (samplers, reshapes: no stack) joins the block of its first user."""
    out: dict[fx.Node, str] = {}
    for n in reversed(gm.graph.nodes):
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if "nn_module_stack" in n.meta:
            stack = n.meta["nn_module_stack"] or {}
            path = next(reversed(stack.values()))[0] if stack else ROOT
            out[n] = ".".join(path.split(".")[:depth])
        else:
            users = [u for u in n.users if u in out]
            out[n] = out[min(users, key=_order(gm))] if users else ROOT
    return out


def _contiguous(gm: fx.GraphModule, block_of: dict[fx.Node, str]) -> dict[fx.Node, str]:
    """Blocks that run in more than one stretch of the graph stay in the root (a GraphModule runs once)."""
    runs: dict[str, int] = {}
    last = None
    for n in gm.graph.nodes:
        if n in block_of and block_of[n] != last:
            last = block_of[n]
            runs[last] = runs.get(last, 0) + 1
    return {n: (b if runs[b] == 1 else ROOT) for n, b in block_of.items()}


def _segments(gm: fx.GraphModule, block_of: dict[fx.Node, str]):
    """(block, nodes) for each stretch of consecutive computing nodes of one block; placeholders first."""
    out: list[tuple[str, list[fx.Node]]] = [(ROOT, [n for n in gm.graph.nodes if n.op == "placeholder"])]
    for n in gm.graph.nodes:
        if n in block_of:
            if out[-1][0] != block_of[n]:
                out.append((block_of[n], []))
            out[-1][1].append(n)
    return out


def _owners(gm: fx.GraphModule, block_of: dict[fx.Node, str], blocks: list[str]) -> dict[str, str]:
    """Each get_attr target -> the owner of its tensor: the one block reading it, or the nearest
    common parent of the readers (a root-graph reader counts as the root)."""
    readers: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            seen = readers.setdefault(n.target, set())
            seen.update(block_of.get(u, ROOT) for u in n.users)
    out = {}
    for target, seen in readers.items():
        if len(seen) == 1:
            out[target] = next(iter(seen))
            continue
        paths = [s.split(".") if s else [] for s in seen]
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        out[target] = ".".join(common)
        if out[target] in blocks:  # cannot happen for blocks of one depth; guards a deeper mix
            raise PassOrderError(f"split_blocks: {target} is read by {sorted(seen)}, nested in block {out[target]}")
    return out


def _block_graph(nodes: list[fx.Node], block: str, owner: dict[str, str], place):
    """The graph of one block: placeholders for the values it reads from outside (in first-use order),
    its own tensors and modules as get_attr / call_module, a tuple (or the one value) it returns."""
    inside = set(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def value(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a.op == "get_attr" and owner[a.target] == block:
            env[a] = graph.get_attr(place(a.target, block))
        else:
            env[a] = graph.placeholder(a.name)
            inputs.append(a)
        env[a].meta = dict(a.meta)
        return env[a]

    body = []
    for n in nodes:
        for a in n.all_input_nodes:  # placeholders first: an fx graph lists them before any other node
            if a not in inside and not (a.op == "get_attr" and owner[a.target] == block):
                value(a)
        body.append(n)
    for n in body:
        env[n] = graph.node_copy(n, value)
        if n.op == "call_module":
            env[n].target = place(n.target, block)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    graph.lint()
    return graph, inputs, outputs


def _inline(graph: fx.Graph, block: fx.GraphModule, path: str, args: list, refer):
    """Copy ``block``'s graph into ``graph`` with its placeholders bound to ``args``; its output."""
    env: dict[fx.Node, object] = {}
    placeholders = iter(args)
    for n in block.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(placeholders)
        elif n.op == "output":
            return fx.node.map_arg(n.args[0], lambda a: env[a])
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
            if n.op in ("get_attr", "call_module"):
                refer(env[n], f"{path}.{n.target}")
    raise PassOrderError(f"block {path} has no output node")


def _carry_shells(src_root: nn.Module, path: str, dst: nn.Module) -> None:
    """Tensor-free modules of ``src_root.<path>`` that no node calls (a compressed layer's shell) keep
    their place under ``dst``, so the module tree reads as the user's."""
    if not _has(src_root, path):
        return
    src = src_root.get_submodule(path)
    # What the block's own nodes name at its top level (a module moved in under names.moved_name) is
    # not a shell of the user's tree.
    used = {n.target for n in src.graph.nodes if n.op in ("get_attr", "call_module")} \
        if isinstance(src, fx.GraphModule) else set()
    _carry(src, dst, skip=used)


def _carry(src: nn.Module, dst: nn.Module, skip=()) -> None:
    for name, child in src.named_children():
        mine = getattr(dst, name, None)
        if name in skip or child is dst or mine is child:
            continue
        if mine is None and not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()):
            dst.add_module(name, child)
        elif isinstance(mine, nn.Module):
            _carry(child, mine)


def _lookup(gm: nn.Module, path: str):
    owner, _, attr = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _has(gm: nn.Module, path: str) -> bool:
    try:
        return isinstance(gm.get_submodule(path), nn.Module)
    except AttributeError:
        return False


def _order(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]


def is_split(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and names.BLOCKS in model.meta
