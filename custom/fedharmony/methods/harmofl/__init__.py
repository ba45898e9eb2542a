"""HarmoFL (Jiang, Wang and Dou, "HarmoFL: Harmonizing Local and Global Drifts in Federated Learning
on Heterogeneous Medical Images", AAAI 2022).

Two parts, both in the bundle's ``configs/harmofl.json`` overlay: amplitude normalization
(:mod:`fedharmony.methods.harmofl.harmonize`, the network's first layer: the low-frequency window of each
image's amplitude spectrum is replaced by a target amplitude that the server averages with the
weights) and weight-perturbed training (:mod:`fedharmony.methods.harmofl.perturbation`, the trainer's iteration
function). The server is FedAvg's; the target is a buffer of the model, so it is averaged with
the weights. On a site the method only makes sure the target the model uses is the global one,
and gives the initial model (which has none yet) a target from the site's own images.
"""

from fedharmony.methods.spec import MethodSpec, Setting

SPEC = MethodSpec(
    name="harmofl",
    summary="amplitude normalization + weight perturbation (Jiang et al. 2022)",
    site="fedharmony.methods.harmofl.site.HarmoFLSite",
    recipe="fedharmony.methods.harmofl.server.HarmoFLRecipe",
    settings=(
        Setting("amp_mode", str, None, "HarmoFL amplitude normalization (the bundles': paper)",
                goes_to="bundle", choices=("paper", "released", "off")),
        Setting("amp_ratio", float, None, "HarmoFL window ratio L (the bundles': 0.01)", goes_to="bundle",
                minimum=0.0, maximum=0.5),
        Setting("wp_alpha", float, None, "HarmoFL weight perturbation strength, 0 = off",
                goes_to="bundle", minimum=0.0, maximum=1.0),
        Setting("image_size", int, None, "HarmoFL common in-plane size", goes_to="bundle",
                minimum=16, maximum=2048, multiple_of=16),
    ),
)
