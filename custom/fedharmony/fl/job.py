"""Pick a method's recipe by name: ``FedHarmonyRecipe(algorithm="fedbn", bundle_dir=..., num_rounds=10)``.

Each method has its own recipe (``fedharmony/methods/<name>/server.py``, keyword-only
settings, validated there; the common ones are :class:`fedharmony.fl.recipe.BundleRecipe`'s).
This function is the one entry point for code that chooses the method at run time (the job
scripts, the study tool): it builds ``recipe_class(algorithm)(**settings)`` and turns a
setting the method does not have into a clear error instead of a bare ``TypeError``.
"""

import inspect

from fedharmony.methods import METHODS, recipe_class
from fedharmony.fl.recipe import BundleRecipe

ALGORITHMS = METHODS

__all__ = ["ALGORITHMS", "FedHarmonyRecipe"]


def FedHarmonyRecipe(algorithm: str = "fedavg", **settings) -> BundleRecipe:  # noqa: N802 (kept as the old class name)
    """The recipe of method ``algorithm`` with ``settings``.

    Raises:
        ValueError: an unknown method, or a setting the method's recipe does not take.
    """
    cls = recipe_class(algorithm)
    accepted = set()
    for klass in cls.__mro__:
        if issubclass(klass, BundleRecipe):
            accepted |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                         if p.kind == p.KEYWORD_ONLY}
    foreign = sorted(set(settings) - accepted)
    if foreign:
        raise ValueError(f"{foreign} {'is not a setting' if len(foreign) == 1 else 'are not settings'} of "
                         f"{algorithm} ({cls.__module__}.{cls.__name__}); its own settings: "
                         f"{sorted(accepted - _common())}")
    return cls(**settings)


def _common():
    return {n for n, p in inspect.signature(BundleRecipe.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY}
