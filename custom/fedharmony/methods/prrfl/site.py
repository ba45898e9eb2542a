"""PRR-FL on a site: the deputy takes the server's answer, the personalized model is the result."""

import torch

from fedharmony.core.aggregation import is_local_key
from fedharmony.methods.prrfl.deputy import STAGES, DeputyTransferIteration
from fedharmony.methods.prrfl.fourier_aggregation import mix_amplitudes
from fedharmony.core.norm_layers import NORM_LAYER_KEYS
from fedharmony.methods.prrfl import SPEC
from fedharmony.methods.base import RoundNotes, SiteMethod

OVERLAY = "configs/prrfl.json"
FOURIER_RATIO = "prrfl_fourier_ratio"  # meta key: the server's answer is mean amplitudes, mix them with this L
FOURIER_BOX = "prrfl_fourier_box"  # meta key: the shared box's shape (symmetric, or the released half-open one)


class PRRFLSite(SiteMethod):
    name = "prrfl"
    spec = SPEC
    overlay = OVERLAY
    local_keys = NORM_LAYER_KEYS
    personalized = True
    result = "the site's personalized model, best on its validation split"
    # the released code's distillation KL (summed over pixels, divided by the batch size) and optimizer
    # (SGD without momentum, lr 1e-2, weight decay 1e-6, halved every 5 rounds, both optimizers built
    # anew each round: fedharmony.bundle.optim); its half-open Fourier box is the recipe's
    released_settings = {"prrfl_kl_reduction": "batchmean", "optimizer_name": "sgd", "learning_rate": 0.01,
                         "weight_decay": 1e-6, "lr_round_gamma": 0.5, "lr_round_step": 5,
                         "optimizer_reset_each_round": True}
    best_after_training = True  # the personalized model after local training is the site's result
    scores_after_training = True
    scored_model = "personalized"

    def __init__(self):
        super().__init__()
        self.transfer: DeputyTransferIteration = None

    def attach(self, site):
        super().attach(site)
        update = site.iteration_update
        if not isinstance(update, DeputyTransferIteration):
            raise ValueError(f"site {site.site_name!r}: PRR-FL needs the bundle's {OVERLAY} (its trainer's "
                             f"iteration_update must be fedharmony.methods.prrfl.deputy.DeputyTransferIteration)")
        self.transfer = update

    @property
    def exchanged_network(self):
        return self.transfer.deputy

    def optimizers(self):
        return [self.site.optimizer, self.transfer.deputy_optimizer]

    def receive(self, weights, meta):
        """The answer goes to the deputy. With a ratio it is the mean amplitudes, mixed into the deputy's own
        spectrum; without one (the initial global model) plain weights, which also start the personalized
        model when the site has not trained yet."""
        site, deputy = self.site, self.transfer.deputy
        ratio = meta.get(FOURIER_RATIO)
        if ratio is None:
            site.load_weights(weights, network=deputy)
            if site.round == 0:
                site.load_weights(weights)
            return
        own = {k: v.detach().cpu().numpy() for k, v in deputy.state_dict().items()}
        shared = {k: torch.as_tensor(v).numpy() for k, v in weights.items() if not is_local_key(k, self.local_keys)}
        try:
            mixed = mix_amplitudes(own, shared, float(ratio), str(meta.get(FOURIER_BOX, "symmetric")))
        except ValueError as e:
            raise ValueError(f"site {site.site_name!r}: cannot apply the Fourier aggregate: {e}") from None
        site.load_weights({k: torch.from_numpy(mixed[k]) for k in shared}, network=deputy)

    def before_training(self):
        self.transfer.start_round()

    def after_round(self, key_metric):
        epochs = self.site.last_local_epochs
        stages = [h[1] for h in self.transfer.history[-epochs:]]
        return RoundNotes(note=f", stages {'/'.join(stages)}",
                          per_epoch={"prrfl_stage": [STAGES.index(s) + 1 for s in stages]})

    def state_dict(self):
        return {"deputy": {k: v.detach().cpu().clone() for k, v in self.transfer.deputy.state_dict().items()},
                "deputy_optimizer": self.transfer.deputy_optimizer.state_dict(),
                "history": [list(h) for h in self.transfer.history]}

    def load_state_dict(self, state):
        if "deputy" not in state:
            raise ValueError("the saved state holds no PRR-FL deputy")
        self.transfer.deputy.load_state_dict(state["deputy"])
        self.transfer.deputy_optimizer.load_state_dict(state["deputy_optimizer"])
        self.transfer.history = [tuple(h) for h in state["history"]]
