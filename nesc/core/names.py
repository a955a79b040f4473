"""Every name nesc writes into a graph, a module or a file, defined once.

``gm.meta`` / ``node.meta`` keys, the attributes the passes add to a GraphModule, and the keys of a
saved artifact's header. A pass and its consumers (report, serialization, backends, the CLI) import
these constants instead of spelling the strings, so they cannot disagree. Consumers that need to know
*what* a tensor is (pool, routing map, start index) ask ``nesc.core.modules.tensor_roles``, which reads
the graph's structure, never these prefixes.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------ node.meta keys

# passes.find_weights, on every weight-bearing op node: a ``WeightInfo``.
WEIGHT = "nesc_weight"
# passes.epitomize / passes.freeze, on the node that produces a sampled weight: its qualified name.
SAMPLED_WEIGHT = "nesc_sampled_weight"
# serialization, on a batch-norm node that used a cumulative average (``momentum=None``): an eval-mode
# export flattens it to momentum 0.0, which would freeze the statistics once the loaded model trains.
BN_CUMULATIVE = "nesc_bn_cumulative"

# -------------------------------------------------------------------------------- gm.meta keys

# nesc.capture: "symbolic_trace" or "export".
CAPTURE = "nesc_capture"
# nesc.capture: list of (shape, dtype name) of the example inputs, so later stages (passes, save,
# compile) rebuild inputs of the right kind (``nesc.core.inputs.from_specs``).
INPUT_SPECS = "nesc_input_specs"
# nesc.capture: {module name: class} of every module of the user's model.
MODULE_TYPES = "nesc_module_types"
# passes.find_weights: list of ``DenseParam``, every parameter no compressible op consumes, and why.
DENSE_PARAMS = "nesc_dense_params"
# passes.plan_pools: a ``PoolPlan``.
PLAN = "nesc_plan"
# nesc.transform: {weight name: reason} for compressible weights the plan left dense (kept by
# freeze and save).
DENSE_REASONS = "nesc_dense_reasons"
# nesc.transform: the ``NESConfig`` the model was transformed with.
CONFIG = "nesc_config"
# nesc.transform / nesc.fit_pools: {weight name: relative reconstruction error of the pool fit}.
FIT_ERRORS = "nesc_fit_errors"
# passes.reuse: {weight name: what reuse did to it, or why it left it alone}.
REUSE = "nesc_reuse"
# nesc.load: the ``extra`` dict the artifact was saved with (report, config, dense reasons).
EXTRA = "nesc_extra"
# nesc.distributed.split_blocks: {"depth", "blocks": [block paths], "renamed": {new path: original
# path}} of a model split into per-block GraphModules (``merge_blocks`` reads it to go back).
BLOCKS = "nesc_blocks"

# ------------------------------------------------------------------- attributes on a GraphModule

# passes.plan_pools / epitomize: pool parameters are named f"{POOL_PREFIX}_{index}".
POOL_PREFIX = "nesc_pool"
# passes.epitomize: the module holding every EpitomeSampler.
SAMPLERS = "nesc_samplers"
# passes.freeze: the module holding every RoutingMap.
ROUTES = "nesc_routes"
# nesc.prepare_qat: the FakeQuantize of a sampler's pool, a child of the sampler (nesc.core.qat).
POOL_FAKE_QUANT = "pool_fake_quant"
# nesc.capture: mode-aware batch-norm / dropout modules are named f"{MODE_PREFIX}_{index}".
MODE_PREFIX = "nesc_mode"
# nesc.distributed.split_blocks: a tensor or module that moves to another owner (the nearest common
# parent of the blocks using it) is named f"{MOVED_PREFIX}_{original path, dots as underscores}".
MOVED_PREFIX = "nesc_moved"
# passes.fold_batchnorm: a folded batch norm's per-channel scale and shift, on the module that held it.
FOLDED_SCALE = "folded_scale"
FOLDED_SHIFT = "folded_shift"

# ------------------------------------------------------------------ artifact header (nesc.save)

# The header key holding the nesc version that wrote an artifact.
NESC_VERSION = "nesc_version"
# nesc.serialize.trainable: the placeholder op a sampler call becomes while save exports a trainable
# model (never in a written graph, nor on the loader's allow-list).
SAVE_PLACEHOLDER_OP = "nesc_save::sampled"

# ----------------------------------------------------------------------------- backends

# backends.onnx: shape vectors folded by onnxsim become Constant nodes named f"{ONNX_CONST_PREFIX}_{t}".
ONNX_CONST_PREFIX = "nesc_const"
# backends.tvm.kernels: PrimFunc name hint and block names of the regeneration kernels, which the
# default schedule recognises.
TVM_REGENERATE = "nesc_regenerate"
TVM_PADDED_POOL = "nesc_padded_pool"
TVM_WEIGHT = "nesc_weight"
TVM_WEIGHT_CROP = "nesc_weight_crop"
TVM_SPLIT_ATTR = "nesc_split"
# backends.tvm.kernels: block (and PrimFunc hint) of a product map's gather (passes.reuse), and its
# block annotation: the axis the gather indexes.
TVM_GATHER_PRODUCTS = "nesc_gather_products"
TVM_PRODUCTS_DIM_ATTR = "nesc_products_dim"


def pool_name(index: int) -> str:
    """The attribute name of the ``index``-th pool of a plan."""
    return f"{POOL_PREFIX}_{index}"


def moved_name(path: str) -> str:
    """The name ``split_blocks`` gives a tensor or module at ``path`` when it moves to another owner."""
    return f"{MOVED_PREFIX}_{path.replace('.', '_')}"


def is_generated(name: str) -> bool:
    """Whether a top-level attribute name is one nesc generates (pools, samplers, routes, mode modules)."""
    return name.startswith((POOL_PREFIX, SAMPLERS, ROUTES, MODE_PREFIX, MOVED_PREFIX))
