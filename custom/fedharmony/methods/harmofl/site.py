"""HarmoFL on a site: FedAvg, plus the amplitude target's bookkeeping (the rest is in the bundle overlay)."""

from fedharmony.methods.harmofl.networks import layers_without_target, prime_targets, use_global_targets
from fedharmony.methods.base import SiteMethod

OVERLAY = "configs/harmofl.json"


class HarmoFLSite(SiteMethod):
    name = "harmofl"
    overlay = OVERLAY

    def receive(self, weights, meta):
        super().receive(weights, meta)
        use_global_targets(self.site.network)  # a received amplitude target is the global one: keep it

    def prepare(self):
        # round 0: the initial global model has no target yet; take one from a batch of this site's images
        if layers_without_target(self.site.network):
            prime_targets(self.site.network, next(iter(self.site.trainer.data_loader))["image"])


Site = HarmoFLSite  # the name the registry looks up
