"""Loss wrappers used by federated local training."""

from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import nn


class ProximalLoss(nn.Module):
    """FedProx: ``base(pred, target) + mu / 2 * sum_p ||w_p - w_p^global||^2``.

    The proximal term pulls local weights towards the round's global weights, over the
    parameters listed in :meth:`set_reference` (local keys such as FedBN's norm layers
    are simply not given a reference).

    Args:
        base: the bundle's loss (e.g. DiceCELoss).
        network: the model being trained.
        mu: proximal strength (> 0).
    """

    def __init__(self, base: nn.Module, network: nn.Module, mu: float):
        super().__init__()
        if not mu > 0:
            raise ValueError(f"FedProx mu must be > 0, got {mu}")
        self.base, self.mu = base, float(mu)
        self._params: Dict[str, nn.Parameter] = dict(network.named_parameters())
        self._reference: Dict[str, torch.Tensor] = {}

    def set_reference(self, weights: Mapping[str, torch.Tensor]):
        """Take the round's global weights (only keys that are trainable parameters are used)."""
        self._reference = {k: torch.as_tensor(v).detach().clone().to(self._params[k].device)
                           for k, v in weights.items() if k in self._params}

    def proximal_term(self) -> torch.Tensor:
        if not self._reference:
            return torch.zeros(())
        return sum(((self._params[k] - ref) ** 2).sum() for k, ref in self._reference.items())

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.base(pred, target) + 0.5 * self.mu * self.proximal_term()
