"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017): each site trains the global model on its data; the server takes the mean of the
site models weighted by training-set size, ``w <- sum_k n_k w_k / sum_k n_k``."""

from fedharmony.methods.spec import MethodSpec

SPEC = MethodSpec(
    name="fedavg",
    summary="sample-weighted mean of site models (McMahan et al. 2017)",
    site="fedharmony.methods.fedavg.site.FedAvgSite",
    recipe="fedharmony.methods.fedavg.server.FedAvgRecipe",
)
