"""SCAFFOLD's server: FedAvg's mean of the weights, and the server control variate moved by the sites' changes."""

from typing import Dict, Tuple

import numpy as np

from fedharmony.core.aggregation import UpdateRejected
from fedharmony.fl.aggregator import SiteUpdateAggregator
from fedharmony.fl.recipe import BundleRecipe
from fedharmony.methods.scaffold.site import C_DIFF, C_GLOBAL


def check_control_diff(diff, expected: Dict[str, Tuple[int, ...]]) -> Dict[str, np.ndarray]:
    """A site's control-variate change: a dict of finite arrays whose keys and shapes are the model's."""
    if not isinstance(diff, dict) or not diff:
        raise UpdateRejected(f"SCAFFOLD needs the site's control-variate change ({C_DIFF!r} in the meta)")
    out = {}
    for k, v in diff.items():
        if k not in expected:
            raise UpdateRejected(f"control-variate change for {k!r}, which the model does not have")
        a = np.asarray(v)
        if tuple(a.shape) != tuple(expected[k]):
            raise UpdateRejected(f"control-variate change {k!r} has shape {tuple(a.shape)}, the model "
                                 f"{tuple(expected[k])}")
        if not np.isfinite(a).all():
            raise UpdateRejected(f"control-variate change {k!r} holds NaN or Inf")
        out[k] = a
    return out


class ScaffoldAggregator(SiteUpdateAggregator):
    """The weighted mean of the site models, plus ``c <- c + (1 / N) sum_k delta_k`` over the N sites
    that contributed this round; ``c`` goes to the sites with the next global model (meta
    ``scaffold_c_global``). An update without a valid control-variate change is rejected whole.
    """

    def __init__(self, local_keys: str = "", persistor_id: str = "persistor", weigh_by_samples: bool = True):
        super().__init__(local_keys=local_keys, persistor_id=persistor_id, weigh_by_samples=weigh_by_samples)
        self.c_global: Dict[str, np.ndarray] = {}
        self._diffs: Dict[str, Dict[str, np.ndarray]] = {}

    def _add(self, site, weights, weight, meta):
        diff = check_control_diff(meta.get(C_DIFF), self._expected_shapes())
        super()._add(site, weights, weight, meta)
        self._diffs[site] = diff

    def _aggregate_params(self):
        params, meta = super()._aggregate_params()
        n = len(self._diffs)
        for site_diff in self._diffs.values():
            for k, d in site_diff.items():
                base = self.c_global.get(k)
                self.c_global[k] = (np.zeros_like(d, dtype=np.float32) if base is None else base) + d / n
        self.info(f"round {self._round()}: SCAFFOLD control variate moved by the mean of {n} site changes")
        return params, {**meta, C_GLOBAL: {k: v.copy() for k, v in self.c_global.items()}}

    def reset_stats(self):
        super().reset_stats()
        self._diffs = {}


class ScaffoldRecipe(BundleRecipe):
    """SCAFFOLD: every setting is :class:`~fedharmony.fl.recipe.BundleRecipe`'s. A job resumed
    from a checkpoint restarts the control variates at zero (they are not in the checkpoint)."""

    method = "scaffold"

    def aggregator(self):
        return ScaffoldAggregator(local_keys=self.local_keys, persistor_id="persistor")
