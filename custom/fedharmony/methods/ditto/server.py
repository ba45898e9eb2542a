"""Ditto's server: FedAvg's mean of the global models; the personalized models never leave the sites."""

from typing import Optional

from fedharmony.fl.recipe import BundleRecipe
from fedharmony.methods.ditto.site import DEFAULT_EPOCHS, DEFAULT_LAMBDA, DittoSite


class DittoRecipe(BundleRecipe):
    """Ditto. Keyword-only: ``ditto_lambda`` (> 0, default 0.1, NVFlare's) and ``ditto_epochs``
    (epochs of the personalized model per round, default 1), then every
    :class:`~fedharmony.fl.recipe.BundleRecipe` setting."""

    method = "ditto"

    def __init__(self, *, ditto_lambda: Optional[float] = None, ditto_epochs: Optional[int] = None, **kwargs):
        self.settings = {"lam": DEFAULT_LAMBDA if ditto_lambda is None else ditto_lambda,
                         "epochs": DEFAULT_EPOCHS if ditto_epochs is None else ditto_epochs}
        DittoSite.from_settings(self.settings)  # checks both
        super().__init__(**kwargs)

    def site_settings(self):
        return dict(self.settings)


Recipe = DittoRecipe  # the name the registry looks up
