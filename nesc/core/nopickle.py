"""A nesc GraphModule refuses to be pickled, with an error that says what to use instead.

torch's ``GraphModule.__reduce__`` pickles the generated source plus every submodule; on a nesc graph
it fails deep inside torch (``'str' object has no attribute '__name__'`` from the code generator's
imports), and a pickle would in any case run code when it is loaded. ``no_pickle`` gives the graph's
own class (``torch.fx`` makes one class per GraphModule instance, so no other module is touched) a
``__reduce_ex__`` that raises ``ArtifactError`` naming ``nesc.save`` (frozen and trainable models) and
``state_dict()`` (a trainable one's: it holds pools, start indices, gains and learner state).
``copy.deepcopy``/``copy.copy`` are unaffected: GraphModule defines ``__deepcopy__``/``__copy__``.
"""

from __future__ import annotations

from torch import fx

from .errors import ArtifactError

PICKLE_HINT = (
    "a nesc GraphModule cannot be pickled (torch.save(gm), pickle.dumps(gm), a process pool): a pickle runs "
    "code when it is loaded. Save it with nesc.save(gm, path) and read it with nesc.load(path): a frozen model, "
    "or a trainable one, which loads trainable (pools, start indices, gains and learner state) to resume "
    "training; or keep a trainable one's state_dict (safetensors.torch.save_model(gm, path)) for "
    "nesc.transform of the same model (safetensors.torch.load_model)."
)


def _refuse(self, protocol=None):
    raise ArtifactError(PICKLE_HINT)


def no_pickle(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, whose pickling now raises the error above; returned for chaining."""
    cls = type(gm)
    if isinstance(gm, fx.GraphModule) and cls is not fx.GraphModule:  # never patch torch's own class
        cls.__reduce_ex__ = _refuse
        cls.__reduce__ = _refuse
    return gm
