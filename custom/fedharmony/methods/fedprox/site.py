"""FedProx on a site: the bundle's loss plus a proximal term towards the round's global model."""

import math

from fedharmony.bundle.losses import ProximalLoss
from fedharmony.methods.base import SiteMethod

DEFAULT_MU = 0.01


def check_mu(mu) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"FedProx needs mu > 0 (a finite number), got {mu!r}")
    return float(mu)


class FedProxSite(SiteMethod):
    """Args:
        mu: proximal strength (> 0)."""

    name = "fedprox"

    def __init__(self, mu: float = DEFAULT_MU):
        super().__init__()
        self.mu = check_mu(mu)

    def settings(self):
        return {"mu": self.mu}

    def training_loss(self, base_loss):
        loss = ProximalLoss(base_loss, self.site.network, self.mu)
        loss.set_reference(self.site.shared_weights())  # the received global model (local keys excluded)
        return loss


Site = FedProxSite  # the name the registry looks up
