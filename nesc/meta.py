"""The ``node.meta`` keys nesc's analysis passes write and its rewrite passes read.

One place, so that a pass and its consumers cannot disagree on a spelling.
"""

from __future__ import annotations

# Written by passes.find_weights on every weight-bearing op node: a ``WeightInfo``.
WEIGHT = "nesc_weight"
# Written by passes.find_weights on the graph (``graph_module.meta``): list of ``DenseParam`` for
# every parameter that no compressible op consumes, with the reason it stays dense.
DENSE_PARAMS = "nesc_dense_params"
# Written by passes.plan_pools on the graph (``graph_module.meta``): a ``PoolPlan``.
PLAN = "nesc_plan"
# Written by nesc.capture on the graph (``graph_module.meta``): "symbolic_trace" or "export".
CAPTURE = "nesc_capture"
# Written by nesc.capture on the graph (``graph_module.meta``): list of (shape, dtype) of the
# example inputs, so later stages (save, compile) can rebuild inputs of the right kind.
INPUT_SPECS = "nesc_input_specs"
# Written by passes.epitomize / passes.freeze on the sampler node: the weight's qualified name.
SAMPLED_WEIGHT = "nesc_sampled_weight"
