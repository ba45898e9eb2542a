"""FedProx's server: FedAvg's mean; ``mu`` travels to the sites as the method's setting."""

from fedharmony.fl.recipe import BundleRecipe
from fedharmony.methods.fedprox.site import DEFAULT_MU, check_mu


class FedProxRecipe(BundleRecipe):
    """FedProx. Keyword-only: ``mu`` (proximal strength, > 0, default 0.01), then every
    :class:`~fedharmony.fl.recipe.BundleRecipe` setting."""

    method = "fedprox"

    def __init__(self, *, mu: float = DEFAULT_MU, **kwargs):
        self.mu = check_mu(mu)
        super().__init__(**kwargs)

    def site_settings(self):
        return {"mu": self.mu}


Recipe = FedProxRecipe  # the name the registry looks up
