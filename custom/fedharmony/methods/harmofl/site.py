"""HarmoFL on a site: FedAvg, plus the amplitude target's bookkeeping (the rest is in the bundle overlay)."""

from fedharmony.methods.harmofl.networks import layers_without_target, prime_targets, use_global_targets
from fedharmony.methods.harmofl import SPEC
from fedharmony.methods.base import SiteMethod

OVERLAY = "configs/harmofl.json"


class HarmoFLSite(SiteMethod):
    name = "harmofl"
    spec = SPEC
    overlay = OVERLAY
    # the released code: DC-only amplitude target frozen at the first batch, 0-255 input, batch norm
    # without affine or running statistics, plain conv blocks (its uniform mean is the recipe's)
    released_settings = {"amp_mode": "released", "intensity": "released", "norm": "batch_stats_only",
                         "num_res_units": 0}
    released_cuts_to_smallest_site = True

    def receive(self, weights, meta):
        super().receive(weights, meta)
        use_global_targets(self.site.network)  # a received amplitude target is the global one: keep it

    def prepare(self):
        # round 0: the initial global model has no target yet; take one from a batch of this site's images
        if layers_without_target(self.site.network):
            prime_targets(self.site.network, next(iter(self.site.trainer.data_loader))["image"])
