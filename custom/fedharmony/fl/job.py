"""Pick a method's recipe by name: ``FedHarmonyRecipe(algorithm="fedbn", bundle_dir=..., num_rounds=10)``.

Each method has its own recipe (``fedharmony/methods/<name>/server.py``); its own settings are
declared in its ``SPEC`` and checked by :class:`fedharmony.fl.recipe.BundleRecipe`, which also holds
the settings every method shares. This function is the one entry point for code that chooses the
method at run time (the job scripts, the study tool).
"""

from fedharmony.methods import METHODS, recipe_class
from fedharmony.fl.recipe import BundleRecipe

ALGORITHMS = METHODS

__all__ = ["ALGORITHMS", "FedHarmonyRecipe"]


def FedHarmonyRecipe(algorithm: str = "fedavg", **settings) -> BundleRecipe:  # noqa: N802 (kept as the old class name)
    """The recipe of method ``algorithm`` with ``settings``.

    Raises:
        ValueError: an unknown method, or a setting the method does not have (named, with the method's own).
    """
    return recipe_class(algorithm)(**settings)
