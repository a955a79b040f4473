"""Initialise pools from a dense model, and distil a compressed model against its dense teacher.

``fit_pools`` solves, for every pool P, the least-squares problem

    min_P  sum_l || regenerate_l(P) - W_l ||^2

over the layers l that sample from P (regenerate is linear in P for fixed start indices), with
SciPy's LSQR on a matrix-free operator: the forward product is the sampler, the adjoint its
vector-Jacobian product. Columns are scaled by the lumped diagonal A^T A 1, which is exact when the
starts are integers (each weight element then reads one pool element), so LSQR converges in a few
iterations.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, lsqr
from torch import Tensor, fx, nn
from torch.nn import functional as F

from nesc.core.errors import InputError, NescWarning
from nesc.core.modules import EpitomeSampler, samplers_by_pool
from nesc.core.sampling import regenerate


@torch.no_grad()
def fit_pools(gm: fx.GraphModule, dense: Mapping[str, Tensor], iters: int = 30,
              match_spread: bool = False) -> dict[str, float]:
    """Fit every pool to the dense weights by least squares; returns per-layer relative error
    ``||W_hat - W|| / ||W||``. ``dense`` maps weight names (as in the user's model) to tensors.

    ``match_spread``: least squares shrinks what it cannot reach: the fitted weight's norm is
    ``sqrt(1 - err^2)`` of the dense one's, half of it for a random initialisation at 4x (err 0.87),
    which starts training from too small a weight. Each layer's gain is then rescaled so the sampled
    weight has the dense weight's standard deviation (variance-preserving). For a layer the fit
    reaches well this costs almost nothing: the relative error grows from 0.30 to 0.303, 0.50 to 0.52.
    Off by default: in networks with batch norm after every sampled layer the spread only sets the
    effective learning rate, and the shrunk fit trained better in our runs
    (``benchmarks/results/sampling/sampling.md``).
    """
    missing = sorted({s.weight_name for ss in samplers_by_pool(gm).values() for s in ss} - set(dense))
    if missing:
        raise InputError(
            f"fit_pools needs the dense weight of every sampled layer; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Pass the dense model's state_dict."
        )
    _warn_non_finite(gm, dense)
    errors = {}
    for pool_name, samplers in samplers_by_pool(gm).items():
        pool = gm.get_parameter(pool_name)
        # In the sampled layout: a 5-D conv3d weight is sampled as a 4-D view (passes.epitomize reshapes it).
        targets = [dense[s.weight_name].detach().to(torch.float64).reshape(s.geometry.param_shape) for s in samplers]
        # The routing freeze would keep (eval-mode starts, learner offsets averaged): constants here,
        # only the pool is solved for.
        routes = [(s, *s.routing()) for s in samplers]
        solution = _solve(pool, routes, targets, iters)
        pool.copy_(solution.to(pool.dtype))
        for route, w in zip(routes, targets):
            w_hat = _sample(route, pool.double())
            spread = float(w_hat.std()) if w_hat.numel() > 1 else 0.0
            if match_spread and spread > 0 and float(w.std()) > 0:
                route[0].scale *= float(w.std()) / spread
                w_hat = _sample(route, pool.double())
            errors[route[0].weight_name] = float((w_hat - w).norm() / w.norm().clamp_min(1e-12))
    return errors


def _warn_non_finite(gm: fx.GraphModule, dense: Mapping[str, Tensor]) -> None:
    """NaN or inf in a dense weight is legal but almost always a damaged checkpoint or a diverged run:
    least squares spreads it over the whole pool, and so over every layer sampling from it."""
    bad = {}
    for pool_name, samplers in samplers_by_pool(gm).items():
        for s in samplers:
            w = dense[s.weight_name].detach()
            count = int(w.numel() - torch.isfinite(w).sum())
            if count:
                bad[s.weight_name] = (count, w.numel(), pool_name)
    if bad:
        layers = ", ".join(f"{name} ({n:,} of {total:,} values, pool {pool})" for name, (n, total, pool) in bad.items())
        warnings.warn(NescWarning(
            f"the dense weights of {len(bad)} layer(s) hold NaN or inf: {layers}. The pools fitted to them "
            f"will not be finite, nor will any weight sampled from those pools. Check the checkpoint (or the "
            f"run that produced it) before compressing, or keep these layers dense (override -> None)."
        ), stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel of the first caller outside nesc and torch (the user's line,
    whether they called ``fit_pools`` or ``nesc.transform``)."""
    ours = tuple(str(Path(f).resolve().parent) + os.sep for f in (__file__, torch.__file__))
    frame, level = inspect.currentframe(), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(ours):
        frame, level = frame.f_back, level + 1
    return level - 1  # counted from our caller, as warn() counts from itself


def _sample(route: tuple[EpitomeSampler, Tensor, Tensor], pool: Tensor) -> Tensor:
    """The weight a sampler makes from ``pool`` along a fixed routing (its int starts and fractions)."""
    sampler, base, frac = route
    return regenerate(pool, base, frac.to(pool.dtype), sampler.scale, sampler.geometry)


def _solve(pool: Tensor, routes: list[tuple], targets: list[Tensor], iters: int) -> Tensor:
    shape = pool.shape
    n = pool.numel()
    sizes = [t.numel() for t in targets]

    def forward(p: Tensor) -> Tensor:
        return torch.cat([_sample(r, p.view(shape)).reshape(-1) for r in routes])

    def adjoint(y: Tensor) -> Tensor:
        with torch.enable_grad():
            p = torch.zeros(n, dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad(forward(p), p, y)
        return grad

    lumped = adjoint(forward(torch.ones(n, dtype=torch.float64)))
    used = lumped > 0
    b = torch.cat([t.reshape(-1) for t in targets])
    keep = pool.detach().reshape(-1).double()  # pool elements no layer reads keep their initial values
    if all(float(frac.abs().max()) == 0 for _, _, frac in routes):
        # Integer starts: every weight element reads one pool element, A^T A is diagonal and equals
        # the lumped diagonal, so the least-squares solution is a weighted average, in closed form.
        return torch.where(used, adjoint(b) / lumped.clamp_min(1e-30), keep).view(shape)
    d = torch.where(used, lumped.clamp_min(1e-30).rsqrt(), torch.ones_like(lumped))  # column scaling
    op = LinearOperator(
        (sum(sizes), n),
        matvec=lambda q: forward(torch.from_numpy(np.asarray(q, dtype=np.float64).ravel()) * d).numpy(),
        rmatvec=lambda y: (adjoint(torch.from_numpy(np.asarray(y, dtype=np.float64).ravel())) * d).numpy(),
        dtype=np.float64,
    )
    q = lsqr(op, b.numpy(), atol=1e-8, btol=1e-8, iter_lim=iters)[0]
    return torch.where(used, torch.from_numpy(q) * d, keep).view(shape)


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a local dense checkpoint into ``model`` (in place) and return it.

    ``.safetensors`` files are read with safetensors; other files with ``torch.load(weights_only=True)``,
    which refuses arbitrary pickled objects. A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
    unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dense checkpoint {str(path)!r} does not exist; pass the path of a local .safetensors or .pt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
            raise InputError(
                f"cannot read dense checkpoint {str(path)!r} as a tensor-only state dict ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); nesc refuses checkpoints holding arbitrary "
                f"Python objects. Save the model's state_dict() (or use .safetensors)."
            ) from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise InputError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {e}. Build the model with the "
            f"same architecture and options the checkpoint was trained with."
        ) from None
    return model


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> Tensor:
    """Hinton et al.'s knowledge distillation loss for fine-tuning against the dense teacher.

    ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, targets)``; without
    targets, the pure distillation term.
    """
    t = temperature
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction="batchmean", log_target=True,
    ) * (t * t)
    if targets is None:
        return kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(student_logits, targets)
