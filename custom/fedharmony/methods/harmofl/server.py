"""HarmoFL's server: FedAvg's mean, which also averages the amplitude target (a buffer of the model)."""

from fedharmony.fl.aggregator import SiteUpdateAggregator
from fedharmony.fl.recipe import BundleRecipe


class HarmoFLRecipe(BundleRecipe):
    """HarmoFL: the bundle's ``configs/harmofl.json`` layered on ``train.json``.

    Keyword-only (``fedharmony.methods.harmofl.SPEC``; None keeps the bundle's value), then every
    :class:`~fedharmony.fl.recipe.BundleRecipe` setting:
        amp_mode: ``paper`` / ``released`` / ``off`` (amplitude normalization).
        amp_ratio: the window ratio L in [0, 0.5].
        wp_alpha: weight perturbation strength (0 = off).
        image_size: the common in-plane size (a multiple of 16).

    With ``protocol="released"`` (a :class:`~fedharmony.fl.recipe.BundleRecipe` setting) the sites
    get the released code's settings (:attr:`fedharmony.methods.harmofl.site.HarmoFLSite.released_settings`,
    every site cut to ``max_train_cases``) and the server takes the uniform mean (1/K) of every
    weight and of the amplitude target, as the released code does.
    """

    method = "harmofl"

    def aggregator(self):
        # released: the uniform mean (1/K) of every weight and of the amplitude target
        return SiteUpdateAggregator(local_keys=self.local_keys, persistor_id="persistor",
                                    weigh_by_samples=self.protocol != "released")
