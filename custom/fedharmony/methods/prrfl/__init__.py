"""PRR-FL (Chen, Zhu, Yang and Yuan, "Personalized Retrogress-Resilient Framework for Real-World
Medical Federated Learning", MICCAI 2021).

Each site holds a personalized model (never sent, never overwritten) and a deputy (sent, and
replaced by the server's answer). Deputy-enhanced transfer (:mod:`fedharmony.methods.prrfl.deputy`, the
bundle's ``configs/prrfl.json`` overlay) lets the two teach each other each local epoch, in
one of three stages (recover, exchange, sublimate). The server aggregates the deputies with
progressive Fourier aggregation (:mod:`fedharmony.methods.prrfl.fourier_aggregation`): the mean amplitude
spectrum of each weight, of which a share growing from r0 to r1 over the rounds replaces each
deputy's own; the phase stays the site's. Normalization layers stay on the sites. The
personalized models are the result; there is no global model.
"""

from fedharmony.methods.spec import MethodSpec, Setting

SPEC = MethodSpec(
    name="prrfl",
    summary="deputy transfer + progressive Fourier aggregation (Chen et al. 2021)",
    site="fedharmony.methods.prrfl.site.PRRFLSite",
    recipe="fedharmony.methods.prrfl.server.PRRFLRecipe",
    settings=(
        Setting("prrfl_r0", float, 0.7, "PRR-FL shared spectral ratio at round 0", goes_to="server",
                minimum=0.0, maximum=1.0, exclusive_minimum=True),
        Setting("prrfl_r1", float, 0.95, "PRR-FL ratio the schedule grows towards (>= prrfl_r0)", goes_to="server",
                minimum=0.0, maximum=1.0, exclusive_minimum=True),
        Setting("prrfl_alpha1", float, None, "PRR-FL recover threshold (the bundles': 0.7)",
                goes_to="bundle", minimum=0.0, maximum=1.0, exclusive_minimum=True),
        Setting("prrfl_alpha2", float, None, "PRR-FL sublimate threshold, >= prrfl_alpha1 (the bundles': 0.9)",
                goes_to="bundle", minimum=0.0, maximum=1.0, exclusive_minimum=True),
        Setting("prrfl_box", str, None, "PRR-FL shared low-frequency box: symmetric unless --protocol released, "
                "which sets the released code's half_open", goes_to="server", choices=("symmetric", "half_open")),
        Setting("prrfl_weighted", bool, False, "PRR-FL: weight the mean amplitude by training-set size (false: uniform, "
                "as released)", goes_to="server"),
    ),
    server_components=("fedharmony.methods.prrfl.server.FourierAggregator",),
)
