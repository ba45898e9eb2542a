"""SCAFFOLD on a site: corrected local steps and the control-variate update (the math is here, pure)."""

from typing import Dict, Mapping

import numpy as np
import torch
from ignite.engine import Events

from fedharmony.methods.scaffold import SPEC
from fedharmony.methods.base import SiteMethod

C_GLOBAL = "scaffold_c_global"  # meta key of the server's control variate (NVFlare's AlgorithmConstants name)
C_DIFF = "scaffold_c_diff"  # meta key of a site's control-variate change


def corrected_step(params: Mapping[str, torch.Tensor], c_global: Mapping[str, torch.Tensor],
                   c_local: Mapping[str, torch.Tensor], lr: float):
    """In place, after an optimizer step: ``w <- w - lr * (c - c_k)`` for every parameter in ``params``."""
    with torch.no_grad():
        for k, w in params.items():
            w.sub_(lr * (c_global[k].to(w) - c_local[k].to(w)))


def control_update(c_local: Mapping[str, torch.Tensor], c_global: Mapping[str, torch.Tensor],
                   start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], steps: int, lr: float):
    """The site's new control variate and its change, option II of the paper.

    ``c_k+ = c_k - c + (start - end) / (steps * lr)``; returns ``(c_k+, c_k+ - c_k)``.

    Example:
        >>> c_new, delta = control_update({"w": torch.tensor([0.])}, {"w": torch.tensor([1.])},
        ...                               {"w": torch.tensor([2.])}, {"w": torch.tensor([1.])}, 2, 0.5)
        >>> c_new["w"].item(), delta["w"].item()
        (0.0, 0.0)
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"SCAFFOLD needs at least one step with lr > 0, got {steps} steps at lr {lr}")
    new = {k: (c_local[k] - c_global[k] + (start[k] - end[k]) / (steps * lr)).detach().clone() for k in c_local}
    return new, {k: new[k] - c_local[k] for k in c_local}


class ScaffoldSite(SiteMethod):
    name = "scaffold"
    spec = SPEC

    def __init__(self):
        super().__init__()
        self.c_local: Dict[str, torch.Tensor] = {}
        self._c_global: Dict[str, torch.Tensor] = {}
        self._start: Dict[str, torch.Tensor] = {}
        self._steps = 0
        self._delta: Dict[str, np.ndarray] = {}

    def _params(self) -> Dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.site.network.named_parameters() if p.requires_grad}

    def _lr(self) -> float:
        return float(self.site.optimizer.param_groups[0]["lr"])

    def attach(self, site):
        super().attach(site)
        self.c_local = {k: torch.zeros_like(p, device="cpu") for k, p in self._params().items()}
        site.trainer.add_event_handler(Events.ITERATION_COMPLETED, self._correct)

    def receive(self, weights, meta):
        super().receive(weights, meta)
        params = self._params()
        received = meta.get(C_GLOBAL) or {}
        unknown = sorted(set(received) - set(params))
        if unknown:
            raise ValueError(f"site {self.site.site_name!r}: the server's SCAFFOLD control variate has keys the "
                             f"network's trainable parameters do not have: {unknown[:5]}")
        self._c_global = {}
        for k, p in params.items():
            c = torch.as_tensor(np.asarray(received[k])) if k in received else torch.zeros_like(p, device="cpu")
            if tuple(c.shape) != tuple(p.shape):
                raise ValueError(f"site {self.site.site_name!r}: SCAFFOLD control {k!r} has shape "
                                 f"{tuple(c.shape)}, the parameter {tuple(p.shape)}")
            self._c_global[k] = c.to(p.dtype)

    def before_training(self):
        self._start = {k: p.detach().cpu().clone() for k, p in self._params().items()}
        self._steps = 0

    def _correct(self, engine):
        if not self._start:  # not inside a SCAFFOLD round (e.g. the site trains for another purpose)
            return
        corrected_step(self._params(), self._c_global, self.c_local, self._lr())
        self._steps += 1

    def after_training(self):
        end = {k: p.detach().cpu() for k, p in self._params().items()}
        self.c_local, delta = control_update(self.c_local, self._c_global, self._start, end, self._steps, self._lr())
        self._delta = {k: v.numpy() for k, v in delta.items()}
        self._start = {}

    def outgoing(self):
        weights, meta = super().outgoing()
        return weights, {C_DIFF: self._delta}

    def state_dict(self):
        return {"c_local": self.c_local}

    def load_state_dict(self, state):
        if state.get("c_local") is not None:
            self.c_local = state["c_local"]
