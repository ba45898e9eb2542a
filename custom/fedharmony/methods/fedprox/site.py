"""FedProx on a site: the bundle's loss plus a proximal term towards the round's global model."""

from fedharmony.bundle.losses import ProximalLoss
from fedharmony.methods.base import SiteMethod
from fedharmony.methods.fedprox import SPEC

DEFAULT_MU = SPEC.setting("mu").default


class FedProxSite(SiteMethod):
    """Args:
        mu: proximal strength (> 0)."""

    name = "fedprox"
    spec = SPEC

    def __init__(self, mu: float = DEFAULT_MU):
        super().__init__()
        self.mu = SPEC.setting("mu").check(mu)

    def settings(self):
        return {"mu": self.mu}

    def training_loss(self, base_loss):
        loss = ProximalLoss(base_loss, self.site.network, self.mu)
        loss.set_reference(self.site.shared_weights())  # the received global model (local keys excluded)
        return loss
