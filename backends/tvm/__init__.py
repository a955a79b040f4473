"""Lowering to Apache TVM (Relax): compiled kernels that regenerate epitome weights on the fly.

Every TVM API call goes through ``adapter`` (TVM's Python API moves between releases); the other
modules import ``tvm`` and its namespaces from there.
"""
