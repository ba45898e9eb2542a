"""FedProx's server: FedAvg's mean; ``mu`` travels to the sites as the method's setting (its ``SPEC``)."""

from fedharmony.fl.recipe import BundleRecipe


class FedProxRecipe(BundleRecipe):
    """FedProx. Keyword-only: ``mu`` (proximal strength, > 0, default 0.01; ``fedharmony.methods.fedprox.SPEC``),
    then every :class:`~fedharmony.fl.recipe.BundleRecipe` setting."""

    method = "fedprox"
