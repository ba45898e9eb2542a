"""FedAvg on a site: the base :class:`~fedharmony.methods.base.SiteMethod` as it is."""

from fedharmony.methods.fedavg import SPEC
from fedharmony.methods.base import SiteMethod


class FedAvgSite(SiteMethod):
    name = "fedavg"
    spec = SPEC
