"""Save and load nesc models: one safetensors file holding tensors and a JSON graph; never pickle.

Why not ``torch.save``: a pickle runs code when it is loaded and ties the file to the classes that
wrote it. A nesc artifact is plain data, so a file from anyone can be opened safely: tensors and
the zlib-compressed JSON documents that describe the graph in the safetensors body, the format and a
digest in its header; the documents are decoded through a schema
(``schema``): every name that ends up in generated Python code (node names, argument names) is an
identifier and every attribute path one fx writes safely, tensor names are any name torch accepts and
never overwrite the module's own attributes, and call targets resolve only to the allow-list of pure
ops (``ops``). See ``loader`` for every check, in order.

A graph captured by ``symbolic_trace`` calls modules (``nn.BatchNorm2d``, ...) whose constructor
arguments cannot be recovered generically, so ``save`` first re-exports the model with
``torch.export`` in eval mode, which leaves one aten-level graph of ``call_function`` nodes on
``get_attr`` tensors, and writes that graph. ``load`` rebuilds it and turns batch norm / dropout back
into modules that follow ``train()``/``eval()`` (``nesc.capture.make_mode_aware``).

Format, ``FROZEN_VERSION`` 4 for a frozen model; ``FORMAT_VERSION`` 5 for one that still trains (the
same file plus a ``trainable`` document and ``call_module`` nodes of its samplers: ``trainable``, whose
plan and config ``meta`` encodes; it loads back trainable, to resume training). 1 to 3 are still read;
their gains, graph constants there, are turned into the routing maps' ``scale`` buffers that format 4
stores: ``upgrade``. Tensors: every parameter and buffer of the
saved module under its ``state_dict`` name, plus tensor constants of the exported graph; a name that
aliases another tensor (tied weights) is stored once. Tensors are stored contiguous; a transposed or
channels_last one records its strides and gets them back. The file is a safetensors file whose
metadata holds five plain strings:

    format          "nesc"
    format_version  "4"
    nesc_version    the nesc that wrote the file (key ``names.NESC_VERSION``)
    torch_version   the torch that wrote it
    sha256          hex digest over every other metadata entry (canonical JSON) and then the file's
                    tensors: name, dtype, shape and bytes, by name (version 1: the tensors only)

and whose two tensors (``container``) are ``documents``, the zlib-compressed JSON texts of

    graph           {"nodes": [...], "codegen": {...}} (see ``codec``)
    tensors         {name: {"kind": "parameter"|"buffer"|"constant", "requires_grad",
                    "persistent", "stride", "alias_of"}} (see ``tensors``)
    input_specs     [[shape, dtype], ...] of the example inputs
    extra           the caller's ``extra`` dict (e.g. the compression report)
    layout          [[name, dtype, shape], ...]: the stored tensors in ``data``, in order
    trainable       format 5 only: {"samplers", "plan", "config"} (see ``trainable``)

and ``data``, the stored tensors' bytes back to back. Version 2 had the first four documents as
metadata entries and one safetensors entry per tensor, which made a small model's file up to twice its
tensors (see ``container`` for the sizes that decided the change).

Decisions:

* Call signature: the exported graph's pytree codegen is kept (input and output ``TreeSpec`` in
  ``treespec_dumps``'s JSON, ``trees``), so the loaded module takes the same arguments and returns the
  same nested outputs (a dict stays a dict) as the saved one. A library type (a ``transformers``
  ``ModelOutput``) is restored where its module is imported before ``load``; elsewhere it comes back
  as a plain dict or tuple of the same structure, with a warning: ``load`` imports nothing a file names.
* ``_guards_fn`` is dropped: it is a Python callable ``torch.export`` attaches to check input
  shapes against the export-time constraints; it is code, not data, and cannot be written without
  pickle. Nothing is lost numerically: the graph keeps the batch symbolic (``aten.sym_size`` nodes)
  where the exporter did, so the loaded module runs at any batch size; a wrong input shape fails in
  the first op that cannot take it instead of up front.
* The batch stays symbolic even for a batch-1 example: the export uses batch 2 in that case,
  because torch.export specialises dimensions of size 1 to constants.
* ``save`` checks the artifact before writing it: it rebuilds the module from what it is about to
  write and requires outputs equal (``torch.equal``) to the saved module's eval outputs. Layout
  (strides) and alignment (tensors are cloned into torch's 64-byte-aligned memory on load) matter
  for that: CPU kernels may sum in another order otherwise.
* Load order of checks (``loader``): a regular file; safetensors header readable; ``format`` and
  ``format_version`` before anything else is parsed; ``sha256``; the documents inflated within their
  bound and the tensors unpacked (version 3); header documents and graph against
  their schema, calls against the allow-list; routing maps against their pools, in-place writes;
  one check run on the recorded inputs. Each failure is an ``ArtifactError`` naming the file, the
  problem and the fix.

Modules, bottom to top (each imports only those before it): ``schema`` (what a file must follow),
``ops`` (the allow-list of calls), ``codec`` (graph <-> JSON), ``container`` (the bytes of a format-3
file: compressed documents, packed tensors), ``tensors`` (the tensor table, aliasing, layout, digest),
``upgrade`` (formats 1-3 to today's graph), ``trainable`` and ``meta`` (format 5), ``loader`` (``load``: the checks above, assembling the
module), ``writer`` (``save``: re-export,
rebuild check, writing).
"""

from __future__ import annotations

from nesc.core.names import EXTRA  # gm.meta key under which load() returns the caller's ``extra``

from .loader import FORMAT, FORMAT_VERSION, FROZEN_VERSION, READABLE_VERSIONS, load
from .writer import save

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION", "FROZEN_VERSION", "READABLE_VERSIONS", "EXTRA"]
