"""fedbn's server: the sample-weighted mean of the site models, norm layers excluded (they stay on the sites)."""

from fedharmony.fl.recipe import BundleRecipe


class FedBNRecipe(BundleRecipe):
    """FedBN: every setting is :class:`~fedharmony.fl.recipe.BundleRecipe`'s."""

    method = "fedbn"
