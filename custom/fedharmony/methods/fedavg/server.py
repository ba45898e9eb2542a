"""fedavg's server: the sample-weighted mean of the site models."""

from fedharmony.fl.recipe import BundleRecipe


class FedAvgRecipe(BundleRecipe):
    """FedAvg: every setting is :class:`~fedharmony.fl.recipe.BundleRecipe`'s."""

    method = "fedavg"
