"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Local training minimizes ``loss(w) + mu / 2 * ||w - w_global||^2`` over the trainable
parameters, where ``w_global`` is the model the site received this round; the server is
FedAvg's. ``mu`` (default 0.01) is a setting of the job.
"""

from fedharmony.methods.spec import MethodSpec, Setting

SPEC = MethodSpec(
    name="fedprox",
    summary="FedAvg + proximal term mu/2 ||w - w_global||^2 (Li et al. 2020)",
    site="fedharmony.methods.fedprox.site.FedProxSite",
    recipe="fedharmony.methods.fedprox.server.FedProxRecipe",
    settings=(Setting("mu", float, 0.01, "FedProx proximal strength", minimum=0.0, exclusive_minimum=True),),
)
