"""Graph passes on torch.fx, installed as ``nesc.passes``: one file per pass.

    infra.py                 the contract: ``NescPass`` (a torch.fx ``PassBase`` with ``requires`` / ``ensures``)
    functionalize.py         rewrite: call_module Conv/Linear -> functional ops on get_attr weights
    find_weights.py          analysis: every weight-bearing op (the ``WEIGHT_OPS`` table) -> node.meta
    plan_pools.py            analysis: which weights share which pool, and each pool's size -> gm.meta
    epitomize.py             rewrite: dense weight -> EpitomeSampler reading its pool
    freeze.py                rewrite: sampler -> routing map + ``nesc.regenerate`` node
    decompose_regenerate.py  rewrite: ``nesc.regenerate`` -> aten index arithmetic (for exporters)
    pipeline.py              the registry (``PASSES``), the TRANSFORM / FREEZE pipelines, ``PassManager``

Analysis passes only write ``node.meta`` / ``gm.meta`` under ``nesc.core.names``; rewrite passes read
it and refuse to run (``PassOrderError``) when it is missing. Every pass is also a plain function
(``find_weights(gm)``, ``plan_pools(gm, config)``, ...) returning a ``PassResult``, for your own fx
pipelines.
"""
