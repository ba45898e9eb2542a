"""Ditto's server: FedAvg's mean of the global models; the personalized models never leave the sites."""

from fedharmony.fl.recipe import BundleRecipe


class DittoRecipe(BundleRecipe):
    """Ditto. Keyword-only: ``ditto_lambda`` (> 0, default 0.1, NVFlare's) and ``ditto_epochs``
    (epochs of the personalized model per round, default 1) (``fedharmony.methods.ditto.SPEC``),
    then every :class:`~fedharmony.fl.recipe.BundleRecipe` setting."""

    method = "ditto"
