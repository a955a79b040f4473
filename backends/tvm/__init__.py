"""Lowering to Apache TVM (Relax): compiled kernels that regenerate epitome weights on the fly.

    adapter.py   the one place that knows TVM's Python API (and the host LLVM target); the other
                 modules import ``tvm`` and its namespaces from there, so a TVM upgrade changes it only
    lower.py     torch.export -> Relax, parameters kept as inputs, each one a pool, route or dense
    kernels.py   the TE kernels of ``nesc.regenerate`` (pool + routing map in, weight out)
    schedule.py  legalize, fuse and the default schedules (regeneration, matmul/conv, elementwise)
    schedule_primitives.py  the block analysis and loop moves those schedule rules are built from
    tune.py      opt-in MetaSchedule tuning with a record cache
    targets.py   the table of named targets (llvm, aarch64, cuda)
    build.py     ``nesc.compile`` and ``CompiledModel`` (call it, or ``export_library``)
    export.py    writes the library and its parameters file (the build's facts compiled into both)
    runtime.py   loads an export with tvm and numpy only (no torch, no nesc), checking the parameters
                 file as untrusted input: copy it and deploy_schema.py to the device
    deploy_schema.py  the parameters file's format: header schema, entry relations, tensor and route
                 range checks (torch-free, as runtime.py)
"""
