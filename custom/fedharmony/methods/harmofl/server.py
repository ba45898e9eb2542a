"""HarmoFL's server: FedAvg's mean, which also averages the amplitude target (a buffer of the model)."""

from typing import Optional

from fedharmony.fl.aggregator import SiteUpdateAggregator
from fedharmony.fl.recipe import BundleRecipe
from fedharmony.methods.harmofl.harmonize import check_ratio
from fedharmony.methods.harmofl.networks import MODES
from fedharmony.methods.harmofl.perturbation import check_alpha


class HarmoFLRecipe(BundleRecipe):
    """HarmoFL: the bundle's ``configs/harmofl.json`` layered on ``train.json``.

    Keyword-only (None keeps the bundle's value), then every
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

    def __init__(self, *, amp_mode: Optional[str] = None, amp_ratio: Optional[float] = None,
                 wp_alpha: Optional[float] = None, image_size: Optional[int] = None, **kwargs):
        if amp_mode is not None and amp_mode not in MODES:
            raise ValueError(f"amp_mode must be one of {MODES}, got {amp_mode!r}")
        try:
            if amp_ratio is not None:
                check_ratio(amp_ratio)
            if wp_alpha is not None:
                check_alpha(wp_alpha)
        except ValueError as e:
            raise ValueError(f"{'amp_ratio' if 'ratio' in str(e) else 'wp_alpha'}: {e}") from None
        if image_size is not None and (image_size < 16 or image_size % 16):
            raise ValueError(f"image_size must be a positive multiple of 16, got {image_size}")
        self.harmofl = {"amp_mode": amp_mode, "amp_ratio": amp_ratio, "wp_alpha": wp_alpha, "image_size": image_size}
        super().__init__(**kwargs)

    def bundle_overrides(self):
        return {k: v for k, v in self.harmofl.items() if v is not None}

    def aggregator(self):
        # released: the uniform mean (1/K) of every weight and of the amplitude target
        return SiteUpdateAggregator(local_keys=self.local_keys, persistor_id="persistor",
                                    weigh_by_samples=self.protocol != "released")


Recipe = HarmoFLRecipe  # the name the registry looks up
