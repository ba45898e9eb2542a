"""IOP-FL inside personalization: a site's personalized model as a moving average of its local models.

After local training in round t, site k updates a model that never leaves the site:

    phi_k <- theta_k                                (first round)
    phi_k <- a * phi_k + (1 - a) * theta_k          (afterwards; IOP-FL's released a = 0.1)

``theta_k`` is the site's locally trained model of the round (global model + local
updates), so ``phi_k`` accumulates both. The whole state dict is averaged, normalization
statistics included. Integer buffers (BatchNorm's ``num_batches_tracked``) cannot be
averaged; they take ``theta_k``'s value.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch


def check_personalization_alpha(alpha: float) -> float:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"personalization alpha (a) must be in [0, 1), got {alpha}")
    return float(alpha)


def ema_update(personalized: Optional[Mapping[str, torch.Tensor]], local: Mapping[str, torch.Tensor],
               alpha: float) -> Dict[str, torch.Tensor]:
    """One inside-personalization step; returns a new state dict (inputs are not modified).

    Args:
        personalized: phi_k from the previous round, or None in the site's first round.
        local: theta_k, this round's locally trained state dict.
        alpha: weight of the previous personalized model, in [0, 1).

    Raises:
        ValueError: the two state dicts do not have the same keys and shapes.
    """
    check_personalization_alpha(alpha)
    if personalized is None:
        return {k: v.detach().clone() for k, v in local.items()}
    if set(personalized) != set(local):
        diff = sorted(set(personalized) ^ set(local))
        raise ValueError(f"personalized and local models differ in keys: {diff[:5]}")
    out = {}
    for k, theta in local.items():
        phi = personalized[k]
        if phi.shape != theta.shape:
            raise ValueError(f"{k!r}: personalized shape {tuple(phi.shape)} != local shape {tuple(theta.shape)}")
        if theta.is_floating_point():
            out[k] = alpha * phi.to(theta.dtype) + (1.0 - alpha) * theta.detach()
        else:
            out[k] = theta.detach().clone()
    return out
