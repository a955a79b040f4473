"""Lower a frozen nesc graph (or any dense ``nn.Module``) to a Relax module whose compressed weights are
rebuilt from their pools inside the compiled code.

The steps, in order:

0. ``_roles``: what each nesc tensor is (pool, routing map), read from the graph by
   ``nesc.core.modules.tensor_roles`` (which node reads it, not its name) before anything is copied;
   the qualified names survive the copy and the export. A plain ``nn.Module`` has none: all dense.
1. ``_exportable``: a private eval-mode copy whose buffers (routing maps, batch-norm statistics) are
   parameters, so that every stored tensor becomes an input of ``main`` rather than a constant the
   compiler could fold (folding the gather of a pool would bring the dense weight back).
2. ``_export``: ``torch.export`` with a symbolic batch (``nesc.core.inputs.export_batch`` /
   ``batch_dims``), then the core-ATen decompositions. ``torch.ops.nesc.regenerate`` is a
   ``torch.library`` custom op, so it stays one node.
3. ``_check_supported``: every op the importer cannot convert, listed in one ``LoweringError``.
4. ``from_exported_program`` with ``keep_params_as_input=True`` and a converter table that turns each
   ``nesc.regenerate`` into the TE kernel of ``kernels.regenerate_te`` (pool + routing map in, weight
   out, computed at run time) and each ``nesc.gather_products`` (``passes.reuse``'s product map) into
   ``kernels.gather_products_te``. (``from_fx`` is not used: in TVM 0.27 it miscompiles conv/pool padding.)
5. ``Lowered``: the module, the parameters in the order ``main`` takes them after the data inputs,
   what each parameter is (pool, route or dense, from step 0), and for every routing map the pool
   it indexes and the range its values must stay in (``_routes``, read from the regenerate and
   gather_products nodes), which the deploy runtime checks before any kernel runs.

Batch norm stays a scale/shift on the conv output: it is never folded into a weight, let alone into
a pool that other layers share.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from nesc.core.errors import NescError
from nesc.core.inputs import as_tensors, batch_dims, export_batch
from nesc.core.modules import is_gather_products, is_regenerate, tensor_roles
from nesc.core.quant import POOL_DTYPES, is_dequantize
from nesc.core.sampling import Geometry

from .adapter import ExportedProgramImporter, detach_params, from_exported_program, relax, tvm, var_name
from .importer_fixes import IMPORTER_FIXES
from .kernels import (
    PRODUCTS_NAME,
    REGENERATE_NAME,
    gather_products_te,
    regenerate_rows_te,
    regenerate_te,
    rows_form,
)

# tensor_roles' role -> the kind a Lowered parameter is. A sampler's start indices and learner are
# the trainable form of a routing map (nesc.freeze turns them into one).
KIND_OF_ROLE = {"pool": "pool", "pool_scale": "pool", "route": "route", "start": "route", "learner": "route"}
INJECTIVE = 2  # relax OpPatternKind.kInjective


class LoweringError(NescError):
    """A model, or some of its ops, cannot be lowered to TVM."""


@dataclass(frozen=True)
class Lowered:
    mod: tvm.IRModule  # Relax module, entry "main"; params are function inputs after the data inputs;
    # main returns the model's outputs as a tuple
    params: dict[str, np.ndarray]  # qualified name -> array, in the order "main" takes them
    input_names: tuple[str, ...]
    kinds: dict[str, str]  # param name -> "pool" | "route" | "dense"
    # routing-map param name -> {role: starts | fracs, pool: its name, pool_shape, grid: (nbo, nbi),
    # max (starts): the largest valid value of each of the 4 coordinates}; a product map's ->
    # {role: product_starts | product_fracs, pool: the pool whose rows made the products (or None),
    # grid: (rows of the map,), products: (groups, rows), max (starts): (groups - 1, rows - 1)}
    routes: dict[str, dict] = field(default_factory=dict)


def lower(model: nn.Module | fx.GraphModule, example_inputs: tuple, *, dynamic_batch: bool = True) -> Lowered:
    """Lower ``model`` (a frozen nesc graph or any dense module) on ``example_inputs`` to Relax.

    With ``dynamic_batch`` the batch dimension of every input stays symbolic (where the model allows),
    so one compiled module serves any batch size. Raises ``LoweringError`` listing every op that
    cannot be lowered, with its node and module.
    """
    example_inputs = as_tensors(example_inputs, f"lower({type(model).__name__})", error=LoweringError)
    roles = _roles(model)
    ep = _export(_exportable(model, roles), example_inputs, dynamic_batch)
    _check_supported(ep)
    converters = CONVERTERS | {"regenerate.default": functools.partial(_convert_regenerate, scales=_scales(ep))}
    mod = from_exported_program(
        ep, keep_params_as_input=True, custom_convert_map=converters, run_ep_decomposition=False
    )
    mod, _ = detach_params(mod)  # ours come from the exported program, by name
    params = _params_in_order(ep)
    main = mod["main"]
    num_inputs = int(main.attrs["num_input"])
    if len(main.params) - num_inputs != len(params):
        raise LoweringError(
            f"internal: main takes {len(main.params) - num_inputs} parameters after its {num_inputs} inputs, "
            f"but the exported program lifted {len(params)}; the importer's parameter order has changed"
        )
    input_names = tuple(var_name(v) for v in main.params[:num_inputs])
    kinds = {name: KIND_OF_ROLE.get(roles.get(name), "dense") for name in params}
    return Lowered(mod, params, input_names, kinds, _routes(ep))


# --------------------------------------------------------------------------------- export


def _roles(model: nn.Module) -> dict[str, str]:
    """``{qualified name: role}`` of the nesc tensors (pools, routing maps) of a GraphModule, from
    which nodes read them; a module that is not a GraphModule holds none."""
    return tensor_roles(model) if isinstance(model, fx.GraphModule) else {}


def _exportable(model: nn.Module, roles: dict[str, str]) -> nn.Module:
    """An eval-mode copy whose buffers are (frozen) parameters, so that they stay inputs of the lowered
    function. Integer buffers other than nesc's (``roles``: the routing maps' start indices) are never
    read in eval mode (batch norm's ``num_batches_tracked``) and stay buffers; unused, they disappear
    from the lowered module."""
    copied = copy.deepcopy(model).eval()
    for name, buf in list(copied.named_buffers()):
        if roles.get(name) == "scale":  # a gain: compiled in as a constant (``_scales``)
            continue
        if buf.is_floating_point() or name in roles:
            owner_name, _, attr = name.rpartition(".")
            owner = copied.get_submodule(owner_name)
            delattr(owner, attr)
            owner.register_parameter(attr, nn.Parameter(buf.detach().clone(), requires_grad=False))
    return copied


def _export(model: nn.Module, example_inputs: tuple, dynamic_batch: bool) -> torch.export.ExportedProgram:
    if dynamic_batch:
        # torch.export specialises a size-1 dimension: a batch of 1 is exported at 2, kept symbolic.
        inputs = export_batch(example_inputs)
        dynamic = batch_dims(inputs)
    else:
        inputs, dynamic = example_inputs, None
    try:
        with torch.no_grad():
            ep = torch.export.export(model, inputs, dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 - re-raised with the model named and the cause attached
        raise LoweringError(
            f"torch.export could not capture {type(model).__name__} for lowering: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. A frozen nesc graph exports as it is; a model "
            "with data-dependent control flow must be rewritten or captured with nesc.capture first."
        ) from e
    return ep.run_decompositions()


# ---------------------------------------------------------------------------- converters


def _scales(ep: torch.export.ExportedProgram) -> dict[str, float]:
    """Regenerate node name -> its gain's value. The gain is a buffer of the routing map (so that a
    ``state_dict`` holds it), read here once and compiled in as a constant, as a graph constant was
    before format 4: one number per layer, folded into the padded pool's compute."""
    stored = ep.graph_signature.inputs_to_buffers | ep.graph_signature.inputs_to_parameters
    out = {}
    for node in filter(is_regenerate, ep.graph.nodes):
        scale = node.args[3]
        target = stored.get(getattr(scale, "name", None))
        value = ep.state_dict.get(target, ep.constants.get(target)) if target is not None else None
        if not isinstance(value, torch.Tensor) or value.shape != ():
            raise LoweringError(f"{node.name}: its scale must be a stored 0-d buffer (the routing map's gain), "
                                f"got {scale}; lower the output of nesc.freeze or nesc.load")
        out[node.name] = float(value)
    return out


def _convert_regenerate(node: fx.Node, importer, *, scales: dict[str, float]) -> relax.Var:
    """``nesc.regenerate(pool, starts, fracs, scale, shape, block, layout)`` -> the TE kernel; in rows
    form (the common case) followed by a reshape (free) or, for ``linear_t``, a transpose. The gain is a
    constant of the kernel (``_scales``)."""
    pool, starts, fracs, _, shape, block, layout = node.args
    scale = scales[node.name]
    geometry = Geometry(tuple(shape), tuple(pool.meta["val"].shape), tuple(block), layout)
    env, bb = importer.env, importer.block_builder
    rows = rows_form(geometry)
    te_func = regenerate_rows_te if rows else regenerate_te
    dtype = str(pool.meta["val"].dtype).removeprefix("torch.")  # the compute dtype
    stored, row_scales = _stored_pool(pool)  # a quantized pool: the kernel dequantises it

    def kernel(p, s, f, *r):  # emit_te converts keyword arguments to TIR values; geometry is not one
        return te_func(p, s, f, *r, scale=float(scale), geometry=geometry, dtype=dtype)

    O, I, kh, kw = geometry.shape
    Op, Ip = geometry.pool[:2]
    p = bb.emit(relax.op.reshape(env[stored], (Op, Ip * kh * kw))) if rows else env[stored]
    extra = [env[row_scales]] if row_scales is not None else []
    weight = bb.emit_te(kernel, p, env[starts], env[fracs], *extra, primfunc_name_hint=REGENERATE_NAME)
    if not rows:
        return weight
    if layout == "linear_t":
        return bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(weight, (O, I))), [1, 0]))
    return bb.emit(relax.op.reshape(weight, geometry.param_shape))


def _stored_pool(pool: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """The stored tensor a regenerate node's pool comes from, and an int8 pool's scales: the inputs of its
    ``nesc.dequantize`` (``nesc.core.quant``: int8 values and scales, or float16 values and None), else the pool."""
    if is_dequantize(pool):
        values, scale, _ = pool.args
        if values.op == "placeholder" and values.meta["val"].dtype in POOL_DTYPES and (
                scale is None or scale.op == "placeholder"):
            return values, scale
    return pool, None


def _convert_dequantize(node: fx.Node, importer) -> relax.Var:
    """``nesc.dequantize(values, scale or None, dtype)`` of a stored pool. Every regenerate node reads the
    stored values itself (``_stored_pool``); emitted only for other readers."""
    values, scale, _ = node.args
    env, bb = importer.env, importer.block_builder
    if all(is_regenerate(u) and u.args[0] is node for u in node.users):
        return env[values]  # unused: the regenerate kernels dequantise
    dtype = str(node.meta["val"].dtype).removeprefix("torch.")
    pool = bb.emit(relax.op.astype(env[values], dtype))
    if scale is None:
        return pool
    view = [-1] + [1] * (len(values.meta["val"].shape) - 1)  # one scale per pool row (quant.AXIS = 0)
    return bb.emit(relax.op.multiply(pool, bb.emit(relax.op.reshape(relax.op.astype(env[scale], dtype), view))))


def _convert_gather_products(node: fx.Node, importer) -> relax.Var:
    """``nesc.gather_products(products, starts, fracs, bias, dim, channels, block, rows)`` -> the TE
    kernel of ``kernels.gather_products_te`` (the bias, when there is one, added in it)."""
    products, starts, fracs, bias, dim, channels, block, rows = node.args
    env, bb = importer.env, importer.block_builder
    dim = dim % len(products.meta["val"].shape)

    def kernel(p, s, f, *b):  # emit_te converts keyword arguments to TIR values: the geometry is closed over
        return gather_products_te(p, s, f, *b, dim=dim, channels=int(channels), block=int(block), rows=int(rows))

    tensors = [env[products], env[starts], env[fracs]] + ([env[bias]] if bias is not None else [])
    out = bb.emit_te(kernel, *tensors, primfunc_name_hint=PRODUCTS_NAME)
    # AnnotateTIROpPattern calls a data-dependent read opaque, which would keep the batch-norm scale/shift
    # and activation after it out of its loop; it is a gather, injective like TVM's own take, and says so.
    gv = bb.lookup_binding(out).args[0]  # call_tir(gv, (tensors...))
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", INJECTIVE))
    return out


def _convert_amax(node: fx.Node, importer) -> relax.Var:
    """``aten.amax(x, dim=[], keepdim=False)``, which the 0.27 importer lacks (``x.amax(-1)``, max pooling
    over time in signal models); an empty ``dim`` reduces every axis."""
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = [dim] if isinstance(dim, int) else list(dim)
    return importer.block_builder.emit(relax.op.max(x, axis=dims or None, keepdims=bool(keepdim)))


def _convert_cumsum(node: fx.Node, importer) -> relax.Var:
    """``aten.cumsum`` in the dtype torch gives it: the 0.27 importer keeps a bool input's dtype, which
    LLVM cannot add (Hugging Face's packed-sequence check cumsums a bool mask); torch sums in int64."""
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    dtype = str(node.meta["val"].dtype).removeprefix("torch.")
    return importer.block_builder.emit(relax.op.cumsum(x, axis=dim, dtype=dtype))


# The importer's table, extended by ours; keys are OpOverload names as the importer spells them.
CONVERTERS = {
    **IMPORTER_FIXES,  # importer converters of 0.27 that miscompute some arguments (importer_fixes)
    "regenerate.default": _convert_regenerate,
    "dequantize.default": _convert_dequantize,
    "gather_products.default": _convert_gather_products,
    "amax.default": _convert_amax,
    "cumsum.default": _convert_cumsum,
}


def _check_supported(ep: torch.export.ExportedProgram) -> None:
    """Raise one error naming every op (with node and module) that the importer cannot convert."""
    known = set(ExportedProgramImporter().convert_map) | set(CONVERTERS)
    missing = []
    for node in ep.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", str(node.target)) not in known:
            stack = node.meta.get("nn_module_stack") or {}
            module = next(reversed(stack.values()))[0] if stack else "<top level>"
            missing.append(f"  {node.name} in {module or '<top level>'}: {node.target}")
    if missing:
        raise LoweringError(
            f"{len(missing)} op(s) cannot be lowered to TVM Relax (apache-tvm 0.27's torch importer has no "
            "converter for them):\n" + "\n".join(missing) + "\nRewrite those parts of the model with supported "
            "ops, or add a converter to nesc.backends.tvm.lower.CONVERTERS."
        )


# ------------------------------------------------------------------------------ parameters


def _params_in_order(ep: torch.export.ExportedProgram) -> dict[str, np.ndarray]:
    """Lifted parameters in the order of the graph signature, which is the order of ``main``'s inputs."""
    kind = torch.export.graph_signature.InputKind.PARAMETER
    state = ep.state_dict
    bf16 = sorted(n for n, t in state.items() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16)
    if bf16:  # numpy (the parameter files, the deploy runtime) has no bfloat16
        raise LoweringError(f"cannot lower bfloat16 tensors ({', '.join(bf16[:3])}): TVM deployment stores parameters as "
                            f"numpy arrays, which have no bfloat16. Freeze with pool_dtype=torch.int8 or torch.float16")
    return {
        spec.target: state[spec.target].detach().cpu().contiguous().numpy()
        for spec in ep.graph_signature.input_specs
        if spec.kind is kind
    }


def _routes(ep: torch.export.ExportedProgram) -> dict[str, dict]:
    """For every routing-map parameter, the pool it indexes and the range of its values, from the
    regenerate nodes ``(pool, starts, fracs, scale, shape, block, layout)`` of the exported program,
    whose placeholders are exactly the parameters ``main`` takes. Starts index the padded pool of
    ``kernels.padded_pool_te``: channel starts in [0, Op) and [0, Ip), spatial ones in [0, K - k];
    a map shared by several layers must fit all of them."""
    names = ep.graph_signature.inputs_to_parameters
    routes: dict[str, dict] = {}
    for node in filter(is_regenerate, ep.graph.nodes):
        pool, starts, fracs, _, shape, block, layout = node.args
        g = Geometry(tuple(shape), tuple(pool.meta["val"].shape), tuple(block), layout)
        common = {"pool": names.get(_stored_pool(pool)[0].name), "pool_shape": list(g.pool), "grid": list(g.grid)}
        limits = list(g.start_max)
        for arg, entry in ((starts, {"role": "starts", "max": limits}), (fracs, {"role": "fracs"})):
            name = names.get(getattr(arg, "name", None))
            if name is None or tuple(arg.meta["val"].shape) != (*g.grid, 4):
                raise LoweringError(f"{node.name}: its {entry['role']} must be a stored parameter of shape "
                                    f"{(*g.grid, 4)}, the routing map the deploy runtime checks; got {arg}")
            entry = common | entry
            if name in routes:  # shared: the tightest range, and the same grid
                old = routes[name]
                if old["grid"] != entry["grid"]:
                    raise LoweringError(f"routing map {name!r} is read with grids {old['grid']} and {entry['grid']}")
                entry = old | ({"max": [min(a, b) for a, b in zip(old["max"], limits)]} if "max" in old else {})
            routes[name] = entry
    for node in filter(is_gather_products, ep.graph.nodes):
        for name, entry in _product_routes(node, names).items():
            if routes.setdefault(name, entry) != entry:
                raise LoweringError(f"{node.name}: product map {name!r} is also read as {routes[name]}; each product "
                                    f"map is read by one gather_products node")
    return routes


def _product_routes(node: fx.Node, names: dict[str, str]) -> dict[str, dict]:
    """The routes of one ``gather_products`` node's product map: its starts ``(g, o)`` index group
    ``g < groups`` and row ``o < rows`` of the ``groups * rows`` product channels (the kernel reads
    channel ``g * rows + (o + a) % rows``); its fractions are in [0, 1]."""
    products, starts, fracs, _, dim, channels, block, rows = node.args
    width = int(products.meta["val"].shape[dim])
    groups, rest = divmod(width, rows)
    if rest or not groups:
        raise LoweringError(f"{node.name}: its products have {width} channels along dim {dim}, not a multiple of its "
                            f"{rows} rows; passes.reuse makes them with a weight of groups * rows output channels")
    n = -(-channels // block)  # rows of the product map
    common = {"pool": _products_pool(products, width, names), "grid": [n], "products": [groups, rows]}
    out = {}
    for arg, entry, shape in ((starts, {"role": "product_starts", "max": [groups - 1, rows - 1]}, (n, 2)),
                              (fracs, {"role": "product_fracs"}, (n,))):
        name = names.get(getattr(arg, "name", None))
        if name is None or tuple(arg.meta["val"].shape) != shape:
            raise LoweringError(f"{node.name}: its {entry['role']} must be a stored parameter of shape {shape}, the "
                                f"product map the deploy runtime checks; got {arg}")
        out[name] = common | entry
    return out


def _products_pool(products: fx.Node, width: int, names: dict[str, str]) -> str | None:
    """The pool whose rows ``products`` was computed with: the regenerate node of ``width`` output
    channels that is its weight (directly, or through one permute/view: ``linear`` as ``mm``)."""
    near = [n for arg in products.all_input_nodes for n in (arg, *arg.all_input_nodes)]
    pools = {names.get(_stored_pool(n.args[0])[0].name) for n in near if is_regenerate(n) and n.args[4][0] == width}
    return pools.pop() if len(pools) == 1 else None
