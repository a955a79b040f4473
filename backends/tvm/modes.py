"""The two regeneration modes of a compiled model: ``nesc.compile(..., regenerate="once" | "per_call")``.

    per_call  ``main`` rebuilds every sampled weight from its pool on every call (the lowered module as
              it is): a weight exists only while its layer runs, so peak memory stays low
    once      the regeneration is lifted out of ``main`` into a function of its own, ``REGENERATE``
              (pools and routing maps in, weights out), which the runtime runs once when it loads the
              model; ``main`` takes those weights as parameters and runs the dense graph, at the
              latency of TVM dense. The deployed files are the same: pools and routing maps, never a
              dense weight (the weights exist only in the runtime's memory)

    main(x, pools, routes, dense)                        per_call
      -> regenerate((pools, routes)) -> weights          once: at load
         main(x, dense, product maps, weights)                 every call

``lift`` makes the split with Relax's ``LiftTransformParams``, which moves every binding that depends
on the parameters after ``num_input`` alone into ``main_transform_params``: ``main``'s parameters are
reordered so that only the pools and the routing maps the regenerate kernels read come after
``num_input``. What moves is then the regeneration (the regenerate kernels, the reshapes of pools and
weights), never a dense parameter's transform, so ``main`` is the dense model's graph. A product map
(``passes.reuse``) reads the layer's products, computed from the input: its routing map stays an input
of ``main``. Every routing map, lifted or not, is range-checked before any kernel runs (``runtime``).
"""

from __future__ import annotations

from nesc.core.errors import ConfigError

from .adapter import relax, reordered, tuple_length, tvm
from .deploy_schema import MODES, PRODUCT_ROLES
from .lower import LoweringError
from .runtime import REGENERATE

DEFAULT = "once"  # measured faster at steady state than per_call on every model benchmarked (tvm.md)
TRANSFORM = "main_transform_params"  # the name LiftTransformParams gives the lifted function


def check_mode(regenerate) -> str:
    """``regenerate`` if it is one of ``MODES``, else a ``ConfigError`` saying what each mode does."""
    if isinstance(regenerate, str) and regenerate in MODES:
        return regenerate
    raise ConfigError(f"regenerate must be 'once' (weights rebuilt from the pools once, when the model loads: "
                      f"dense latency) or 'per_call' (rebuilt in every call: less memory); got {regenerate!r}")


def liftable(params: dict, kinds: dict[str, str], routes: dict[str, dict]) -> list[str]:
    """The parameters a ``once`` build's ``REGENERATE`` takes, in ``main``'s order: the pools and every
    routing map but a product map's."""
    return [n for n in params if kinds[n] == "pool"
            or (kinds[n] == "route" and routes.get(n, {}).get("role") not in PRODUCT_ROLES)]


def lift(mod: tvm.IRModule, params: list[str], lifted: list[str], target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` (``lower``'s: ``main(inputs..., *params)``) split into ``REGENERATE((lifted...)) ->
    weights`` and ``main(inputs..., *kept, *weights)``, where ``kept`` are the other ``params`` in
    their order. A module with nothing to lift (a dense model) comes back as it is."""
    if not lifted:
        return mod
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    inputs, by_name, lift_set = list(main.params[:num_input]), dict(zip(params, main.params[num_input:])), set(lifted)
    kept = [by_name[n] for n in params if n not in lift_set]
    mod = mod.clone()
    mod["main"] = reordered(main, inputs + kept + [by_name[n] for n in lifted], num_input=num_input + len(kept))
    with target:
        # First, as the dense build does in schedule.fuse: x @ w.T becomes one NT matmul, so a linear
        # weight's transpose goes with its matmul instead of being lifted into a transposed copy.
        mod = relax.transform.FuseTransposeMatmul()(mod)
    mod = relax.transform.LiftTransformParams()(mod)
    return _renamed(mod, num_input + len(kept), len(lifted))


def _renamed(mod: tvm.IRModule, main_inputs: int, lifted: int) -> tvm.IRModule:
    """``mod`` with ``TRANSFORM`` public as ``REGENERATE``, after checking both signatures."""
    transform, main = mod[TRANSFORM], mod["main"]
    takes = tuple_length(transform.params[0]) if len(transform.params) == 1 else None
    returns = tuple_length(transform) or 0
    if takes != lifted or len(main.params) != main_inputs + returns:
        raise LoweringError(f"internal: LiftTransformParams made {TRANSFORM} take {takes} parameters (expected {lifted}) "
                        f"and return {returns}, and main take {len(main.params)} (expected {main_inputs} + "
                        f"{returns}); relax.transform.LiftTransformParams has changed")
    out = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != TRANSFORM}, attrs=mod.attrs)
    out[REGENERATE] = transform.with_attr("global_symbol", REGENERATE)
    return out
