"""Plan search: which layers to compress, how much, which share a pool, and how wide the model is.

    result = nesc.search("resnet_fmnist", "fashion_mnist", "runs/s1", strategy="esnac", evaluations=40, ratio=4)
    result.best                    # a Plan; also runs/s1/best.json, for `nesc compress MODEL --plan ...`
    result.history                 # every evaluation: genome, accuracy, stored parameters, reward

Strategies (``STRATEGIES``): ``esnac`` (Cao, Wang, Kitani, ICLR 2019: Bayesian optimisation with a GP
over a BiLSTM embedding learned by the GP's leave-one-out likelihood), ``embedding`` (Ashok, 2019,
"Architecture Compression": gradient descent in a CNN autoencoder's embedding against learned
reward and size regressors), ``random`` and ``uniform``. Each plan is scored by a short distilled
fine-tune on data held out from the train split (``evaluate``), cached by the plan's hash; the search
resumes from its run dir (``run``); evaluations run in spawned local processes or on Ray (``workers``).

The plan space (``space``) and how it differs from the papers'. ESNAC and Architecture Compression
search *architectures*: they remove layers and shrink each layer's channels, on their own graph
formats, and a candidate's size follows from those choices. Here the architecture stays as it is and
every candidate meets the same parameter budget (``ratio`` of the dense size): a plan chooses, per
weight, dense or compressed, how strongly relative to the others (0.5x-4x the model's average ratio,
solved so the whole meets the budget), whether it samples from a pool shared with other layers (up
to ``max_groups`` pools, across layer types), and a width multiplier for the whole model (wider at
the same size, which nesc allows because parameters are decoupled from the architecture). The models
have one ``width_mult`` for the whole network, not one per stage, so the width is searched model-wide.
Layer removal has no counterpart; a "dense" layer is the opposite of the papers' shrinking. The
reward is ESNAC's ``C(2-C) A/A_dense``; since sizes are nearly equal it mostly ranks accuracy, and its
hard-budget variant (``reward="budget"``) scores an over-budget plan 0.

The name ``nesc.search`` is the function (``nesc/__init__.py`` re-exports it); import this package's
modules as ``from nesc.search.plan import read_plan``.
"""

from . import embedding, esnac  # noqa: F401  (register their strategies)
from .plan import Plan, read_plan
from .run import SearchConfig, SearchResult, search
from .space import Genome, PlanSpace
from .strategies import STRATEGIES

__all__ = ["STRATEGIES", "Genome", "Plan", "PlanSpace", "SearchConfig", "SearchResult", "read_plan", "search"]
