"""Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021), as in NVFlare's ``PTDittoHelper``.

The global model trains as in FedAvg. Each site also keeps a personalized model v_k that never
leaves it: each round, after the global model's local training, v_k trains for
``epochs`` epochs on the site's data, minimizing

    loss(v_k) + lambda / 2 * ||v_k - w_global||^2

where ``w_global`` is the global model the site received that round (NVFlare's default
lambda 0.1, one epoch). v_k starts as the first global model. It is scored on the site's
validation split every round, tracked as ``<key metric>_personalized``, kept as the site's best
and returned for cross-site evaluation. lambda -> infinity gives FedAvg's model, lambda = 0
plain local training.
"""

from fedharmony.methods.spec import MethodSpec, Setting

SPEC = MethodSpec(
    name="ditto",
    summary="FedAvg + per-site model pulled towards it (Li et al. 2021)",
    site="fedharmony.methods.ditto.site.DittoSite",
    recipe="fedharmony.methods.ditto.server.DittoRecipe",
    settings=(
        Setting("ditto_lambda", float, 0.1, "Ditto: pull of the personalized model towards the global one (0.1 is NVFlare's)",
                minimum=0.0, exclusive_minimum=True),
        Setting("ditto_epochs", int, 1, "Ditto: epochs of the personalized model per round", minimum=1),
    ),
)
