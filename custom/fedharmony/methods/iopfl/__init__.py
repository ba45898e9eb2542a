"""IOP-FL inside personalization (Jiang, Yang, Wang, Dou, "IOP-FL: Inside-Outside Personalization for
Federated Medical Image Segmentation", IEEE TMI 2023).

Underneath it is FedAvg. After each round's local training a site updates a model that never
leaves it, ``phi <- a * phi + (1 - a) * theta`` (:mod:`fedharmony.methods.iopfl.personalization`, released
``a = 0.1``), scores it on its validation split and keeps its best. The server writes the model
pool (global + personalized models) for test-time routing on sites outside the federation
(:mod:`fedharmony.methods.iopfl.model_pool`, :mod:`fedharmony.methods.iopfl.routing`).
"""

from fedharmony.methods.spec import MethodSpec, Setting

SPEC = MethodSpec(
    name="iopfl",
    summary="FedAvg + per-site moving-average model (Jiang et al. 2023)",
    site="fedharmony.methods.iopfl.site.IOPFLSite",
    recipe="fedharmony.methods.iopfl.server.IOPFLRecipe",
    settings=(Setting("iop_alpha", float, 0.1, "IOP-FL personalization weight a (0.1 is the released value)",
                      minimum=0.0, maximum=1.0, exclusive_maximum=True),),
    server_components=("fedharmony.methods.iopfl.server.ModelPoolWriter",),
)
