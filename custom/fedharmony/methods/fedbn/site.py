"""FedBN on a site: FedAvg with the normalization layers kept local."""

from fedharmony.core.norm_layers import NORM_LAYER_KEYS
from fedharmony.methods.fedbn import SPEC
from fedharmony.methods.base import SiteMethod


class FedBNSite(SiteMethod):
    name = "fedbn"
    spec = SPEC
    local_keys = NORM_LAYER_KEYS
    personalized = True  # the norm layers differ per site: each site's model is its own
    result = "the site's own model (shared weights + its norm layers), best on its validation split"
