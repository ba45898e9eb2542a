"""IOP-FL on a site: FedAvg plus a personalized moving-average model that is scored and kept."""

import torch

from fedharmony.methods.iopfl.personalization import check_personalization_alpha, ema_update
from fedharmony.core.results import PERSONALIZED_SUFFIX
from fedharmony.methods.base import RoundNotes, SiteMethod
from fedharmony.methods.iopfl import SPEC

DEFAULT_ALPHA = SPEC.setting("iop_alpha").default  # the released value


class IOPFLSite(SiteMethod):
    """Args:
        iop_alpha: weight ``a`` of the previous personalized model, in [0, 1)."""

    name = "iopfl"
    spec = SPEC
    personalized = True
    result = "the site's personalized model phi, best on its validation split"
    released_elsewhere = ("IOP-FL's released choices are test-time ones: configs/routed_inference.json with "
                          "method=routing_released, adaptation#entropy=released and adaptation#schedule=online")
    result_tag = PERSONALIZED_SUFFIX
    needs_cross_site_eval = True  # the model pool is collected that way
    best_at_round_start = False  # the site's result is phi, scored after each update

    def __init__(self, iop_alpha: float = DEFAULT_ALPHA):
        super().__init__()
        self.alpha = check_personalization_alpha(SPEC.setting("iop_alpha").check(iop_alpha))
        self.personalized_model = None

    def settings(self):
        return {"iop_alpha": self.alpha}

    def after_training(self):
        self.personalized_model = ema_update(self.personalized_model, self.site.state_dict(), self.alpha)

    def after_round(self, key_metric):
        with torch.random.fork_rng():  # leaves the training RNG stream, hence the FedAvg underneath, untouched
            score = self.site.evaluate(self.personalized_model, "validation")[key_metric]
        self.site.record_metric(score, self.personalized_model)
        return RoundNotes(tracked={key_metric + PERSONALIZED_SUFFIX: score}, note=f", personalized {score:.4f}")

    def state_dict(self):
        return {"personalized": self.personalized_model}

    def load_state_dict(self, state):
        self.personalized_model = state.get("personalized")
