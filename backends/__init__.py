"""Backends: where a frozen nesc model goes after PyTorch, still compressed.

* ``tvm/``: ``nesc.compile``, an Apache TVM build whose kernels rebuild each weight from its pool at
  run time, exported as a shared library plus a parameters file (pools, routing maps, what stayed
  dense) that ``tvm/runtime.py`` runs with tvm and numpy only.
* ``onnx/``: ``nesc.export_onnx``, one ONNX file whose tensors are the pools and routing maps and
  whose graph computes the weights.

Both read what a tensor is (pool, routing map) from the graph (``nesc.core.modules.tensor_roles``),
take example inputs through ``nesc.core.inputs`` and spell nesc's names through ``nesc.core.names``.
"""
