"""HarmoFL's weight perturbation: non-adaptive SAM around any base optimizer (no NVFlare).

Per step, on the same batch twice:
  1. loss(w) backward -> g; n = global L2 norm over every parameter's gradient;
  2. delta_p = alpha * g_p / (n + 1e-12); w <- w + delta;
  3. zero grads; loss(w + delta) backward;
  4. w <- w - delta; base optimizer step with the gradient taken at w + delta.
The logged loss is loss(w). ``alpha = 0`` is a plain optimizer step. The base optimizer
is the bundle's own (Adam by default), so its state is the one ``BundleSite`` persists.
Batch-norm running statistics and HarmoFL's amplitude target are updated by the first
forward pass only.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not alpha >= 0 or alpha != alpha or alpha == float("inf"):
        raise ValueError(f"weight perturbation alpha must be a finite number >= 0, got {alpha!r}")
    return float(alpha)


@contextlib.contextmanager
def frozen_norm_statistics(network: nn.Module):
    """For the second (perturbed) pass: batch norm keeps normalizing with batch statistics but does not
    update its running ones, and HarmoFL's amplitude target does not count the batch a second time."""
    from fedharmony.methods.harmofl.networks import AmplitudeNormalization

    norms = [m for m in network.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    amps = [m for m in network.modules() if isinstance(m, AmplitudeNormalization)]
    saved = [m.momentum for m in norms]
    saved_frozen = [m.frozen for m in amps]
    for m in norms:
        m.momentum = 0.0
    for m in amps:
        m.frozen = True
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        for m, frozen in zip(amps, saved_frozen):
            m.frozen = frozen


def perturbed_step(params: Iterable[nn.Parameter], closure: Callable[[], torch.Tensor],
                   optimizer: torch.optim.Optimizer, alpha: float,
                   second_pass: Callable = contextlib.nullcontext) -> torch.Tensor:
    """One weight-perturbed update. ``closure`` runs forward + loss and returns the loss (no backward).

    Returns the loss at the unperturbed weights (detached).
    """
    alpha = check_alpha(alpha)
    params = [p for p in params if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    loss.backward()
    if alpha > 0:
        with_grad = [p for p in params if p.grad is not None]
        grad_norm = torch.norm(torch.stack([p.grad.detach().norm(2) for p in with_grad]), 2)
        deltas: Dict[nn.Parameter, torch.Tensor] = {}
        with torch.no_grad():
            for p in with_grad:
                deltas[p] = p.grad * (alpha / (grad_norm + 1e-12))
                p.add_(deltas[p])
        optimizer.zero_grad(set_to_none=True)
        with second_pass():
            closure().backward()
        with torch.no_grad():
            for p, d in deltas.items():
                p.sub_(d)
    optimizer.step()
    return loss.detach()


class WeightPerturbedIteration:
    """``iteration_update`` for MONAI's ``SupervisedTrainer`` that trains with :func:`perturbed_step`.

    Bundle config::

        "train#trainer#iteration_update": {"_target_": "fedharmony.methods.harmofl.perturbation.WeightPerturbedIteration",
                                           "alpha": 0.05}

    Cost: two forward and two backward passes per step (one of each when ``alpha = 0``).
    """

    def __init__(self, alpha: float = 0.05):
        self.alpha = check_alpha(alpha)

    def __call__(self, engine, batchdata: Dict) -> Dict:
        from monai.utils.enums import CommonKeys as Keys

        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        engine.network.train()
        out: Dict = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        def closure() -> torch.Tensor:
            pred = engine.inferer(inputs, engine.network, *args, **kwargs)
            out.setdefault(Keys.PRED, pred)  # the prediction at the unperturbed weights
            return engine.loss_function(pred, targets).mean()

        out[Keys.LOSS] = perturbed_step(engine.network.parameters(), closure, engine.optimizer, self.alpha,
                                        second_pass=lambda: frozen_norm_statistics(engine.network))
        engine.state.output = out
        return out

