"""Ditto on a site: FedAvg's global model plus a personalized model pulled towards it."""

import copy

import torch

from fedharmony.bundle.losses import ProximalLoss
from fedharmony.core.results import PERSONALIZED_SUFFIX
from fedharmony.methods.base import RoundNotes, SiteMethod
from fedharmony.methods.ditto import SPEC

DEFAULT_LAMBDA = SPEC.setting("ditto_lambda").default  # NVFlare's PTDittoHelper default
DEFAULT_EPOCHS = SPEC.setting("ditto_epochs").default


class DittoSite(SiteMethod):
    """Args:
        ditto_lambda: lambda, the pull of the personalized model towards the round's global model (> 0).
        ditto_epochs: epochs the personalized model trains each round (>= 1)."""

    name = "ditto"
    spec = SPEC
    personalized = True
    result = "the site's personalized model, best on its validation split"
    result_tag = PERSONALIZED_SUFFIX
    best_at_round_start = False  # the site's result is its personalized model
    scored_model = "global"

    def __init__(self, ditto_lambda: float = DEFAULT_LAMBDA, ditto_epochs: int = DEFAULT_EPOCHS):
        super().__init__()
        self.lam = SPEC.setting("ditto_lambda").check(ditto_lambda)
        self.epochs = SPEC.setting("ditto_epochs").check(ditto_epochs)
        self.personal = None  # the personalized model's state dict
        self.personal_optimizer = None  # its optimizer's state
        self._global = None  # the global model received this round
        self._fresh_optimizer = None

    def settings(self):
        return {"ditto_lambda": self.lam, "ditto_epochs": self.epochs}

    def attach(self, site):
        super().attach(site)
        # the personalized model's optimizer starts like the bundle's: same class and settings, no state
        self._fresh_optimizer = copy.deepcopy(site.optimizer.state_dict())

    def receive(self, weights, meta):
        super().receive(weights, meta)
        self._global = self.site.shared_weights()
        if self.personal is None:  # the first global model starts the personalized one
            self.personal = self.site.state_dict()

    def after_round(self, key_metric):
        site = self.site
        trained_global = site.state_dict()  # what FedAvg sends; put back once v_k has trained
        global_optimizer = copy.deepcopy(site.optimizer.state_dict())
        site.load_weights(self.personal, keep_local=False)
        round_lrs = [g["lr"] for g in site.optimizer.param_groups]  # this round's (fedharmony.bundle.optim)
        fresh = self.personal_optimizer is None or site.round_schedule.reset_each_round
        site.optimizer.load_state_dict(self._fresh_optimizer if fresh else self.personal_optimizer)
        for group, lr in zip(site.optimizer.param_groups, round_lrs):
            group["lr"] = lr
        loss = ProximalLoss(site.base_loss, site.network, self.lam)
        loss.set_reference(self._global)
        try:
            site.run_epochs(self.epochs, loss)
            self.personal = site.state_dict()
            self.personal_optimizer = copy.deepcopy(site.optimizer.state_dict())
        finally:
            site.load_weights(trained_global, keep_local=False)
            site.optimizer.load_state_dict(global_optimizer)
        with torch.random.fork_rng():
            score = site.evaluate(self.personal, "validation")[key_metric]
        site.record_metric(score, self.personal)
        return RoundNotes(tracked={key_metric + PERSONALIZED_SUFFIX: score}, note=f", personalized {score:.4f}")

    def state_dict(self):
        return {"personal": self.personal, "personal_optimizer": self.personal_optimizer}

    def load_state_dict(self, state):
        self.personal = state.get("personal")
        self.personal_optimizer = state.get("personal_optimizer")
