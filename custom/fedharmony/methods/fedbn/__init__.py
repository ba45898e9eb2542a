"""FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization",
ICLR 2021): FedAvg in which every normalization layer (weights, biases and running statistics)
stays on its site; only the other layers are averaged. Each site's result is its own model."""

from fedharmony.methods.spec import MethodSpec

SPEC = MethodSpec(
    name="fedbn",
    summary="FedAvg, normalization layers stay on each site (Li et al. 2021)",
    site="fedharmony.methods.fedbn.site.FedBNSite",
    recipe="fedharmony.methods.fedbn.server.FedBNRecipe",
)
